"""Streaming heads: KV heads that keep only their sink tokens and a recent window.

This is how a KV-cache plan (StreamingLLM, RazorAttention, DuoAttention) is
applied: the model still computes full attention, and the outputs of the query
heads reading a streaming KV head are replaced by attention over the keys that
head would keep, at the prefill and at every decode step. The replacement is
computed band by band (a chunk of query rows against its window and the sinks),
so memory stays linear in the context and no full attention map is built.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .. import attention as attn_math
from ..errors import InvalidParamsError
from .batch import check_layers
from .sites import AttentionCall, HeadOutputSite, Intervention

#: query rows computed together; memory per chunk is rows x (rows + window + sink)
CHUNK_ROWS = 256


@dataclass
class StreamingHeads(Intervention):
    """Make chosen KV heads stream: their query heads attend only to each row's first
    `sink` real tokens and its `window` most recent tokens (itself included).

    `heads` maps layer -> KV head indices (a KV head is shared by its group of query
    heads, so a plan is made per KV head). With `compensate`, RazorAttention's
    compensation token stands in for the dropped tokens: one extra key and value,
    their means, whose attention weight counts once per dropped token. On a layer with
    a sliding window the model's own window also applies. An empty map changes nothing.
    """

    heads: Mapping[int, Sequence[int]]
    sink: int = 4
    window: int = 256
    compensate: bool = False
    _outputs: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def _layers(self) -> set[int]:
        return {int(layer) for layer, kv in self.heads.items() if kv}

    def attention_layers(self):
        return self._layers()

    def output_layers(self):
        return self._layers()

    def validate(self, handle, batch):
        if self.sink < 0:
            raise InvalidParamsError(f"streaming sink must be at least 0, got {self.sink}")
        if self.window < 1:
            raise InvalidParamsError(f"streaming window must be at least 1, got {self.window}")
        check_layers(handle, self._layers())
        for layer, kv_heads in self.heads.items():
            for kv in kv_heads:
                if not 0 <= int(kv) < handle.n_kv_heads:
                    raise InvalidParamsError(
                        f"KV head {kv} out of range 0..{handle.n_kv_heads - 1} (layer {layer})"
                    )

    def query_heads(self, layer: int, n_heads: int, n_kv: int) -> list[int]:
        group = n_heads // n_kv
        return [
            h
            for kv in sorted(self.heads.get(layer, ()))
            for h in range(kv * group, (kv + 1) * group)
        ]

    def at_attention(self, call: AttentionCall, record: dict) -> None:
        heads = self.query_heads(call.layer, call.query.shape[1], call.key.shape[1])
        if heads:
            self._outputs[call.layer] = streaming_attention(
                call, heads, self.sink, self.window, self.compensate
            )

    def at_head_output(self, site: HeadOutputSite, record: dict) -> None:
        out = self._outputs.pop(site.layer, None)
        if out is None:
            return
        heads = self.query_heads(
            site.layer, site.plan.adapter.n_heads, site.plan.adapter.n_kv_heads
        )
        site.edit()[:, :, heads] = out.transpose(1, 2).to(site.value.dtype)


def streaming_attention(
    call: AttentionCall, heads: list[int], sink: int, window: int, compensate: bool
) -> torch.Tensor:
    """Attention outputs [b, len(heads), q, d] of query heads `heads` restricted to
    the keys `attn_math.streaming_keys` keeps, in float32, chunk by chunk."""
    query, key, value = call.query, call.key, call.value
    b, n_heads, q_len, _ = query.shape
    kv_of = torch.tensor([h // (n_heads // key.shape[1]) for h in heads], device=call.device)
    q = query[:, heads].float()
    k = key.float()[:, kv_of]  # [b, h, k, d]
    v = value.float()[:, kv_of]
    pads = torch.tensor(call.plan.batch.pads, device=call.device)  # [b]
    first_query = call.k_len - q_len  # key index of query row 0
    key_real = lambda j: j + call.key_offset - pads[:, None]  # noqa: E731  [b, n] real positions
    sinks = (pads[:, None] + torch.arange(sink, device=call.device)[None]) - call.key_offset
    if compensate:
        zero = torch.zeros_like(k[:, :, :1])
        k_sums = torch.cat([zero, k.cumsum(2)], 2)  # [b, h, k+1, d]
        v_sums = torch.cat([zero, v.cumsum(2)], 2)
    sliding = call.sliding_window
    outputs = []
    for start in range(0, q_len, CHUNK_ROWS):
        rows = torch.arange(start, min(q_len, start + CHUNK_ROWS), device=call.device)
        q_keys = rows + first_query  # key index of each row [n]
        band_lo = max(0, int(q_keys[0]) - window + 1)
        band = torch.arange(band_lo, int(q_keys[-1]) + 1, device=call.device)
        # sink columns outside the band (and inside the cache); others are masked
        sink_cols = sinks.clamp(0, call.k_len - 1)  # [b, sink]
        sink_ok = (sinks >= 0) & (sinks < band_lo)
        columns = torch.cat([sink_cols, band.expand(b, -1)], 1)  # [b, c]
        picked_ok = torch.cat([sink_ok, torch.ones_like(band, dtype=torch.bool).expand(b, -1)], 1)
        q_real = key_real(q_keys.expand(b, -1))  # [b, n]
        keep = attn_math.streaming_keys(q_real, key_real(columns), sink, window)  # [b, n, c]
        keep &= picked_ok[:, None, :]
        base = call.mask_rows(rows.expand(b, -1))  # [b, 1|H, n, k]
        if base.shape[1] != 1:
            base = base[:, heads]
        base = torch.gather(base, 3, columns[:, None, None, :].expand(*base.shape[:3], -1))
        k_cols = torch.gather(k, 2, columns[:, None, :, None].expand(b, len(heads), -1, k.shape[3]))
        v_cols = torch.gather(v, 2, columns[:, None, :, None].expand(b, len(heads), -1, v.shape[3]))
        logits = torch.matmul(q[:, :, rows], k_cols.transpose(-1, -2)) * call.scaling
        if call.softcap is not None:
            logits = torch.tanh(logits / call.softcap) * call.softcap
        minimum = torch.finfo(torch.float32).min
        logits = torch.where(keep[:, None], logits + base, minimum)
        if not compensate:
            outputs.append(torch.matmul(torch.softmax(logits, -1), v_cols))
            continue
        # dropped keys of each row: real positions sink .. query - window
        lo = (pads + sink - call.key_offset)[:, None].expand(-1, len(rows)).clamp(min=0)
        hi = (q_keys - window).expand(b, -1)  # [b, n], inclusive
        if sliding is not None:
            lo = torch.maximum(lo, (q_keys - sliding + 1).expand(b, -1))
        count = (hi - lo + 1).clamp(min=0)  # [b, n]
        hi_i = (hi + 1).clamp(min=0)[:, None, :, None].expand(b, len(heads), -1, k.shape[3])
        lo_i = lo.clamp(max=call.k_len)[:, None, :, None].expand_as(hi_i)
        denominator = count.clamp(min=1)[:, None, :, None].float()
        k_mean = (torch.gather(k_sums, 2, hi_i) - torch.gather(k_sums, 2, lo_i)) / denominator
        v_mean = (torch.gather(v_sums, 2, hi_i) - torch.gather(v_sums, 2, lo_i)) / denominator
        comp = (q[:, :, rows] * k_mean).sum(-1, keepdim=True) * call.scaling  # [b, h, n, 1]
        if call.softcap is not None:
            comp = torch.tanh(comp / call.softcap) * call.softcap
        weight = count.clamp(min=1).float().log()[:, None, :, None]
        comp = torch.where(count[:, None, :, None] > 0, comp + weight, minimum)
        probs = torch.softmax(torch.cat([logits, comp], -1), -1)
        outputs.append(torch.matmul(probs[..., :-1], v_cols) + probs[..., -1:] * v_mean)
    return torch.cat(outputs, 2)
