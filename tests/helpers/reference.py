"""Independent plain-PyTorch references for the tracing primitives.

Nothing here uses headscope's adapters or nnsight: module paths are spelled out per
family, edits are forward hooks on the transformers model, attention maps come from
eager attention with output_attentions=True, and steering is a hand-written eager
attention function registered with transformers.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from headscope.core.tiny import TINY_FAMILIES, build_tiny_model

FAMILIES = TINY_FAMILIES


def eager_model(family: str, implementation: str = "eager") -> torch.nn.Module:
    return build_tiny_model(family, attn_implementation=implementation)


def out_proj(model: torch.nn.Module, family: str, layer: int) -> torch.nn.Module:
    if family == "gpt2":
        return model.transformer.h[layer].attn.c_proj
    return model.model.layers[layer].self_attn.o_proj


def q_proj(model: torch.nn.Module, family: str, layer: int) -> torch.nn.Module:
    if family == "gpt2":
        return model.transformer.h[layer].attn.c_attn  # q is the first third
    if family == "phi3":
        return model.model.layers[layer].self_attn.qkv_proj  # q comes first
    return model.model.layers[layer].self_attn.q_proj


def dims(model: torch.nn.Module) -> tuple[int, int]:
    """(query heads, head dim)."""
    config = model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, head_dim


@contextlib.contextmanager
def hooks(pairs: list[tuple[torch.nn.Module, Callable]], pre: bool = True) -> Iterator[None]:
    handles = [
        m.register_forward_pre_hook(fn) if pre else m.register_forward_hook(fn) for m, fn in pairs
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def capture_o_inputs(model, family, inputs, layers) -> dict[int, torch.Tensor]:
    """Per-head outputs [b, s, H, hd] at each layer via forward pre-hooks."""
    heads, head_dim = dims(model)
    seen: dict[int, torch.Tensor] = {}

    def grab(layer):
        def fn(module, args):
            x = args[0]
            seen[layer] = x.detach().clone().view(*x.shape[:2], heads, head_dim)

        return fn

    with hooks([(out_proj(model, family, layer), grab(layer)) for layer in layers]):
        with torch.no_grad():
            model(**inputs)
    return seen


def replace_heads_hook(
    heads: list[int], head_dim: int, values: Callable[[torch.Tensor, int], torch.Tensor]
):
    """A pre-hook that overwrites head slices of the o_proj input."""

    def fn(module, args):
        x = args[0].clone()
        for head in heads:
            cols = slice(head * head_dim, (head + 1) * head_dim)
            x[..., cols] = values(x[..., cols], head)
        return (x,) + tuple(args[1:])

    return fn


def zero_query_hook(heads: list[int], head_dim: int):
    """A forward hook zeroing head slices of the query projection output."""

    def fn(module, args, output):
        output = output.clone()
        for head in heads:
            output[..., head * head_dim : (head + 1) * head_dim] = 0
        return output

    return fn


# ---------------------------------------------------------------------------------
# Steering reference: eager attention with a bias written out by hand
# ---------------------------------------------------------------------------------
BIAS_SPEC: dict = {}


def _biased_eager(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    softcap = kwargs.get("softcap")
    if softcap is not None:  # Gemma 2 caps the logits before the mask
        weights = torch.tanh(weights / softcap) * softcap
    spec = BIAS_SPEC.get(module.layer_idx)
    if spec is not None:
        bias = torch.zeros_like(weights)
        q_len, k_len = weights.shape[2], weights.shape[3]
        first_query = k_len - q_len
        for head in spec["heads"]:
            for row in range(q_len):
                if spec["query_from"] is not None and first_query + row < spec["query_from"]:
                    continue
                for col in spec["keys"]:
                    z = weights[:, head, row, col]
                    bias[:, head, row, col] = (
                        spec["value"] if spec["mode"] == "add" else spec["value"] * z.abs()
                    )
        weights = weights + bias
    if attention_mask is not None:
        weights = weights + attention_mask
    probs = torch.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    if spec is not None and "sinks" in spec:
        probs = _rescale_sinks(probs, spec)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return out, probs


def _rescale_sinks(probs, spec):
    """ACT by hand, after the softmax: sink attention x beta, the rest scaled up so
    each row still sums to 1. spec["sinks"] = {head: [key columns]}."""
    probs = probs.clone()
    q_len, k_len = probs.shape[2], probs.shape[3]
    first_query = k_len - q_len
    for head, cols in spec["sinks"].items():
        for row in range(q_len):
            if spec["query_from"] is not None and first_query + row < spec["query_from"]:
                continue
            p = probs[:, head, row]
            sink = torch.zeros(k_len, dtype=torch.bool)
            sink[[c for c in cols if c < k_len]] = True
            mass = p[:, sink].sum(-1, keepdim=True)
            scaled = torch.where(sink, spec["beta"] * p, p * (1 - spec["beta"] * mass) / (1 - mass))
            probs[:, head, row] = scaled
    return probs


AttentionInterface.register("hs_reference_bias", _biased_eager)
AttentionMaskInterface.register("hs_reference_bias", eager_mask)


RECORDED: dict = {}


def _recording_eager(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Eager attention that keeps the query/key/mask it was given, per layer."""
    RECORDED[module.layer_idx] = {
        "query": query,
        "key": key,
        "mask": attention_mask,
        "scaling": scaling,
    }
    spec, BIAS_SPEC_SAVED = BIAS_SPEC.pop(module.layer_idx, None), None
    try:
        return _biased_eager(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    finally:
        if spec is not None:
            BIAS_SPEC[module.layer_idx] = spec
        del BIAS_SPEC_SAVED


AttentionInterface.register("hs_reference_record", _recording_eager)
AttentionMaskInterface.register("hs_reference_record", eager_mask)


def recording_model(family: str) -> torch.nn.Module:
    return build_tiny_model(family, attn_implementation="hs_reference_record")


def biased_model(family: str) -> torch.nn.Module:
    return build_tiny_model(family, attn_implementation="hs_reference_bias")


def greedy(model, input_ids, steps, attention_mask=None, **kwargs):
    """Plain transformers greedy decoding: the generated ids and per-step attentions."""
    with torch.no_grad():
        out = model.generate(
            input_ids,
            attention_mask=attention_mask,
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            pad_token_id=1,
            return_dict_in_generate=True,
            **kwargs,
        )
    return out


def local_and_remote(handle, primitive: Callable, *args, **kwargs) -> tuple:
    """`primitive(handle, *args, **kwargs)` run locally, then again through nnsight's
    remote="local" path (the trace serialised and executed as a remote server would)."""
    local = primitive(handle, *args, **kwargs)
    handle.remote = "local"
    try:
        return local, primitive(handle, *args, **kwargs)
    finally:
        handle.remote = False


def assert_rows_match_eager(handle, text: str, layers: list[int], positions: list[int]) -> None:
    """AttentionRows on a real model equal the eager attention maps of transformers."""
    from transformers import AutoModelForCausalLM

    from headscope.core import tracing as T

    batch = T.make_batch(handle, [text])
    ours = T.forward(handle, batch, [T.AttentionRows(layers, positions, output="probs")])
    eager = AutoModelForCausalLM.from_pretrained(handle.cache_path, attn_implementation="eager")
    with torch.no_grad():
        ref = eager(**batch.model_inputs(), output_attentions=True).attentions
    cols = batch.absolute(positions)[0]
    for layer in layers:
        torch.testing.assert_close(
            ours.get("rows", layer)[0], ref[layer][0][:, cols], atol=1e-4, rtol=0
        )


# ---------------------------------------------------------------------------------
# Streaming reference: eager attention with each streaming head's keys written out
# ---------------------------------------------------------------------------------
#: layer -> {"heads": query heads, "sink", "window", "pads": per row, "compensate"}
STREAM_SPEC: dict = {}


def _streaming_eager(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Full-sequence eager attention (no cache: query i is key i); streaming heads keep
    keys real position < sink or > query - window, and with `compensate` one extra
    key/value, the mean of the dropped keys the model's mask allows, weighted by count."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1).float()
    value = value.repeat_interleave(groups, dim=1).float()
    query = query.float()
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    softcap = kwargs.get("softcap")
    if softcap is not None:
        weights = torch.tanh(weights / softcap) * softcap
    allowed = torch.ones_like(weights, dtype=torch.bool)
    if attention_mask is not None:
        allowed = (attention_mask == 0).expand_as(weights).clone()
    minimum = torch.finfo(weights.dtype).min  # padded query rows stay finite
    out = torch.matmul(torch.softmax(weights.masked_fill(~allowed, minimum), -1), value)
    spec = STREAM_SPEC.get(module.layer_idx)
    if spec is not None:
        n = weights.shape[2]
        assert n == weights.shape[3], "the reference runs without a cache"
        for b, pad in enumerate(spec["pads"]):
            for h in spec["heads"]:
                for i in range(pad, n):
                    q_pos = i - pad
                    kept, dropped = [], []
                    for j in range(pad, i + 1):
                        if not allowed[b, h, i, j]:
                            continue
                        k_pos = j - pad
                        if k_pos < spec["sink"] or k_pos > q_pos - spec["window"]:
                            kept.append(j)
                        else:
                            dropped.append(j)
                    logits = weights[b, h, i, kept]
                    values = value[b, h, kept]
                    if spec["compensate"] and dropped:
                        k_mean = key[b, h, dropped].mean(0)
                        extra = (query[b, h, i] @ k_mean) * scaling
                        if softcap is not None:
                            extra = torch.tanh(extra / softcap) * softcap
                        logits = torch.cat([logits, (extra + math.log(len(dropped)))[None]])
                        values = torch.cat([values, value[b, h, dropped].mean(0)[None]])
                    out[b, h, i] = torch.softmax(logits, -1) @ values
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register("hs_reference_streaming", _streaming_eager)
AttentionMaskInterface.register("hs_reference_streaming", eager_mask)


def streaming_model(family: str) -> torch.nn.Module:
    return build_tiny_model(family, attn_implementation="hs_reference_streaming")


def greedy_without_cache(model, input_ids, attention_mask, steps: int):
    """Greedy decoding that reruns the whole sequence each step: every token is a
    prefill query, so a reference attention needs no cache bookkeeping. Returns the
    generated ids [b, steps] and the last-position logits of every step."""
    ids, mask, logits = input_ids, attention_mask, []
    with torch.no_grad():
        for _ in range(steps):
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
            last = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits[
                :, -1
            ]
            logits.append(last)
            ids = torch.cat([ids, last.argmax(-1, keepdim=True)], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return ids[:, input_ids.shape[1] :], torch.stack(logits, 1)


def last_row_argmax(handle, prompts: list[list[int]]) -> list[torch.Tensor]:
    """Each prompt's last-row attention argmax in layer 1 [H, 1], in its own positions:
    a batch step that can run on a server (helpers ship by value; test modules do not)."""
    from headscope.core import tracing as T

    batch = T.make_batch(handle, prompts)
    result = T.forward(handle, batch, [T.AttentionRows([0, 1], [-1], output="argmax")])
    return [result.get("rows", 1)[row] - pad for row, pad in enumerate(batch.pads)]
