"""Comparing head sets: overlap of two runs' heads, overall and by layer band.

Used for circuit reuse (Merullo et al.: the same heads serving two tasks) and for
checking one method against another (SAE circuit vs patching reference).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from . import stats
from .errors import InvalidParamsError

Head = tuple[int, int]
#: the most layer bands a comparison splits layers into
MAX_BANDS = 12


def select_heads(
    scores: Mapping[Head, float], rule: str, value: float, layers: Iterable[int] | None = None
) -> set[Head]:
    """Heads by rule: ("top", k) the k highest, ("threshold", t) those above t;
    only heads of `layers` when given. Ties rank by (layer, head)."""
    if layers is not None:
        allowed = set(layers)
        scores = {head: score for head, score in scores.items() if head[0] in allowed}
    if rule == "top":
        ranked = sorted(scores.items(), key=lambda item: (-item[1], item[0]))
        return {head for head, _ in ranked[: int(value)]}
    if rule == "threshold":
        return {head for head, score in scores.items() if score > value}
    raise InvalidParamsError(f"unknown head selection rule {rule!r} (top or threshold)")


def layer_matched_heads(
    selected: Iterable[Head], n_heads: int, rng: Any, layers: Iterable[int] | None = None
) -> set[Head]:
    """A random control for `selected`: in every layer, as many heads as the
    selection has there, drawn (numpy Generator `rng`) from that layer's other heads,
    so depth matches and no selected head is ever drawn. Where a layer has too few
    other heads, the shortfall comes from the nearest layers of `layers` (default:
    the selection's layers) that still have free heads; with no free head left at
    all it is an error. `layer_histogram` tells whether the match was exact."""
    chosen = set(selected)
    wanted = layer_histogram(chosen)
    allowed = sorted(set(layers) if layers is not None else set(wanted))
    free = {layer: [h for h in range(n_heads) if (layer, h) not in chosen] for layer in allowed}
    control: set[Head] = set()
    for layer in sorted(wanted):
        short = wanted[layer]
        # this layer first, then the others by distance (the lower first on a tie)
        for source in sorted(free, key=lambda other: (abs(other - layer), other)):
            take = min(short, len(free[source]))
            picks = sorted(rng.choice(len(free[source]), size=take, replace=False).tolist())
            control |= {(source, free[source][i]) for i in picks}
            free[source] = [h for i, h in enumerate(free[source]) if i not in set(picks)]
            short -= take
            if short == 0:
                break
        if short:
            raise InvalidParamsError(
                f"{len(chosen)} selected heads leave too few other heads in layers "
                f"{allowed[0]}..{allowed[-1]} for a random control of the same size"
            )
    return control


def layer_histogram(heads: Iterable[Head]) -> dict[int, int]:
    """How many of `heads` each layer has."""
    counts: dict[int, int] = {}
    for layer, _ in heads:
        counts[layer] = counts.get(layer, 0) + 1
    return counts


def overlap(a: set[Head], b: set[Head]) -> dict[str, Any]:
    """Jaccard |A∩B|/|A∪B| and overlap coefficient |A∩B|/min(|A|,|B|)."""
    both, either = a & b, a | b
    smaller = min(len(a), len(b))
    return {
        "size_a": len(a),
        "size_b": len(b),
        "intersection": len(both),
        "union": len(either),
        "jaccard": len(both) / len(either) if either else 0.0,
        "overlap_coefficient": len(both) / smaller if smaller else 0.0,
        "shared_heads": sorted(both),
    }


def layer_bands(n_layers: int, bands: int = 3) -> list[tuple[str, range]]:
    """Split layers into early/middle/late (or `bands` equal) ranges."""
    if not 1 <= bands <= MAX_BANDS:
        raise InvalidParamsError(f"bands must be 1..{MAX_BANDS}, not {bands}")
    names = {3: ["early", "middle", "late"]}.get(bands) or [f"band{i}" for i in range(bands)]
    edges = [round(i * n_layers / bands) for i in range(bands + 1)]
    return [(names[i], range(edges[i], edges[i + 1])) for i in range(bands)]


def compare_head_sets(a: set[Head], b: set[Head], n_layers: int, bands: int = 3) -> dict[str, Any]:
    result = overlap(a, b)
    result["bands"] = []
    for name, layers in layer_bands(n_layers, bands):
        part_a = {h for h in a if h[0] in layers}
        part_b = {h for h in b if h[0] in layers}
        band = overlap(part_a, part_b)
        band.pop("shared_heads")
        result["bands"].append({"band": name, "layers": [layers.start, layers.stop - 1], **band})
    return result


def score_correlation(a: Mapping[Head, float], b: Mapping[Head, float]) -> dict[str, Any]:
    """Pearson and Spearman correlation over the heads both score; None where it is
    undefined (fewer than two heads, or one run's scores all equal)."""
    shared = sorted(set(a) & set(b))
    if len(shared) < 2:
        return {"heads": len(shared), "pearson": None, "spearman": None}
    x, y = [a[h] for h in shared], [b[h] for h in shared]
    pearson, spearman = stats.pearson(x, y), stats.spearman(x, y)
    return {
        "heads": len(shared),
        "pearson": None if math.isnan(pearson) else pearson,
        "spearman": None if math.isnan(spearman) else spearman,
    }


def compare_runs(
    store: Any,
    registry: Any,
    run_a: int,
    run_b: int,
    metric_a: str | None = None,
    metric_b: str | None = None,
    rule: str | None = None,
    value: float | None = None,
    bands: int = 3,
) -> dict[str, Any]:
    """Head-set overlap of two stored runs, and the correlation of their scores.

    Each run's head set comes from its metric (default: its analysis's primary
    metric) and a selection rule (default: its analysis's own, e.g. retrieval score
    above 0.1); give `rule`/`value` to use one rule for both. Runs whose scores
    have different shapes (models with other layer or head counts) are refused:
    the same (layer, head) would name different heads, and the bands other layers.
    """
    sides, shapes, all_scores = [], [], []
    for run_id, metric in ((run_a, metric_a), (run_b, metric_b)):
        run = store.get_run(run_id)
        if run.status != "succeeded":
            raise InvalidParamsError(
                f"run {run_id} has status {run.status}; only finished runs compare"
            )
        analysis = registry.analyses.get(run.analysis)
        available = store.head_metrics(run_id)
        if not available:
            raise InvalidParamsError(f"run {run_id} ({run.analysis}) has no per-head scores")
        chosen = registry.head_metric(run.analysis, metric, available)
        if chosen not in available:
            raise InvalidParamsError(
                f"run {run_id} has no head metric {chosen!r}; it has: {', '.join(available)}"
            )
        own_rule, own_value = analysis.head_selection if analysis else ("top", 10)
        use_rule = rule or own_rule
        use_value = value if value is not None else own_value
        scores = {(r["layer"], r["head"]): r["value"] for r in store.head_scores(run_id, chosen)}
        heads = select_heads(scores, use_rule, use_value)
        all_scores.append(scores)
        n_layers = 1 + max(layer for layer, _ in scores)
        shapes.append((n_layers, 1 + max(head for _, head in scores)))
        sides.append(
            {
                "run_id": run_id,
                "analysis": run.analysis,
                "model": run.model,
                "metric": chosen,
                "rule": use_rule,
                "value": use_value,
                "heads": sorted(heads),
                "n_layers": n_layers,
            }
        )
    if shapes[0] != shapes[1]:
        (layers_a, heads_a), (layers_b, heads_b) = shapes
        raise InvalidParamsError(
            f"run {run_a} ({sides[0]['model']}, {sides[0]['metric']}) scores {layers_a} layers "
            f"x {heads_a} heads, run {run_b} ({sides[1]['model']}, {sides[1]['metric']}) "
            f"{layers_b} x {heads_b}: head sets of different shapes do not compare"
        )
    result = compare_head_sets(
        set(map(tuple, sides[0]["heads"])), set(map(tuple, sides[1]["heads"])), shapes[0][0], bands
    )
    correlation = score_correlation(*all_scores)
    return {"a": sides[0], "b": sides[1], **result, "correlation": correlation}
