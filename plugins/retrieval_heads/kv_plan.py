"""KV-cache plans: which key/value heads keep the full cache and which stream.

A plan marks each (layer, KV head) `full` (the whole context is cached) or
`streaming` (only the first `sink` tokens and the `window` most recent ones are
cached, plus RazorAttention's compensation token when `compensate` is set). Plans
are per KV head because under grouped-query attention a KV head's cache is shared
by its whole group of query heads; query-head scores are pooled over the group
(`pool_kv_scores`, max by default: a KV head is needed when any of its query heads
needs the context).

Layers that attend through the model's own sliding window (Gemma 2 and 3, Mistral)
already keep a bounded cache: a plan leaves them as the model has them (marked
full, `layer_windows` gives their window) and chooses only among the heads of the
full-attention layers; their cache counts at the window's size.

Formats:

- JSON (`to_json` / `from_json`): everything, including the scores the plan was
  chosen from;
- TSV (`to_tsv` / `from_tsv`): DuoAttention's `full_attention_heads.tsv`, one line
  per layer, one tab-separated column per KV head, 1 = full attention, 0 =
  streaming, written as numpy's `savetxt` writes it (DuoAttention's
  `load_attn_pattern` reads it with `np.loadtxt(..., delimiter="\\t")`). The sink
  and window sizes are not part of that file (DuoAttention keeps them in a
  config.json beside it), so `from_tsv` takes them as arguments.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from headscope.core.errors import InvalidParamsError

PLAN_FORMAT = "headscope-kv-plan"
PLAN_FORMAT_VERSION = 1
Pooling = Literal["max", "mean"]


@dataclass(frozen=True)
class KVPlan:
    """Full or streaming per (layer, KV head), with the streaming settings."""

    model: str
    full: tuple[tuple[bool, ...], ...]  # [n_layers][n_kv_heads]; True = full cache
    sink: int
    window: int
    compensate: bool = False
    method: str = ""
    #: the per-KV-head score the plan was chosen from ([n_layers][n_kv_heads]), if any
    scores: tuple[tuple[float, ...], ...] | None = None
    #: the model's own sliding window per layer (None: full attention); None: no layer slides
    layer_windows: tuple[int | None, ...] | None = None

    def __post_init__(self) -> None:
        if not self.full or not self.full[0]:
            raise InvalidParamsError("a KV-cache plan needs at least one layer and one KV head")
        if len({len(row) for row in self.full}) != 1:
            raise InvalidParamsError("every layer of a KV-cache plan needs the same KV heads")
        if self.sink < 0 or self.window < 1:
            raise InvalidParamsError(f"sink {self.sink} must be >= 0 and window {self.window} >= 1")
        if self.scores is not None and (
            len(self.scores) != self.n_layers
            or any(len(row) != self.n_kv_heads for row in self.scores)
        ):
            raise InvalidParamsError("the plan's scores do not match its layers x KV heads")
        if self.layer_windows is not None:
            if len(self.layer_windows) != self.n_layers:
                raise InvalidParamsError("the plan's layer_windows do not match its layers")
            for layer, row in enumerate(self.full):
                if self.layer_windows[layer] is not None and not all(row):
                    raise InvalidParamsError(
                        f"layer {layer} attends through the model's own sliding window: "
                        "a plan keeps its heads as they are (full)"
                    )

    def layer_window(self, layer: int) -> int | None:
        return None if self.layer_windows is None else self.layer_windows[layer]

    @property
    def n_layers(self) -> int:
        return len(self.full)

    @property
    def n_kv_heads(self) -> int:
        return len(self.full[0])

    @property
    def full_heads(self) -> int:
        return sum(sum(row) for row in self.full)

    def streaming_heads(self) -> dict[int, list[int]]:
        """layer -> streaming KV heads (layers with none left out), for `StreamingHeads`."""
        return {
            layer: [head for head, full in enumerate(row) if not full]
            for layer, row in enumerate(self.full)
            if not all(row)
        }

    def intervention(self):
        """The tracing intervention that applies this plan in `forward` / `generate`."""
        from headscope.core.tracing import StreamingHeads

        return StreamingHeads(
            heads=self.streaming_heads(),
            sink=self.sink,
            window=self.window,
            compensate=self.compensate,
        )

    def mask(self) -> torch.Tensor:
        """bool [n_layers, n_kv_heads], True = full."""
        return torch.tensor(self.full, dtype=torch.bool)

    # -- JSON -------------------------------------------------------------------------
    def to_json(self) -> str:
        document = {
            "format": PLAN_FORMAT,
            "version": PLAN_FORMAT_VERSION,
            "model": self.model,
            "method": self.method,
            "n_layers": self.n_layers,
            "n_kv_heads": self.n_kv_heads,
            "sink": self.sink,
            "window": self.window,
            "compensate": self.compensate,
            "full_heads": self.full_heads,
            "full": [[int(v) for v in row] for row in self.full],
            "scores": None if self.scores is None else [list(row) for row in self.scores],
            "layer_windows": None if self.layer_windows is None else list(self.layer_windows),
        }
        return json.dumps(document, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> KVPlan:
        try:
            document = json.loads(text)
        except json.JSONDecodeError as error:
            raise InvalidParamsError(f"KV-cache plan is not JSON: {error}") from None
        if not isinstance(document, dict) or document.get("format") != PLAN_FORMAT:
            raise InvalidParamsError(f"not a KV-cache plan (expected format {PLAN_FORMAT!r})")
        try:
            full = tuple(tuple(bool(_binary(v)) for v in row) for row in document["full"])
            scores = document.get("scores")
            windows = document.get("layer_windows")
            plan = cls(
                model=str(document["model"]),
                full=full,
                sink=int(document["sink"]),
                window=int(document["window"]),
                compensate=bool(document.get("compensate", False)),
                method=str(document.get("method", "")),
                scores=None
                if scores is None
                else tuple(tuple(float(v) for v in row) for row in scores),
                layer_windows=None
                if windows is None
                else tuple(None if w is None else int(w) for w in windows),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise InvalidParamsError(f"KV-cache plan is malformed: {error!r}") from None
        if (plan.n_layers, plan.n_kv_heads) != (document["n_layers"], document["n_kv_heads"]):
            raise InvalidParamsError(
                "KV-cache plan is malformed: n_layers x n_kv_heads does not match its mask"
            )
        return plan

    # -- DuoAttention's TSV ---------------------------------------------------------------
    def to_tsv(self) -> str:
        """`full_attention_heads.tsv` as DuoAttention's `save_full_attention_heads`
        writes it (`np.savetxt(..., delimiter="\\t")`)."""
        return "".join("\t".join(f"{float(v):.18e}" for v in row) + "\n" for row in self.full)

    @classmethod
    def from_tsv(
        cls,
        text: str,
        model: str,
        sink: int,
        window: int,
        compensate: bool = False,
        method: str = "",
    ) -> KVPlan:
        """A plan from a DuoAttention pattern file; values above 0.5 are full (gate
        values as DuoAttention saves them before binarising are accepted too)."""
        rows = [line for line in text.splitlines() if line.strip()]
        if not rows:
            raise InvalidParamsError("the KV-head pattern file is empty")
        try:
            values = [[float(cell) for cell in line.split("\t")] for line in rows]
        except ValueError as error:
            raise InvalidParamsError(f"the KV-head pattern file is malformed: {error}") from None
        full = tuple(tuple(v > 0.5 for v in row) for row in values)
        return cls(model, full, sink, window, compensate, method)


def _binary(value: Any) -> int:
    if value not in (0, 1, True, False):
        raise ValueError(f"mask values are 0 or 1, got {value!r}")
    return int(value)


# -- the cache a plan keeps ------------------------------------------------------------
def dtype_bytes(dtype: torch.dtype | str) -> int:
    """Bytes per element of a dtype (a torch dtype or its name, e.g. "bfloat16")."""
    if isinstance(dtype, str):
        found = getattr(torch, dtype, None)
        if not isinstance(found, torch.dtype):
            raise InvalidParamsError(f"unknown dtype {dtype!r}")
        dtype = found
    return torch.finfo(dtype).bits // 8 if dtype.is_floating_point else torch.iinfo(dtype).bits // 8


def streaming_tokens(context_length: int, sink: int, window: int, compensate: bool) -> int:
    """Tokens a streaming head caches at `context_length`: its sinks and window, plus
    the compensation token once anything has been dropped."""
    kept = min(context_length, sink + window)
    return kept + int(compensate and context_length > sink + window)


def cached_tokens(context_length: int, layer_window: int | None) -> int:
    """Tokens a full head caches: the context, or the layer's own sliding window."""
    return context_length if layer_window is None else min(context_length, layer_window)


