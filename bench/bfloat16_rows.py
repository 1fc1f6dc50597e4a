"""Where bfloat16 changes a head's attention argmax, on smollm2-135m.

    .venv/bin/python bench/bfloat16_rows.py            # the default scoring tests
    .venv/bin/python bench/bfloat16_rows.py --small    # one short test, to check it runs

Each needle test's prompt plus its answer is run once through the model in float32
and once in bfloat16. For the rows retrieval scoring reads (the last prompt token
and every answer token, each layer and head), the attention argmax of the float32
model is the reference, and two bfloat16 variants are compared with it:

- `bfloat16 q.k`: the query and key the bfloat16 model computes, multiplied in
  float32 (what headscope does for a bfloat16 model);
- `float32 q.k from the bfloat16 residual`: the bfloat16 model's residual stream
  at the layer's input, then the layer's norm, query and key projections and
  rotary embedding all redone in float32 with float32 weights.

If the second disagrees almost as often as the first, the rows are not where
bfloat16 loses precision: the bfloat16 forward pass itself is, and only a float32
model gives float32 argmaxes. Numbers go to docs/results/scale.md, part (d).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from scale import _model, _tests  # noqa: E402


def _layer_inputs(model: torch.nn.Module, ids: torch.Tensor) -> list[dict]:
    """Per layer: the residual stream entering it and its rotary (cos, sin)."""
    seen: list[dict] = [{} for _ in model.model.layers]
    hooks = []
    for index, layer in enumerate(model.model.layers):

        def keep(_module, args, kwargs, index=index):
            residual = args[0] if args else kwargs["hidden_states"]
            seen[index].update(residual=residual, rotary=kwargs["position_embeddings"])

        hooks.append(layer.register_forward_pre_hook(keep, with_kwargs=True))
    try:
        with torch.no_grad():
            model(ids, logits_to_keep=1)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def _row_argmax(layer, residual, rotary, rows: slice, dtype: torch.dtype) -> torch.Tensor:
    """Attention argmax [heads, rows] of one layer, its q and k computed in `dtype`."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    attention = layer.self_attn
    d = attention.head_dim
    with torch.no_grad():
        x = layer.input_layernorm(residual.to(dtype))  # the layer's own dtype
        q = torch.nn.functional.linear(x, attention.q_proj.weight.to(dtype))
        k = torch.nn.functional.linear(x, attention.k_proj.weight.to(dtype))
        q = q.view(1, x.shape[1], -1, d).transpose(1, 2)
        k = k.view(1, x.shape[1], -1, d).transpose(1, 2)
        cos, sin = rotary
        q, k = apply_rotary_pos_emb(q, k, cos.to(dtype), sin.to(dtype))
        q = q.float()[:, :, rows]
        k = k.float().repeat_interleave(q.shape[1] // k.shape[1], 1)
        logits = q @ k.transpose(-1, -2) * attention.scaling
        n, width = logits.shape[-2], logits.shape[-1]
        causal = torch.arange(width)[None, :] <= torch.arange(width - n, width)[:, None]
        return logits.masked_fill(~causal, float("-inf")).argmax(-1)[0]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--small", action="store_true", help="one short test")
    args = parser.parse_args()
    handle = _model()
    full = handle.hf_model
    half = copy.deepcopy(full).to(torch.bfloat16)
    lengths, depths = ([300], [50]) if args.small else ([500, 1000, 2000], [10, 50, 90])
    tests = _tests(handle, lengths, depths)[: 1 if args.small else None]
    differ = {"bfloat16 q.k": 0, "float32 q.k from the bfloat16 residual": 0}
    rows_read = 0
    for test in tests:
        ids = torch.tensor([test.prompt_ids + test.answer_ids])
        rows = slice(len(test.prompt_ids) - 1, ids.shape[1] - 1)  # rows that predict
        ours, theirs = _layer_inputs(full, ids), _layer_inputs(half, ids)
        for index, layer in enumerate(full.model.layers):
            reference = _row_argmax(layer, **ours[index], rows=rows, dtype=torch.float32)
            native = _row_argmax(
                half.model.layers[index], **theirs[index], rows=rows, dtype=torch.bfloat16
            )
            redone = _row_argmax(layer, **theirs[index], rows=rows, dtype=torch.float32)
            differ["bfloat16 q.k"] += int((native != reference).sum())
            differ["float32 q.k from the bfloat16 residual"] += int((redone != reference).sum())
            rows_read += reference.numel()
    print(f"{len(tests)} tests, {rows_read} (layer, head, row) argmaxes read")
    for name, count in differ.items():
        print(f"  {name}: {count} differ from float32 ({100 * count / rows_read:.2f}%)")


if __name__ == "__main__":
    main()
