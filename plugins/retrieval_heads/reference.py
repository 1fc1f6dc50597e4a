"""The naive reference for retrieval scoring: full attention maps from transformers.

Asks transformers' eager attention for every attention map during greedy
generation (`output_attentions=True`: the full [heads, seq, seq] maps at the
prefill, one row per head at each decode step) and takes each row's argmax.
Independent of headscope's tracing; used by tests and `bench/retrieval_heads.py`
to check that the fast path gives identical scores.
"""

from __future__ import annotations

import copy

import torch

from .analysis import copy_paste_scores
from .needles import NeedleTest


def eager_copy(handle) -> torch.nn.Module:
    """A private copy of the model running transformers' eager attention."""
    model = copy.deepcopy(handle.hf_model)
    model.set_attn_implementation("eager")
    return model.eval()


def reference_argmax(
    model, test: NeedleTest, max_new_tokens: int, stop_ids: list[int], pad_id: int
):
    """Greedy tokens and per-step attention argmax [steps, layers, heads]."""
    input_ids = torch.tensor([test.prompt_ids], device=model.device)
    with torch.no_grad():
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=stop_ids or None,
            pad_token_id=pad_id,
            output_attentions=True,
            return_dict_in_generate=True,
        )
    generated = out.sequences[0, input_ids.shape[1] :].tolist()
    for index, token in enumerate(generated):
        if token in stop_ids:
            generated = generated[: index + 1]
            break
    steps = []
    for step in range(len(generated)):
        layers = [attention[0, :, -1].argmax(-1).cpu() for attention in out.attentions[step]]
        steps.append(torch.stack(layers))
    return generated, torch.stack(steps)


def reference_scores(
    model, test: NeedleTest, max_new_tokens: int, stop_ids: list[int], pad_id: int
):
    """Generated tokens and the per-head copy-paste scores of one test, the naive way."""
    generated, argmax = reference_argmax(model, test, max_new_tokens, stop_ids, pad_id)
    return generated, copy_paste_scores(argmax, generated, test.prompt_ids, test.answer_span)
