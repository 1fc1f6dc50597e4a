"""Sweep sae-circuit's dictionary size and input scaling on one task.

Captures the head outputs once, then trains each setting's SAEs exactly as
`headscope run sae-circuit` does (same pairs, same seeds, same code), and prints
ROC AUC against a stored head-patching run for each setting: mean +- sd over
seeds, min - max, for the node scores and the edge variant, with the number of
codes the SAEs used. A setting is a comma-separated list of sae-circuit params.

    .venv/bin/python bench/sae_sweep.py --db results.db --reference 1 --task ioi \
        --seeds 5 dict_size=200,scaling=none dict_per_head=2,scaling=global
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from headscope.core.analysis import RunContext
from headscope.core.models import load_model
from headscope.core.plugins import build_registry
from headscope.core.tasks import prepare_task
from headscope.plugins.circuits.evaluation import evaluate_ranking
from headscope.plugins.circuits.sae_circuit import (
    SaeCircuit,
    SaeCircuitParams,
    dictionary_units,
    reference_heads,
)
from headscope.storage.store import Store


def parse_setting(text: str, common: dict) -> SaeCircuitParams:
    fields = dict(common)
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        fields[key.strip()] = value.strip()
    return SaeCircuitParams.model_validate(fields)


def wait_for_reference(store: Store, run_id: int, handle) -> np.ndarray:
    """The reference run's importance [L, H], once the run has finished."""
    while store.get_run(run_id).status in ("queued", "running"):
        time.sleep(30)
    importance = np.zeros((handle.n_layers, handle.n_heads))
    for row in store.head_scores(run_id, "importance"):
        importance[row["layer"], row["head"]] = row["value"]
    return importance


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--db", required=True)
    parser.add_argument("--reference", type=int, required=True, help="head-patching run id")
    parser.add_argument("--task", default="ioi")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n-examples", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--min-effect", type=float, default=0.05, help="reference cut")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("settings", nargs="+", help="e.g. dict_per_head=2,scaling=global")
    args = parser.parse_args()

    common = {
        "task": args.task,
        "n_examples": args.n_examples,
        "seeds": args.seeds,
        "reference_min_effect": args.min_effect,
    }
    settings = [parse_setting(text, common) for text in args.settings]
    store = Store(args.db)
    handle = load_model(args.model)
    analysis = SaeCircuit()
    registry = build_registry()
    ctx = RunContext(lambda: handle, seed=0, registry=registry)
    data = prepare_task(handle, registry.task(args.task), args.n_examples, ctx.rng)
    positives, negatives = analysis._capture(ctx, data, 32)
    heads = handle.n_layers * handle.n_heads
    shape = (handle.n_layers, handle.n_heads)
    trained = []
    for text, params in zip(args.settings, settings, strict=True):
        units = dictionary_units(params, heads)
        started = time.perf_counter()
        seeds = [
            analysis._one_seed(ctx, params, positives, negatives, i, units, handle.n_heads)
            for i in range(params.seeds)
        ]
        trained.append((text, units, seeds, (time.perf_counter() - started) / params.seeds))
        print(f"trained {text}: {trained[-1][-1]:.0f} s per seed", flush=True)

    # the reference may still be running: the SAEs above need it only now
    importance = wait_for_reference(store, args.reference, handle)
    reference = reference_heads(settings[0], importance)
    print(
        f"{args.task} on {handle.name}: {len(data)} pairs, {heads} heads; reference run "
        f"{args.reference}: {len(reference)} heads with importance >= {args.min_effect:g}"
    )
    print("setting | units | scale | codes used | node AUC mean +- sd (min-max) | edge AUC")
    results = []
    for text, units, seeds, per_seed in trained:
        node, edge = (
            np.array([evaluate_ranking(s[key].reshape(shape), reference)["roc_auc"] for s in seeds])
            for key in ("node", "edge")
        )
        row = {
            "setting": text,
            "units": units,
            "scale": float(np.mean([s["scale"] for s in seeds])),
            "codes_used": float(np.mean([s["codes_used"] for s in seeds])),
            "node_auc": node.tolist(),
            "edge_auc": edge.tolist(),
            "node_scores": [s["node"].tolist() for s in seeds],
            "seconds_per_seed": per_seed,
        }
        results.append(row)
        print(
            f"{text} | {units} | {row['scale']:.3g} | {row['codes_used']:.0f} | "
            f"{node.mean():.3f} +- {node.std():.3f} ({node.min():.3f}-{node.max():.3f}) | "
            f"{edge.mean():.3f} +- {edge.std():.3f} ({edge.min():.3f}-{edge.max():.3f})",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=2)


if __name__ == "__main__":
    main()