def kv_cache_bytes(
    plan: KVPlan, context_length: int, dtype: torch.dtype | str, head_dim: int
) -> int:
    """Bytes of K and V one sequence of `context_length` tokens keeps under the plan."""
    per_token = 2 * head_dim * dtype_bytes(dtype)  # K and V
    streaming = streaming_tokens(context_length, plan.sink, plan.window, plan.compensate)
    tokens = 0
    for layer, row in enumerate(plan.full):
        whole = cached_tokens(context_length, plan.layer_window(layer))
        tokens += sum(whole if full else min(whole, streaming) for full in row)
    return tokens * per_token


def full_cache_bytes(
    n_layers: int,
    n_kv_heads: int,
    context_length: int,
    dtype: torch.dtype | str,
    head_dim: int,
    layer_windows: tuple[int | None, ...] | None = None,
) -> int:
    """Bytes of K and V of the full cache (every head full) for one sequence."""
    windows = layer_windows or (None,) * n_layers
    tokens = sum(cached_tokens(context_length, window) for window in windows)
    return 2 * n_kv_heads * tokens * head_dim * dtype_bytes(dtype)


def plannable_heads(n_kv_heads: int, layer_windows: tuple[int | None, ...]) -> torch.Tensor:
    """bool [layers, KV heads]: the heads a plan chooses among (full-attention layers)."""
    return torch.tensor([[w is None] * n_kv_heads for w in layer_windows], dtype=torch.bool)


