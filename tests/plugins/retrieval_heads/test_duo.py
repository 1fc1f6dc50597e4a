"""DuoAttention's gates: the gated attention against hand-written attention, training
that touches only the gates, a planted head that needs its cache, and bad settings."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from headscope.core.errors import ContextTooLongError, InvalidParamsError
from headscope.core.models import load_model
from headscope.plugins.retrieval_heads import duo
from headscope.plugins.retrieval_heads.duo import (
    DuoSettings,
    PasskeyPrompts,
    frozen,
    gated_attention,
    lr_factor,
    train_gates,
)
from headscope.plugins.retrieval_heads.needles import load_haystack

from helpers.models import tiny_handle
from helpers.reference import capture_o_inputs

#: small enough for the tiny models' 512 positions and byte tokenizer
TINY = {"length": 320, "sink": 2, "window": 8, "passkeys": 1, "passkey_words": 3}
IDS = torch.randint(2, 250, (2, 48), generator=torch.Generator().manual_seed(0))


def fresh_tiny(family: str = "llama"):
    """A handle of its own: tests that edit weights must not share the cached one."""
    return load_model(f"tiny-{family}")


# -- the gated attention ---------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "gemma3", "gpt2"])
def test_gates_of_one_are_the_models_own_attention(family):
    handle = tiny_handle(family)
    model = handle.hf_model
    layers = list(range(handle.n_layers))
    plain = capture_o_inputs(model, family, {"input_ids": IDS}, layers)
    with torch.no_grad():
        plain_logits = model(input_ids=IDS).logits
    ones = torch.ones(handle.n_layers, handle.n_kv_heads)
    with gated_attention(model, handle.adapter, ones, sink=2, window=4):
        gated = capture_o_inputs(model, family, {"input_ids": IDS}, layers)
        with torch.no_grad():
            gated_logits = model(input_ids=IDS).logits
    for layer in layers:
        torch.testing.assert_close(gated[layer], plain[layer], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gated_logits, plain_logits, atol=1e-5, rtol=1e-4)


def hand_attention(attention, hidden, cos, sin, gates, sink, window):
    """Tiny Llama's attention written out: full and streaming masks by loops, mixed per
    KV head by `gates` [KV]; the input of o_proj [b, seq, H * hd]."""
    b, length, _ = hidden.shape
    heads, kv_heads, head_dim = 4, 2, 16
    q = attention.q_proj(hidden).view(b, length, heads, head_dim).transpose(1, 2)
    k = attention.k_proj(hidden).view(b, length, kv_heads, head_dim).transpose(1, 2)
    v = attention.v_proj(hidden).view(b, length, kv_heads, head_dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    group = heads // kv_heads
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
    causal = torch.zeros(length, length, dtype=torch.bool)
    streaming = torch.zeros(length, length, dtype=torch.bool)
    for query in range(length):
        for key in range(query + 1):
            causal[query, key] = True
            streaming[query, key] = key < sink or query - key < window
    full = torch.softmax(scores.masked_fill(~causal, -math.inf), dim=-1) @ v
    streamed = torch.softmax(scores.masked_fill(~streaming, -math.inf), dim=-1) @ v
    alpha = gates.repeat_interleave(group).view(1, heads, 1, 1)
    mixed = alpha * full + (1 - alpha) * streamed
    return mixed.transpose(1, 2).reshape(b, length, heads * head_dim)


@pytest.mark.parametrize("gate_values", ["zeros", "mixed"])
def test_gated_attention_equals_hand_written_masked_attention(gate_values):
    handle = tiny_handle("llama")
    model = handle.hf_model
    if gate_values == "zeros":
        gates = torch.zeros(handle.n_layers, handle.n_kv_heads)
    else:
        gates = torch.tensor([[1.0, 0.0], [0.25, 0.75], [0.0, 0.5]])
    sink, window = 3, 5
    inputs: dict[int, dict] = {}

    def keep(layer):
        def fn(module, args, kwargs):
            inputs[layer] = kwargs

        return fn

    layers = list(range(handle.n_layers))
    attention = [model.model.layers[layer].self_attn for layer in layers]
    pre = [(attention[layer], keep(layer)) for layer in layers]
    handles = [m.register_forward_pre_hook(fn, with_kwargs=True) for m, fn in pre]
    try:
        with gated_attention(model, handle.adapter, gates, sink, window):
            gated = capture_o_inputs(model, "llama", {"input_ids": IDS}, layers)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        for layer in layers:
            cos, sin = inputs[layer]["position_embeddings"]
            expected = hand_attention(
                attention[layer],
                inputs[layer]["hidden_states"],
                cos,
                sin,
                gates[layer],
                sink,
                window,
            )
            got = gated[layer].reshape(expected.shape)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_streaming_changes_what_the_model_computes():
    """The hand-written check above is not vacuous: gates of 0 differ from full attention."""
    handle = tiny_handle("llama")
    model = handle.hf_model
    with torch.no_grad():
        plain = model(input_ids=IDS).logits
        with gated_attention(model, handle.adapter, torch.zeros(3, 2), sink=2, window=4):
            streamed = model(input_ids=IDS).logits
    assert (plain - streamed).abs().max() > 1e-2


def test_gates_of_the_wrong_shape_are_refused():
    handle = tiny_handle("llama")
    with pytest.raises(InvalidParamsError, match="shape"):
        with gated_attention(handle.hf_model, handle.adapter, torch.ones(2, 2), 2, 4):
            pass


def test_gradients_reach_only_the_gates():
    handle = tiny_handle("llama")
    model = handle.hf_model
    flags = [p.requires_grad for p in model.parameters()]
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    gates = torch.nn.Parameter(torch.full((3, 2), 0.5))
    try:
        with frozen(model), gated_attention(model, handle.adapter, gates, sink=2, window=4):
            model(input_ids=IDS).logits.pow(2).mean().backward()
        assert all(p.requires_grad for p in model.parameters())  # the flags came back
    finally:
        for parameter, flag in zip(model.parameters(), flags, strict=True):
            parameter.requires_grad_(flag)
    assert gates.grad is not None and gates.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


# -- training --------------------------------------------------------------------------


def snapshot(model):
    return {name: value.clone() for name, value in model.state_dict().items()}


def test_training_leaves_the_model_as_it_was():
    handle = tiny_handle("llama")
    model = handle.hf_model
    weights = snapshot(model)
    flags = [p.requires_grad for p in model.parameters()]
    implementation = model.config._attn_implementation
    with torch.no_grad():
        before = model(input_ids=IDS).logits
    gates = train_gates(handle, DuoSettings(steps=3, **TINY), np.random.default_rng(0))
    with torch.no_grad():
        after = model(input_ids=IDS).logits
    assert torch.equal(before, after)
    assert all(torch.equal(weights[n], v) for n, v in model.state_dict().items())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert model.config._attn_implementation == implementation
    assert not model.training
    assert not duo._SITES
    assert gates.shape == (3, 2) and gates.dtype == torch.float32
    assert ((gates >= 0) & (gates <= 1)).all()


def test_an_error_during_training_restores_the_model():
    handle = tiny_handle("llama")
    model = handle.hf_model
    implementation = model.config._attn_implementation
    flags = [p.requires_grad for p in model.parameters()]

    def stop(step, steps):
        raise RuntimeError("stopped")

    with pytest.raises(RuntimeError, match="stopped"):
        train_gates(handle, DuoSettings(steps=3, **TINY), np.random.default_rng(0), stop)
    assert model.config._attn_implementation == implementation
    assert [p.requires_grad for p in model.parameters()] == flags
    assert not duo._SITES


def test_progress_is_reported_per_step():
    seen = []
    train_gates(
        tiny_handle("llama"),
        DuoSettings(steps=4, **TINY),
        np.random.default_rng(0),
        lambda step, steps: seen.append((step, steps)),
    )
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_results_are_reproducible_for_a_seed():
    handle = tiny_handle("llama")
    settings = DuoSettings(steps=4, **TINY)
    first = train_gates(handle, settings, np.random.default_rng(7))
    again = train_gates(handle, settings, np.random.default_rng(7))
    other = train_gates(handle, settings, np.random.default_rng(8))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_a_head_that_streaming_hurts_keeps_a_higher_gate():
    """KV head 1's values are zero in every layer, so streaming it changes nothing and
    the L1 term drives its gate to 0; KV head 0 carries what the answers need."""
    handle = fresh_tiny("llama")
    model = handle.hf_model
    head_dim = handle.head_dim
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.v_proj.weight[head_dim : 2 * head_dim] = 0
    settings = DuoSettings(steps=40, lr=0.1, **TINY)
    gates = train_gates(handle, settings, np.random.default_rng(0))
    free, needed = gates[:, 1], gates[:, 0]
    assert free.max() < 0.05
    assert needed.mean() > free.mean() + 0.3
    assert (needed > free).all()


def test_lr_schedule_ramps_up_and_down_and_never_below_a_tenth():
    factors = [lr_factor(step, 50) for step in range(50)]
    assert factors[0] == pytest.approx(0.1)
    assert factors[9] == 1.0 and factors[25] == 1.0
    assert factors[-1] == pytest.approx(0.1)
    assert min(factors) >= 0.1
    assert factors[:10] == sorted(factors[:10])


# -- passkey prompts -------------------------------------------------------------------


def test_passkey_prompts_have_the_length_and_ask_each_passkey_in_order():
    handle = tiny_handle("llama")
    settings = DuoSettings(**{**TINY, "passkeys": 2, "length": 500})
    prompts = PasskeyPrompts(handle.tokenizer, load_haystack(), settings)
    prompt = prompts.sample(np.random.default_rng(3))
    assert len(prompt.ids) == settings.length
    text = handle.tokenizer.decode(prompt.ids)
    context = handle.tokenizer.decode(prompt.ids[: prompt.answers_start])
    answers = handle.tokenizer.decode(prompt.ids[prompt.answers_start :])
    assert text == context + answers
    for ordinal, passkey in zip(["first", "second"], prompt.passkeys, strict=True):
        assert len(passkey.split()) == settings.passkey_words
        assert f"The {ordinal} passkey to the vault is: {passkey}." in context
        assert f"The {ordinal} passkey is {passkey}." in answers
    assert answers.index("first") < answers.index("second")


def test_passkey_prompts_differ_by_seed():
    handle = tiny_handle("llama")
    prompts = PasskeyPrompts(handle.tokenizer, load_haystack(), DuoSettings(**TINY))
    first = prompts.sample(np.random.default_rng(1))
    assert prompts.sample(np.random.default_rng(1)) == first
    assert prompts.sample(np.random.default_rng(2)) != first


# -- bad settings ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "values, match",
    [
        ({"sink": 200, "window": 200, "length": 300}, "sink .* window .* smaller than length"),
        ({"window": 0}, "window"),
        ({"steps": 0}, "steps"),
        ({"lr": 0}, "lr"),
        ({"l1": -1}, "l1"),
        ({"passkeys": 11}, "passkeys"),
        ({"gates": 3}, "gates"),
    ],
)
def test_invalid_settings_are_refused_by_name(values, match):
    with pytest.raises(ValidationError, match=match):
        DuoSettings(**values)


def test_a_prompt_longer_than_the_model_is_refused():
    handle = tiny_handle("llama")
    with pytest.raises(ContextTooLongError, match="512"):
        train_gates(handle, DuoSettings(**{**TINY, "length": 600}), np.random.default_rng(0))


def test_a_prompt_without_room_for_haystack_is_refused():
    handle = tiny_handle("llama")
    settings = DuoSettings(**{**TINY, "passkeys": 4, "passkey_words": 20, "length": 300})
    with pytest.raises(InvalidParamsError, match="no room for haystack"):
        train_gates(handle, settings, np.random.default_rng(0))


def test_a_remote_model_is_refused():
    handle = tiny_handle("llama")
    handle.remote = True
    try:
        with pytest.raises(InvalidParamsError, match="local model"):
            train_gates(handle, DuoSettings(**TINY), np.random.default_rng(0))
    finally:
        handle.remote = False


# -- the embedded default model --------------------------------------------------------


@pytest.mark.real_model
def test_gates_of_one_on_smollm2_are_its_own_attention(smollm2):
    model = smollm2.hf_model
    ids = torch.tensor(
        [smollm2.tokenizer("The capital of France is Paris. The capital of")["input_ids"]]
    )
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        ones = torch.ones(smollm2.n_layers, smollm2.n_kv_heads)
        with gated_attention(model, smollm2.adapter, ones, sink=2, window=4):
            gated = model(input_ids=ids).logits
    torch.testing.assert_close(gated, plain, atol=1e-4, rtol=1e-4)
    assert gated[0, -1].argmax() == plain[0, -1].argmax()
