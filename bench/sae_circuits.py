"""Wall time of sae-circuit against full per-head activation patching, side by side.

Both analyses run in this process on the same model, task, seed and prompt pairs
(the same `n_examples` draws the same pairs): `sae-circuit` with its defaults,
and `head-patching` in full mode (one patched run per head and direction; by
default noising on 64 pairs, the reference sae-circuit is judged against). sae-circuit runs before and after the patching and its time is the
mean of the two. Prints both wall times and their ratio; the SAE side is also given
for a single SAE (capture plus one training), which is the method itself, while
the analysis default trains `--seeds` SAEs to report their spread.

    .venv/bin/python bench/sae_circuits.py --task ioi --pairs 64

Timings depend on the machine and on what else runs on it: compare ratios from
one run, on a quiet machine.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

from headscope.core.analysis import RunContext
from headscope.core.models import load_model
from headscope.core.plugins import build_registry
from headscope.core.tasks import prepare_task
from headscope.core.tracing import forward
from headscope.plugins.circuits.head_patching import HeadPatching, HeadPatchingParams
from headscope.plugins.circuits.sae import train_sae
from headscope.plugins.circuits.sae_circuit import SaeCircuit, SaeCircuitParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="ioi")
    parser.add_argument("--pairs", type=int, default=64, help="prompt pairs for both methods")
    parser.add_argument("--seeds", type=int, default=5, help="SAEs trained by sae-circuit")
    parser.add_argument("--directions", default="noising", choices=["noising", "denoising", "both"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    registry = build_registry()
    handle = load_model(args.model, models=registry.models)
    task = registry.task(args.task)
    pairs = prepare_task(handle, task, args.pairs, np.random.default_rng(args.seed))
    same = prepare_task(handle, task, args.pairs, np.random.default_rng(args.seed))
    assert [p.clean for p in pairs.pairs] == [p.clean for p in same.pairs]
    # one-time costs (first traced forward, first Adam step) go to neither side
    forward(handle, pairs.subset(1).clean_batch(handle))
    train_sae(torch.zeros(4, 8), n_units=4, steps=2)

    def context() -> RunContext:
        return RunContext(lambda: handle, seed=args.seed, registry=registry)

    sae_params = SaeCircuitParams(task=args.task, n_examples=args.pairs, seeds=args.seeds)
    patch_params = HeadPatchingParams(
        task=args.task, n_examples=args.pairs, mode="full", directions=args.directions
    )

    SaeCircuit.check(sae_params, handle, registry)
    HeadPatching.check(patch_params, handle, registry)

    def run_sae() -> tuple[float, float]:
        started = time.perf_counter()
        finding = SaeCircuit().run(context(), sae_params)
        return time.perf_counter() - started, finding.metrics["one_sae_seconds"]

    # sae-circuit runs before and after patching, so slow phases of a shared
    # machine weigh on both sides; its time is the mean of the two runs
    before = run_sae()
    started = time.perf_counter()
    patch_finding = HeadPatching().run(context(), patch_params)
    patch_seconds = time.perf_counter() - started
    after = run_sae()
    sae_seconds = (before[0] + after[0]) / 2
    one_sae = (before[1] + after[1]) / 2

    heads = handle.n_layers * handle.n_heads
    print(f"model {handle.name} ({heads} heads), task {args.task}, {len(pairs)} prompt pairs")
    print(f"torch threads {torch.get_num_threads()}, {platform.processor() or platform.machine()}")
    print(
        f"sae-circuit ({args.seeds} seeds)            {sae_seconds:9.1f} s  "
        f"(runs before/after patching: {before[0]:.1f} s, {after[0]:.1f} s)"
    )
    print(f"  one SAE (capture + 1 training)   {one_sae:9.1f} s")
    print(
        f"head-patching full ({args.directions})     {patch_seconds:9.1f} s  "
        f"({int(patch_finding.metrics['forward_passes'])} forward passes)"
    )
    print(f"ratio patching / sae-circuit        {patch_seconds / sae_seconds:9.1f}x")
    print(f"ratio patching / one SAE            {patch_seconds / one_sae:9.1f}x")


if __name__ == "__main__":
    main()