# -- choosing the full heads -------------------------------------------------------------
def full_heads_for_budget(
    n_kv_total: int,
    budget: int | None = None,
    budget_fraction: float | None = None,
    context_length: int | None = None,
    sink: int = 0,
    window: int = 1,
    compensate: bool = False,
    fixed_tokens: int = 0,
) -> int:
    """How many of `n_kv_total` plannable KV heads keep the full cache: `budget`
    heads, or as many as fit in `budget_fraction` of the full cache at
    `context_length` (streaming heads still cost their sinks and window;
    `fixed_tokens` is what the heads outside the plan, sliding-window layers, keep)."""
    if (budget is None) == (budget_fraction is None):
        raise InvalidParamsError("give a budget as a number of full KV heads or as a fraction")
    if budget is not None:
        if not 0 <= budget <= n_kv_total:
            raise InvalidParamsError(
                f"budget {budget} full KV heads is outside 0..{n_kv_total} "
                f"(the model has {n_kv_total} KV heads)"
            )
        return budget
    if context_length is None or context_length < 1:
        raise InvalidParamsError("a budget fraction needs the context length it applies to")
    if not 0 <= budget_fraction <= 1:
        raise InvalidParamsError(f"budget_fraction {budget_fraction} is outside 0..1")
    streaming = min(context_length, streaming_tokens(context_length, sink, window, compensate))
    whole = fixed_tokens + n_kv_total * context_length
    floor = (fixed_tokens + n_kv_total * streaming) / whole
    if budget_fraction < floor - 1e-12:
        raise InvalidParamsError(
            f"budget_fraction {budget_fraction:g} is below what streaming heads alone keep "
            f"at {context_length} tokens ({floor:.3f} of the full cache)"
        )
    if streaming >= context_length:
        return n_kv_total
    # k full heads keep fixed + k * L + (N - k) * streaming of the cache's tokens
    fits = (budget_fraction * whole - fixed_tokens - n_kv_total * streaming) / (
        context_length - streaming
    )
    return int(min(n_kv_total, math.floor(fits + 1e-9)))


