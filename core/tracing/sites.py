"""The two sites per layer where interventions act, the contract of an intervention,
and the plan that walks them in forward order inside a trace.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import attention as attn_math
from ..models import ModelHandle
from .batch import Batch, Steps


class AttentionCall:
    """The attention function's inputs at one layer and step, editable in place."""

    def __init__(self, plan: Plan, layer: int, step: int, args: tuple, kwargs: dict):
        self.plan = plan
        self.layer = layer
        self.step = step
        self.args = list(args)
        self.kwargs = kwargs
        self.mask_changed = False
        self._bias: torch.Tensor | None = None

    @property
    def query(self) -> torch.Tensor:
        return self.args[1]

    @property
    def key(self) -> torch.Tensor:
        return self.args[2]

    @property
    def value(self) -> torch.Tensor:
        return self.args[3]

    @property
    def mask(self) -> torch.Tensor | None:
        return self.args[4] if len(self.args) > 4 else self.kwargs.get("attention_mask")

    @property
    def q_len(self) -> int:
        return self.query.shape[2]

    @property
    def k_len(self) -> int:
        return self.key.shape[2]

    @property
    def total_len(self) -> int:
        """Tokens in the sequence so far (padded prompt width plus generated)."""
        return self.plan.batch.width + self.step

    @property
    def key_offset(self) -> int:
        """Absolute position of key index 0: non-zero when a sliding-window cache
        keeps only the most recent keys."""
        return self.total_len - self.k_len

    @property
    def scaling(self) -> float:
        scaling = self.kwargs.get("scaling")
        return float(scaling) if scaling is not None else self.plan.adapter.scaling(self.layer)

    @property
    def sliding_window(self) -> int | None:
        window = self.kwargs.get("sliding_window")
        return int(window) if window else self.plan.adapter.sliding_window(self.layer)

    @property
    def softcap(self) -> float | None:
        return self.kwargs.get("softcap")

    @property
    def device(self) -> torch.device:
        """The device of this layer's attention (layers differ when a model is sharded)."""
        return self.query.device

    def rows_for(self, positions: Sequence[int] | None) -> torch.Tensor:
        """Query rows [b, n] of this call for prompt positions (prefill) or the new token."""
        b = self.query.shape[0]
        if self.step > 0 or positions is None:
            if self.q_len != 1 and positions is None:
                return torch.arange(self.q_len, device=self.device).expand(b, self.q_len)
            return torch.full((b, 1), self.q_len - 1, dtype=torch.long, device=self.device)
        return self.plan.batch.absolute(positions).to(self.device)

    def mask_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Additive mask (with any bias added so far) for query rows [b, n]: [b, 1|H, n, k]."""
        out = attn_math.mask_rows(
            self.mask, rows, self.q_len, self.k_len, torch.float32, self.sliding_window
        )
        if self._bias is not None:
            out = out + attn_math.select_rows(
                self._bias.float().expand(out.shape[0], -1, self.q_len, self.k_len), rows
            )
        return out

    def probabilities(
        self, rows: torch.Tensor | None = None, heads: Sequence[int] | None = None
    ) -> torch.Tensor:
        """Attention weights [b, H|len(heads), n, k] of query rows [b, n] (default: all),
        recomputed from q and k under the mask and any bias added so far."""
        if rows is None:
            rows = torch.arange(self.q_len, device=self.device).expand(
                self.query.shape[0], self.q_len
            )
        logits = attn_math.attention_logits(
            self.query.detach(), self.key.detach(), self.scaling, rows, heads, self.softcap
        )
        mask = self.mask_rows(rows)
        if heads is not None and mask.shape[1] != 1:
            mask = mask[:, list(heads)]
        return torch.softmax(logits + mask, dim=-1)

    def add_bias(self, bias: torch.Tensor) -> None:
        """Add [b, H, q, k] (or broadcastable) to the pre-softmax logits."""
        bias = bias.to(self.device)
        self._bias = bias if self._bias is None else self._bias + bias
        self.mask_changed = True

    def commit(self) -> tuple[tuple, dict]:
        """The inputs to hand back: the mask now carries any added bias."""
        if self._bias is not None:
            dtype = self.query.dtype
            base = attn_math.additive_mask(
                self.mask,
                self.query.shape[0],
                self.q_len,
                self.k_len,
                dtype,
                self.sliding_window,
                self.device,
            )
            combined = (base + self._bias.to(dtype)).contiguous()
            if len(self.args) > 4:
                self.args[4] = combined
            else:
                self.kwargs["attention_mask"] = combined
        return tuple(self.args), self.kwargs


class HeadOutputSite:
    """Per-head outputs at one layer: a [b, s, H, hd] view of the o_proj input."""

    def __init__(self, plan: Plan, layer: int, step: int, value: torch.Tensor):
        self.plan = plan
        self.layer = layer
        self.step = step
        b, s, _ = value.shape
        self.value = value.view(b, s, plan.adapter.n_heads, plan.adapter.head_dim)
        self.changed = False

    def columns(self, positions: Sequence[int] | None) -> torch.Tensor | None:
        """Padded columns [b, n] for prompt positions at prefill; None = all columns."""
        if positions is None:
            return None
        device = self.value.device
        if self.step > 0:
            return torch.zeros((self.value.shape[0], 1), dtype=torch.long, device=device)
        return self.plan.batch.absolute(positions).to(device)

    def edit(self) -> torch.Tensor:
        """Switch to a private copy before the first in-place edit."""
        if not self.changed:
            self.value = self.value.clone()
            self.changed = True
        return self.value

    def flat(self) -> torch.Tensor:
        b, s = self.value.shape[:2]
        return self.value.reshape(b, s, -1)


@dataclass
class Intervention:
    """Something that acts at the attention call and/or the head-output site."""

    steps: Steps = field(default="all", kw_only=True)

    def attention_layers(self) -> set[int]:
        return set()

    def output_layers(self) -> set[int]:
        return set()

    def active(self, step: int) -> bool:
        return self.steps == "all" or (self.steps == "prefill") == (step == 0)

    def at_attention(self, call: AttentionCall, record: dict) -> None:
        pass

    def at_head_output(self, site: HeadOutputSite, record: dict) -> None:
        pass

    def validate(self, handle: ModelHandle, batch: Batch) -> None:
        pass

    #: captures read after every edit at the same site
    reads = False


class Plan:
    """Interventions grouped per layer and site, edits before reads.

    `visit(step)` runs inside a trace: it touches each needed site once, in forward
    order (nnsight requires it), and returns what the captures recorded.
    """

    def __init__(self, handle: ModelHandle, batch: Batch, items: Sequence[Intervention]):
        # Only picklable state: the plan travels with the trace to remote servers.
        self.adapter = handle.adapter
        self.batch = batch
        ordered = [i for i in items if not i.reads] + [i for i in items if i.reads]
        for item in ordered:
            item.validate(handle, batch)
        self.at_attention: dict[int, list[Intervention]] = {}
        self.at_output: dict[int, list[Intervention]] = {}
        for item in ordered:
            for layer in item.attention_layers():
                self.at_attention.setdefault(layer, []).append(item)
            for layer in item.output_layers():
                self.at_output.setdefault(layer, []).append(item)
        self.layers = sorted(set(self.at_attention) | set(self.at_output))

    def visit(self, root: Any, step: int) -> dict:
        record: dict = {}
        for layer in self.layers:
            items = [i for i in self.at_attention.get(layer, ()) if i.active(step)]
            if items:
                site = self.adapter.attention_call(root, layer)
                args, kwargs = site.inputs
                call = AttentionCall(self, layer, step, args, kwargs)
                for item in items:
                    item.at_attention(call, record)
                if call.mask_changed:
                    site.inputs = call.commit()
            items = [i for i in self.at_output.get(layer, ()) if i.active(step)]
            if items:
                module = self.adapter.o_proj(root, layer)
                site = HeadOutputSite(self, layer, step, module.input)
                for item in items:
                    item.at_head_output(site, record)
                if site.changed:
                    module.input = site.flat()
        return record
