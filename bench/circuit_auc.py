"""ROC AUC of a stored sae-circuit run against a stored reference, for several cuts.

An sae-circuit run scores itself against one reference cut (its top
`reference_top_k` heads by the reference's primary metric). This script re-reads
the run's per-seed head scores (`seeds.json`) and the reference run's head scores
from the store, and prints the AUC (mean and spread over seeds) for other cuts and
other reference metrics, without training anything again.

    .venv/bin/python bench/circuit_auc.py --db results.db --run 3 --reference 1 \
        --k 5 10 15 20 30 --metrics importance noising_effect denoising_effect
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from headscope.core.compare import select_heads
from headscope.plugins.circuits.evaluation import evaluate_ranking
from headscope.storage.store import Store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--db", required=True)
    parser.add_argument("--run", type=int, required=True, help="sae-circuit run id")
    parser.add_argument("--reference", type=int, required=True, help="head-patching run id")
    parser.add_argument("--k", type=int, nargs="+", default=[5, 10, 15, 20, 30])
    parser.add_argument("--metrics", nargs="+", default=["importance"])
    parser.add_argument("--scores", nargs="+", default=["unique_codes", "edge_score"])
    args = parser.parse_args()

    store = Store(args.db)
    artifact = next(a for a in store.artifacts(args.run) if a["name"] == "seeds.json")
    seeds = json.loads(Path(artifact["path"]).read_text())
    print(f"run {args.run} ({store.get_run(args.run).params['task']}) against run {args.reference}")
    print(f"{'score':14} {'reference metric':18} {'k':>4}  AUC mean +- std over seeds")
    for score in args.scores:
        per_seed = np.array(seeds[score])  # [seed, layer, head]
        for metric in args.metrics:
            rows = store.head_scores(args.reference, metric)
            reference = {(r["layer"], r["head"]): abs(r["value"]) for r in rows}
            for k in args.k:
                top = select_heads(reference, "top", k)
                aucs = np.array([evaluate_ranking(s, top)["roc_auc"] for s in per_seed])
                print(
                    f"{score:14} {'|' + metric + '|':18} {k:4d}  {aucs.mean():.3f} +- {aucs.std():.3f}"
                )


if __name__ == "__main__":
    main()