def pool_kv_scores(scores: torch.Tensor, n_kv_heads: int, pooling: Pooling = "max") -> torch.Tensor:
    """[layers, query heads] -> [layers, KV heads]: query head h reads KV head
    h // (heads / KV heads), as `repeat_kv` arranges it; the group's max (or mean)."""
    layers, heads = scores.shape
    if heads % n_kv_heads:
        raise InvalidParamsError(f"{heads} query heads do not split into {n_kv_heads} KV heads")
    groups = scores.reshape(layers, n_kv_heads, heads // n_kv_heads).double()
    if pooling == "max":
        return groups.max(-1).values
    if pooling == "mean":
        return groups.mean(-1)
    raise InvalidParamsError(f"unknown pooling {pooling!r} (max or mean)")


def top_kv_mask(
    scores: torch.Tensor, k: int, plannable: torch.Tensor | None = None
) -> torch.Tensor:
    """bool [layers, KV heads]: the k best-scoring plannable KV heads are full (the
    others outside the plan stay full too); ties go to the earlier (layer, head), so
    a plan is deterministic."""
    plannable = torch.ones(scores.shape, dtype=torch.bool) if plannable is None else plannable
    ranked = scores.double().masked_fill(~plannable, -math.inf)
    order = torch.argsort(ranked.flatten(), descending=True, stable=True)[:k]
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    mask[order] = True
    return mask.view(scores.shape) | ~plannable


def random_kv_mask(
    shape: tuple[int, int],
    k: int,
    rng: np.random.Generator,
    plannable: torch.Tensor | None = None,
) -> torch.Tensor:
    """bool [layers, KV heads] with k of the plannable heads full, drawn uniformly
    (the control); heads outside the plan stay full."""
    plannable = torch.ones(shape, dtype=torch.bool) if plannable is None else plannable
    candidates = plannable.flatten().nonzero().flatten()
    mask = torch.zeros(shape[0] * shape[1], dtype=torch.bool)
    chosen = rng.choice(len(candidates), size=k, replace=False)
    mask[candidates[torch.from_numpy(chosen).long()]] = True
    return mask.view(shape) | ~plannable


def razor_scores(
    induction: torch.Tensor, echo: torch.Tensor, induction_fraction: float, echo_fraction: float
) -> torch.Tensor:
    """RazorAttention's rule as a ranking of query heads ([layers, heads], higher is kept
    first): a head is kept when it is among the top `induction_fraction` of heads by
    induction score or the top `echo_fraction` by echo score. Scaling both fractions
    together gives every head the scale at which it joins, s = min(rank_induction /
    induction_fraction, rank_echo / echo_fraction) (ranks as fractions of all heads);
    the score is 1 / (1 + s), so the paper's own set is the heads scoring above 1/2."""
    if induction.shape != echo.shape:
        raise InvalidParamsError("induction and echo scores need the same heads")
    if induction_fraction <= 0 and echo_fraction <= 0:
        raise InvalidParamsError("razor needs a positive induction or echo fraction")
    total = induction.numel()

    def scale(values: torch.Tensor, fraction: float) -> torch.Tensor:
        if fraction <= 0:
            return torch.full((total,), math.inf, dtype=torch.float64)
        order = torch.argsort(values.flatten().double(), descending=True, stable=True)
        rank = torch.empty(total, dtype=torch.float64)
        rank[order] = torch.arange(total, dtype=torch.float64)
        # rank r joins once r < s * fraction * total
        return (rank + 0.5) / (fraction * total)

    joins = torch.minimum(scale(induction, induction_fraction), scale(echo, echo_fraction))
    return (1.0 / (1.0 + joins)).view(induction.shape)


def make_plan(
    model: str,
    mask: torch.Tensor,
    sink: int,
    window: int,
    compensate: bool,
    method: str,
    scores: torch.Tensor | None = None,
    layer_windows: tuple[int | None, ...] | None = None,
) -> KVPlan:
    full = tuple(tuple(bool(v) for v in row) for row in mask.tolist())
    table = (
        None if scores is None else tuple(tuple(float(v) for v in row) for row in scores.tolist())
    )
    if layer_windows is not None and all(w is None for w in layer_windows):
        layer_windows = None  # no layer slides: the plain form
    return KVPlan(model, full, sink, window, compensate, method, table, layer_windows)
