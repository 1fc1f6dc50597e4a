"""Attention maths on the tensors transformers passes to its attention function.

Pure PyTorch, no tracing: the tracing primitives call these at the attention-call
site, and tests check them against transformers' eager attention. Shapes follow
transformers: query [batch, H, q, d], key [batch, KV, k, d] (after rotary; keys
cover the whole cache), mask None | bool | additive float [batch, 1 or H, q, k].
Query head h reads key/value head h // (H // KV), as `repeat_kv` arranges it.
"""

from __future__ import annotations

import torch


def query_absolute_positions(
    q_len: int, k_len: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Absolute key index of each query row: the last q_len positions of the cache."""
    return torch.arange(k_len - q_len, k_len, device=device)


def additive_mask(
    mask: torch.Tensor | None,
    batch: int,
    q_len: int,
    k_len: int,
    dtype: torch.dtype,
    sliding_window: int | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The call's mask as an additive float tensor [batch, 1|H, q, k] (0 or dtype min).

    None means plain causal attention (with a sliding window when the layer has one),
    which is what transformers' sdpa path does when it passes no mask; that mask is
    built on `device` (the query's), a given mask stays on its own.
    """
    minimum = torch.finfo(dtype).min
    if mask is None:
        rows = query_absolute_positions(q_len, k_len, device)[:, None]
        cols = torch.arange(k_len, device=device)[None, :]
        allowed = cols <= rows
        if sliding_window is not None:
            allowed &= cols > rows - sliding_window
        out = torch.zeros(q_len, k_len, dtype=dtype, device=device).masked_fill(~allowed, minimum)
        return out.expand(batch, 1, q_len, k_len)
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, minimum)
    return mask.to(dtype)


def select_rows(tensor: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Gather query rows per batch element: tensor [b, X, q, ...], rows [b, n] -> [b, X, n, ...]."""
    b, x = tensor.shape[:2]
    index = rows.to(tensor.device)[:, None, :].expand(b, x, rows.shape[1])
    extra = tensor.shape[3:]
    for _ in extra:
        index = index.unsqueeze(-1)
    index = index.expand(b, x, rows.shape[1], *extra)
    return torch.gather(tensor, 2, index)


def attention_logits(
    query: torch.Tensor,
    key: torch.Tensor,
    scaling: float,
    rows: torch.Tensor | None = None,
    heads: list[int] | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Pre-mask logits q.k * scaling for chosen query rows: [b, len(heads) or H, n, k].

    Only the requested rows are computed, so the cost is O(H * n * k * d) and the
    full [H, q, k] map is never built.
    """
    b, n_heads, q_len, d = query.shape
    n_kv = key.shape[1]
    group = n_heads // n_kv
    q = query if rows is None else select_rows(query, rows)
    n = q.shape[2]
    # a query group's rows stacked against their shared key head: one batched
    # matmul, without copying the key once per query head
    q = q.float().reshape(b, n_kv, group * n, d)
    logits = torch.matmul(q, key.float().transpose(-1, -2)).view(b, n_heads, n, key.shape[2])
    logits = logits * scaling
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if heads is not None:
        logits = logits[:, heads]
    return logits


def mask_rows(
    mask: torch.Tensor | None,
    rows: torch.Tensor,
    q_len: int,
    k_len: int,
    dtype: torch.dtype = torch.float32,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """The additive mask for chosen query rows only: [b, 1|H, n, k].

    Builds just the rows needed, so reading one row of a long prompt costs O(k).
    """
    minimum = torch.finfo(dtype).min
    if mask is None:  # built where `rows` lives
        absolute = rows + (k_len - q_len)  # [b, n]
        cols = torch.arange(k_len, device=rows.device)[None, None, :]
        allowed = cols <= absolute[:, :, None]
        if sliding_window is not None:
            allowed &= cols > absolute[:, :, None] - sliding_window
        out = torch.zeros(allowed.shape, dtype=dtype, device=rows.device)
        return out.masked_fill(~allowed, minimum)[:, None]
    picked = select_rows(mask, rows)
    if picked.dtype == torch.bool:
        zeros = torch.zeros(picked.shape, dtype=dtype, device=picked.device)
        return zeros.masked_fill(~picked, minimum)
    return picked.to(dtype)


def attention_probabilities(
    query: torch.Tensor,
    key: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    rows: torch.Tensor | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Softmax attention rows [b, H, n, k] in float32, as eager attention computes them."""
    logits = masked_logits(query, key, mask, scaling, rows, sliding_window, softcap)
    return torch.softmax(logits, dim=-1)


def masked_logits(
    query: torch.Tensor,
    key: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    rows: torch.Tensor | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Logits plus mask for chosen rows; their argmax is the attention argmax."""
    b, _, q_len, _ = query.shape
    if rows is None:
        rows = torch.arange(q_len, device=query.device).expand(b, q_len)
    logits = attention_logits(query, key, scaling, rows, softcap=softcap)
    return logits + mask_rows(mask, rows, q_len, key.shape[2], torch.float32, sliding_window)


def streaming_keys(
    query_positions: torch.Tensor, key_positions: torch.Tensor, sink: int, window: int
) -> torch.Tensor:
    """Which keys a streaming head keeps (StreamingLLM, RazorAttention, DuoAttention):
    bool [..., q, k] for token positions [..., q] and [..., k] of one sequence.

    A query keeps the first `sink` tokens and the `window` most recent ones (itself
    included), causally. Positions count real tokens from 0; padding is negative and
    never kept.
    """
    query = query_positions[..., :, None]
    key = key_positions[..., None, :]
    return (key >= 0) & (key <= query) & ((key < sink) | (key > query - window))
