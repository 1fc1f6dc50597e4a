"""The published way of scoring retrieval heads, written plainly for comparison.

As in Wu et al.'s code (nightdessert/Retrieval_Head): the prompt but its last
token is prefilled with the model's fast attention and no attention maps; then
the model decodes one token at a time with eager attention and
`output_attentions=True`, and each head's attention argmax is read from the last
row of its map. One prompt at a time. The prefill keeps only the last logits
(as headscope does), so both sides pay the same for the vocabulary.
"""

from __future__ import annotations

import inspect

import torch


def published_argmax(
    model: torch.nn.Module, prompt_ids: list[int], max_new_tokens: int, stop_ids: list[int]
) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and each step's attention argmax [steps, layers, heads]."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], device=device)
    implementation = model.config._attn_implementation
    generated: list[int] = []
    argmax = []
    # the cache argument's name changed within transformers 5
    parameters = inspect.signature(model.forward).parameters
    cache_arg = "cache" if "cache" in parameters else "past_key_values"
    try:
        with torch.no_grad():
            model.set_attn_implementation("sdpa")
            out = model(ids[:, :-1], use_cache=True, logits_to_keep=1)
            cache = getattr(out, cache_arg)
            model.set_attn_implementation("eager")
            token = ids[:, -1:]
            for _ in range(max_new_tokens):
                out = model(token, **{cache_arg: cache}, use_cache=True, output_attentions=True)
                cache = getattr(out, cache_arg)
                chosen = int(out.logits[0, -1].argmax())
                argmax.append(torch.stack([a[0, :, -1].argmax(-1).cpu() for a in out.attentions]))
                generated.append(chosen)
                if chosen in stop_ids:
                    break
                token = torch.tensor([[chosen]], device=device)
    finally:
        model.set_attn_implementation(implementation)
    return generated, torch.stack(argmax)


def published_scores(model, test, max_new_tokens: int, stop_ids: list[int]):
    """Generated tokens and per-head copy-paste scores of one needle test."""
    from headscope.plugins.retrieval_heads.analysis import copy_paste_scores

    tokens, argmax = published_argmax(model, test.prompt_ids, max_new_tokens, stop_ids)
    return tokens, copy_paste_scores(argmax, tokens, test.prompt_ids, test.answer_span)
