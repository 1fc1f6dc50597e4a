"""Needle accuracy against the KV cache kept, per method, across kv-cache-plan runs.

    .venv/bin/python bench/kv_plan_figure.py --db kv.db --runs 3 4 5 6 8 9 11 12 \
        --length 4096 --out docs/results/kv-cache-plan-methods.png

Each run stores `<setting>.needle_accuracy` and `<setting>.kv_fraction` for every
setting it evaluated; this gathers them by method (the full cache, all-streaming,
the method's budgets and their random plans) at one context length and draws one
curve per method, printing the points. Where runs repeat a setting (full cache,
all-streaming, random plans of one budget drawn in several runs), the points are
averaged.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np


def gather(store, run_ids: list[int], length: int) -> dict[str, dict[float, list[float]]]:
    """method -> {KV cache kept: [accuracies]} for the settings at `length` tokens."""
    points: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run_id in run_ids:
        metrics = store.metrics(run_id)
        for name, accuracy in metrics.items():
            setting, _, field = name.rpartition(".")
            if field != "needle_accuracy" or not setting.endswith(f"_{length}"):
                continue
            kind = setting.split("_")[0]
            if kind == "plan":  # the method's own rule and its control: not a swept budget
                continue
            label = {"full": "full cache", "streaming": "all streaming"}.get(kind, kind)
            fraction = round(metrics[f"{setting}.kv_fraction"], 3)
            points[label][fraction].append(accuracy)
    return points


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--db", required=True, help="the database holding the runs")
    parser.add_argument("--runs", type=int, nargs="+", required=True)
    parser.add_argument("--length", type=int, required=True, help="context length (tokens)")
    parser.add_argument("--out", type=Path, required=True, help="where the figure goes")
    parser.add_argument("--model", default="smollm2-135m", help="for the title")
    args = parser.parse_args()

    from headscope.core.plots import line_plot
    from headscope.storage.store import Store

    store = Store(args.db, mode="read")
    points = gather(store, args.runs, args.length)
    series = {}
    for label, by_fraction in sorted(points.items()):
        xs = sorted(by_fraction)
        ys = [float(np.mean(by_fraction[x])) for x in xs]
        series[label] = (xs, ys)
        print(f"{label}: " + ", ".join(f"{x:.3f} -> {y:.3f}" for x, y in zip(xs, ys, strict=True)))
    figure = line_plot(
        series,
        f"KV-cache plans at {args.length} tokens ({args.model})",
        "KV cache kept (fraction of full)",
        "needle accuracy (ROUGE-1 recall)",
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=120, bbox_inches="tight")
    print(f"figure written to {args.out}")


if __name__ == "__main__":
    main()
