"""Long contexts: attention rows and pattern scores from q and k, a chunk of rows at a
time and in float32, against transformers' eager attention maps on a tiny
Mistral-style model whose sliding window (16 tokens) is far shorter than the
prompts (64 tokens, left-padded next to a shorter one)."""

from __future__ import annotations

import pytest
import torch

from headscope.core import tracing as T
from headscope.core.architectures import adapter_for
from headscope.core.model_sources import TinyRandom
from headscope.core.models import ModelHandle, ModelSpec, _wrap
from headscope.core.tiny import byte_tokenizer
from headscope.core.tracing import reads

WINDOW = 16
ATOL = 2e-5


def mistral(implementation: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, MistralConfig

    config = MistralConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        sliding_window=WINDOW,
        initializer_range=0.2,
        vocab_size=258,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=implementation)
    return model.eval()


@pytest.fixture(scope="module")
def handle() -> ModelHandle:
    hf_model = mistral("sdpa")  # the prefill runs the fast attention
    tokenizer = byte_tokenizer()
    return ModelHandle(
        name="tiny-mistral-window16",
        spec=ModelSpec("tiny-mistral-window16", TinyRandom("llama")),
        model=_wrap(hf_model, tokenizer),
        tokenizer=tokenizer,
        adapter=adapter_for(hf_model.config),
        revision="test",
        load_seconds=0.0,
    )


def prompts() -> list[list[int]]:
    generator = torch.Generator().manual_seed(3)
    long = torch.randint(2, 258, (64,), generator=generator).tolist()
    return [long, long[:40]]


def test_prefill_rows_past_the_window_match_eager_maps(handle, monkeypatch):
    batch = T.make_batch(handle, prompts())
    positions = [0, 15, 16, 17, 39, -1]
    layers = [0, 1]
    rows = T.AttentionRows(layers, positions, output="probs")
    result = T.forward(handle, batch, [rows])
    with torch.no_grad():
        maps = mistral("eager")(**batch.model_inputs(), output_attentions=True).attentions
    cols = batch.absolute(positions)
    for layer in layers:
        ours = result.get("rows", layer)
        assert ours.dtype == torch.float32
        for row in range(batch.size):
            expected = maps[layer][row][:, cols[row]]
            torch.testing.assert_close(ours[row], expected, atol=ATOL, rtol=0)
            # keys that left the window get nothing
            last = int(cols[row, -1])
            assert torch.all(ours[row, :, -1, : last - WINDOW + 1] == 0)


def test_decode_rows_past_the_window_match_eager_generate(handle):
    single = T.make_batch(handle, prompts()[:1])
    steps = 5
    result = T.generate(
        handle, single, steps, [T.AttentionRows([0, 1], [-1], output="probs")], stop_ids=[]
    )
    reference = mistral("eager").generate(
        single.input_ids,
        attention_mask=single.attention_mask,
        max_new_tokens=steps,
        do_sample=False,
        output_attentions=True,
        return_dict_in_generate=True,
        pad_token_id=1,
    )
    assert result.tokens[0] == reference.sequences[0, single.width :].tolist()
    for step in range(steps):
        for layer in (0, 1):
            ours = result.steps[step][("rows", layer)][0, :, 0]
            expected = reference.attentions[step][layer][0, :, -1]
            torch.testing.assert_close(ours[:, -expected.shape[-1] :], expected, atol=ATOL, rtol=0)
            assert torch.all(ours[:, : ours.shape[-1] - WINDOW] == 0)


@pytest.mark.parametrize("chunk", [reads.ROW_CHUNK_ELEMENTS, 1])
def test_pattern_scores_in_row_chunks_match_eager_maps(handle, monkeypatch, chunk):
    monkeypatch.setattr(reads, "ROW_CHUNK_ELEMENTS", chunk)  # 1: one query row at a time
    batch = T.make_batch(handle, prompts())
    keys = torch.zeros(batch.size, batch.width, dtype=torch.bool)
    keys[:, batch.width - 30 : batch.width - 20] = True  # ten key columns, mid-prompt
    after = torch.zeros_like(keys)
    after[:, batch.width - 20 :] = True
    pairs = torch.zeros(batch.size, batch.width, batch.width, dtype=torch.bool)
    pairs[:, 1:, :-1] = torch.eye(batch.width - 1, dtype=torch.bool)  # previous token
    capture = T.AttentionPatternScores(
        [0, 1], patterns={"keys": keys, "previous": pairs}, row_masks={"keys": after, "previous": batch.valid()}
    )  # fmt: skip
    result = T.forward(handle, batch, [capture], logits_at=None)
    with torch.no_grad():
        maps = mistral("eager")(**batch.model_inputs(), output_attentions=True).attentions
    real = batch.valid()
    for layer in (0, 1):
        probs = maps[layer]  # [b, H, s, s]
        counted = after & real
        mass = (probs * keys[:, None, None]).sum(-1)
        expected = (mass * counted[:, None]).sum(-1) / counted.sum(-1, keepdim=True)
        torch.testing.assert_close(result.get("keys", layer), expected, atol=ATOL, rtol=0)
        mass = (probs * pairs[:, None]).sum(-1)
        expected = (mass * real[:, None]).sum(-1) / real.sum(-1, keepdim=True)
        torch.testing.assert_close(result.get("previous", layer), expected, atol=ATOL, rtol=0)


def test_rows_of_a_bfloat16_model_are_float32_and_close_to_float32(handle):
    batch = T.make_batch(handle, prompts())
    rows = T.AttentionRows([0, 1], [-1], output="probs")
    full = T.forward(handle, batch, [rows])
    handle.hf_model.to(torch.bfloat16)
    try:
        half = T.forward(handle, batch, [rows])
    finally:
        handle.hf_model.to(torch.float32)
    for layer in (0, 1):
        assert half.get("rows", layer).dtype == torch.float32
        torch.testing.assert_close(
            half.get("rows", layer), full.get("rows", layer), atol=0.05, rtol=0
        )


def test_lengths_the_model_cannot_take_are_clear_errors(handle):
    with pytest.raises(Exception, match="allows at most 256 positions"):
        T.make_batch(handle, [[5] * 257])
    with pytest.raises(Exception, match="prompt plus generated tokens has 260 tokens"):
        T.generate(handle, T.make_batch(handle, [[5] * 250]), 10)
