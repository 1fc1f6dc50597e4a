"""The cost of applying a KV-cache plan vs plain generation, side by side in one run.

    .venv/bin/python bench/kv_cache_plan.py [--length 4000] [--new-tokens 16] [--repeats 2]

On the same held-out needle prompts (smollm2-135m by default, every held-out needle,
depth 50%) it times greedy generation of `--new-tokens` tokens three ways:

(a) plain: transformers' `generate`, no tracing;
(b) traced: headscope's `generate` with no intervention;
(c) plan: headscope's `generate` with a plan keeping `--full` of the KV heads full
    (seeded random heads: the cost does not depend on which) and the rest streaming
    (sink 64, window 256 unless given), as the kv-cache-plan evaluation runs it.

and prints each median time and the ratios plan / plain and plan / traced. Methods
alternate within each repeat so machine noise hits all of them. The plan computes
streaming attention next to the model's own (it measures what a plan does, it does
not save memory), so the ratio is the evaluation's overhead, not a serving cost.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch


def _setup(model: str, length: int, full: float, seed: int, sink: int, window: int):
    from headscope.core import tracing as T
    from headscope.core.models import load_model
    from headscope.plugins.retrieval_heads.kv_plan import make_plan, random_kv_mask
    from headscope.plugins.retrieval_heads.needles import (
        HaystackBuilder,
        heldout_haystack_paths,
        heldout_needles_path,
        load_haystack,
        load_needles,
    )

    handle = load_model(model)
    builder = HaystackBuilder(handle.tokenizer, load_haystack(heldout_haystack_paths()))
    needles = load_needles(heldout_needles_path())
    tests = [builder.build(n, length, 50, i) for i, n in enumerate(needles)]
    shape = (handle.n_layers, handle.n_kv_heads)
    k = round(full * shape[0] * shape[1])
    mask = random_kv_mask(shape, k, np.random.default_rng(seed))
    plan = make_plan(handle.name, mask, sink, window, False, "random")
    return handle, tests, plan, T


def _plain(handle, test, n_tokens: int) -> float:
    ids = torch.tensor([test.prompt_ids])
    started = time.perf_counter()
    with torch.no_grad():
        handle.hf_model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n_tokens,
            min_new_tokens=n_tokens,
            do_sample=False,
            pad_token_id=handle.tokenizer.pad_token_id,
        )
    return time.perf_counter() - started


def _traced(handle, T, test, n_tokens: int, items) -> float:
    batch = T.make_batch(handle, [test.prompt_ids])
    started = time.perf_counter()
    T.generate(handle, batch, n_tokens, items, stop_ids=[])
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--length", type=int, default=4000, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--full", type=float, default=0.3, help="share of KV heads kept full")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sink", type=int, default=64)
    parser.add_argument("--window", type=int, default=256)
    args = parser.parse_args()

    handle, tests, plan, T = _setup(
        args.model, args.length, args.full, args.seed, args.sink, args.window
    )
    items = [plan.intervention()]
    print(
        f"{args.model}: {len(tests)} prompts of {args.length} tokens, {args.new_tokens} new "
        f"tokens; plan: {plan.full_heads} of {plan.n_layers * plan.n_kv_heads} KV heads full, "
        f"sink {plan.sink}, window {plan.window}"
    )
    _traced(handle, T, tests[0], 2, items)  # warm up both paths once
    _plain(handle, tests[0], 2)
    times: dict[str, list[float]] = {"plain": [], "traced": [], "plan": []}
    for _ in range(args.repeats):
        for test in tests:
            times["plain"].append(_plain(handle, test, args.new_tokens))
            times["traced"].append(_traced(handle, T, test, args.new_tokens, []))
            times["plan"].append(_traced(handle, T, test, args.new_tokens, items))
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, value in medians.items():
        print(f"{name:>7}: {value:.2f} s per prompt (median of {len(times[name])})")
    print(f"plan / plain:  {medians['plan'] / medians['plain']:.2f}x")
    print(f"plan / traced: {medians['plan'] / medians['traced']:.2f}x")


if __name__ == "__main__":
    main()
