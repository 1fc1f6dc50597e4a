"""Retrieval heads at scale on smollm2-135m: speed, memory, batching and precision.

    .venv/bin/python bench/scale.py                 # every part, full settings
    .venv/bin/python bench/scale.py --parts a,b     # some parts
    .venv/bin/python bench/scale.py --small         # a quick check that it all runs

(a) scoring the needle tests at 2,000 tokens, headscope vs the published approach
    (`bench/published.py`: fast prefill, then eager decoding with output_attentions,
    one prompt at a time); identical scores required; target: headscope >= 3x faster;
(b) peak memory of scoring one test vs context length (1k, 2k, 4k, 8k tokens) for
    both, each in a fresh child process; headscope's growth should be linear;
    plotted to docs/results/scale-memory.png;
(c) the default retrieval-heads run batched (the memory budget) vs one prompt at a
    time (a budget too small for two); same findings; target: >= 2x;
(d) bfloat16 vs float32 on the default scoring tests: same top-10 retrieval heads,
    scores within 0.02; the time of each (bfloat16 is fast on CPUs with AMX).

Numbers go to docs/results/scale.md. Timings alternate within one process where
they can so that machine noise hits both sides.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from published import published_scores  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _model():
    from headscope.core.models import load_model

    return load_model("smollm2-135m")


def _tests(handle, lengths, depths):
    from headscope.plugins.retrieval_heads.needles import (
        HaystackBuilder,
        load_haystack,
        load_needles,
    )

    builder = HaystackBuilder(handle.tokenizer, load_haystack())
    return [
        builder.build(needle, length, depth, index)
        for length in lengths
        for depth in depths
        for index, needle in enumerate(load_needles())
    ]


def _score(handle, tests, max_new_tokens, budget=None):
    from headscope.core.budget import MemoryBudget
    from headscope.core.tracing import stop_token_ids
    from headscope.plugins.retrieval_heads.analysis import RetrievalHeads

    stops = stop_token_ids(handle, stop_at_newline=True)
    return RetrievalHeads()._score_tests(
        handle, tests, max_new_tokens, stops, budget or MemoryBudget(), 0, 1, lambda *a: None
    )


def part_a(handle, length: int, depths, max_new_tokens: int) -> dict:
    from headscope.core.tracing import stop_token_ids

    tests = _tests(handle, [length], depths)
    stops = stop_token_ids(handle, stop_at_newline=True)
    _score(handle, tests[:1], 2)  # warm-up
    published_scores(handle.hf_model, tests[0], 2, stops)
    started = time.perf_counter()
    ours = _score(handle, tests, max_new_tokens)
    ours_s = time.perf_counter() - started
    started = time.perf_counter()
    theirs = [published_scores(handle.hf_model, t, max_new_tokens, stops) for t in tests]
    theirs_s = time.perf_counter() - started
    started = time.perf_counter()
    for test in tests:  # the floor: the prompt's forward pass alone, which both need
        with torch.no_grad():
            handle.hf_model(torch.tensor([test.prompt_ids]), logits_to_keep=1)
    prefill_s = time.perf_counter() - started
    identical = [
        o.tokens == tokens and torch.equal(o.scores, scores)
        for o, (tokens, scores) in zip(ours, theirs, strict=True)
    ]
    print(
        f"(a) {len(tests)} tests at {length} tokens: headscope {ours_s:.1f}s, published "
        f"{theirs_s:.1f}s -> {theirs_s / ours_s:.2f}x faster (target >= 3x); identical "
        f"scores and tokens on {sum(identical)}/{len(identical)} tests; the prefills alone "
        f"{prefill_s:.1f}s, so no scorer that runs them can be more than "
        f"{theirs_s / prefill_s:.2f}x faster here",
        flush=True,
    )
    return {"tests": len(tests), "headscope_s": ours_s, "published_s": theirs_s,
            "prefill_s": prefill_s, "identical": all(identical)}  # fmt: skip


def child(mode: str, length: int, max_new_tokens: int) -> None:
    """Score one test in this process; print the peak resident memory it added."""
    handle = _model()
    from headscope.core.tracing import stop_token_ids

    tests = _tests(handle, [length], [50])[:1]
    stops = stop_token_ids(handle, stop_at_newline=True)
    before = _peak_bytes()
    if mode == "headscope":
        _score(handle, tests, max_new_tokens)
    else:
        published_scores(handle.hf_model, tests[0], max_new_tokens, stops)
    print(json.dumps({"before": before, "peak": _peak_bytes()}))


def _peak_bytes() -> int:
    """This process's peak resident memory (VmHWM), or the GPU's peak allocation."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def part_b(lengths, max_new_tokens: int, plot: Path | None) -> dict:
    rows = {}
    for mode in ("headscope", "published"):
        for length in lengths:
            out = subprocess.run(
                [sys.executable, __file__, "--child", mode, "--length", str(length),
                 "--max-new-tokens", str(max_new_tokens)],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            peak = json.loads(out.stdout.strip().splitlines()[-1])
            rows[(mode, length)] = (peak["peak"] - peak["before"]) / 2**20
            print(f"    {mode} at {length} tokens: +{rows[(mode, length)]:.0f} MiB", flush=True)
    for mode in ("headscope", "published"):
        mib = [rows[(mode, n)] for n in lengths]
        per_k = (mib[-1] - mib[0]) / ((lengths[-1] - lengths[0]) / 1000)
        # log-log slope of the added memory over the length: 1 linear, 2 quadratic
        slope = torch.tensor(mib).clamp(min=1).log().diff() / torch.tensor(lengths).log().diff()
        print(
            f"(b) {mode}: " + ", ".join(f"{n}: {m:.0f} MiB" for n, m in zip(lengths, mib, strict=True))
            + f"; {per_k:.0f} MiB per 1k tokens; growth exponent per doubling "
            + ", ".join(f"{s:.2f}" for s in slope.tolist()),
            flush=True,
        )  # fmt: skip
    if plot is not None:
        from headscope.core.plots import line_plot

        figure = line_plot(
            {mode: (list(lengths), [rows[(mode, n)] for n in lengths])
             for mode in ("headscope", "published")},
            "peak memory of scoring one needle test (smollm2-135m)",
            "context length (tokens)",
            "added peak memory (MiB)",
        )  # fmt: skip
        plot.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(plot, dpi=120, bbox_inches="tight")
        print(f"    plot written to {plot}")
    return {f"{mode}_{n}": v for (mode, n), v in rows.items()}


def _run_analysis(handle, params: dict, max_memory: int | None):
    from headscope.core.analysis import RunContext
    from headscope.plugins.retrieval_heads.analysis import RetrievalHeads

    ctx = RunContext(model_loader=lambda: handle, seed=0, max_memory=max_memory)
    parsed = RetrievalHeads.parse_params(params)
    started = time.perf_counter()
    finding = RetrievalHeads().run(ctx, parsed)
    return time.perf_counter() - started, finding


def part_c(handle, params: dict) -> dict:
    batched_s, batched = _run_analysis(handle, params, None)
    single_s, single = _run_analysis(handle, params, 1)
    same_scores = sorted(batched.head_scores) == sorted(single.head_scores)
    same_metrics = batched.metrics == single.metrics
    heads = [
        {(layer, head) for layer, head, metric, value in f.head_scores
         if metric == "retrieval_score" and value > 0.1}
        for f in (batched, single)
    ]  # fmt: skip
    jaccard = len(heads[0] & heads[1]) / max(1, len(heads[0] | heads[1]))
    print(
        f"(c) retrieval-heads run {params or '(defaults)'}: batched {batched_s:.1f}s, one at a "
        f"time {single_s:.1f}s -> {single_s / batched_s:.2f}x (target >= 2x); same head "
        f"scores {same_scores}, same metrics {same_metrics}; retrieval heads (> 0.1) "
        f"{len(heads[0])} vs {len(heads[1])}, Jaccard {jaccard:.3f} (target >= 0.9)",
        flush=True,
    )
    return {"batched_s": batched_s, "single_s": single_s, "same": same_scores and same_metrics,
            "jaccard": jaccard}  # fmt: skip


def _mean_scores(handle, tests, max_new_tokens, budget=None):
    started = time.perf_counter()
    outcomes = [o for o in _score(handle, tests, max_new_tokens, budget) if o.counted]
    seconds = time.perf_counter() - started
    return torch.stack([o.scores for o in outcomes]).mean(0), len(outcomes), seconds


def part_d(handle, lengths, depths, max_new_tokens: int, one_at_a_time: bool = False) -> dict:
    from headscope.core.budget import MemoryBudget
    from headscope.core.devices import cpu_multiplies_bfloat16
    from headscope.plugins.retrieval_heads.analysis import top_heads

    tests = _tests(handle, lengths, depths)
    # bfloat16 rounding depends on the shapes multiplied, so on how tests are batched
    budget = MemoryBudget(1) if one_at_a_time else None
    full, counted_full, full_s = _mean_scores(handle, tests, max_new_tokens, budget)
    handle.hf_model.to(torch.bfloat16)
    try:
        half, counted_half, half_s = _mean_scores(handle, tests, max_new_tokens, budget)
    finally:
        handle.hf_model.to(torch.float32)
    top_full, top_half = set(top_heads(full, 10)), set(top_heads(half, 10))
    above = [{tuple(h) for h in (s > 0.1).nonzero().tolist()} for s in (full, half)]
    jaccard = len(above[0] & above[1]) / max(1, len(above[0] | above[1]))
    gap = float((full - half).abs().max())
    beyond = int(((full - half).abs() > 0.02).sum())
    print(
        f"(d) bfloat16 vs float32 on {len(tests)} tests"
        f"{', one at a time' if one_at_a_time else ''} (counted {counted_half} vs "
        f"{counted_full}): top-10 heads shared {len(top_full & top_half)}/10, largest score "
        f"difference {gap:.4f} (target: 10/10 and <= 0.02; {beyond} of {full.numel()} heads "
        f"differ by more); heads above 0.1 "
        f"{len(above[1])} vs {len(above[0])}, Jaccard {jaccard:.3f}; scoring {half_s:.1f}s vs "
        f"{full_s:.1f}s -> {full_s / half_s:.2f}x faster in bfloat16 "
        f"(AMX on this CPU: {cpu_multiplies_bfloat16()})",
        flush=True,
    )
    return {"top10_shared": len(top_full & top_half), "max_gap": gap, "beyond": beyond,
            "jaccard": jaccard,
            "float32_s": full_s, "bfloat16_s": half_s}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--parts", default="a,b,c,d", help="comma-separated parts to run")
    parser.add_argument("--small", action="store_true", help="quick settings, to check it runs")
    parser.add_argument("--length", type=int, default=2000, help="(a) prompt length")
    parser.add_argument("--lengths", default="1000,2000,4000,8000", help="(b) lengths")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument(
        "--one-at-a-time", action="store_true", help="(d) score the tests one per pass"
    )
    parser.add_argument("--plot", type=Path, default=ROOT / "docs/results/scale-memory.png")
    parser.add_argument("--child", choices=["headscope", "published"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.length, args.max_new_tokens)
        return
    parts = set(args.parts.split(","))
    lengths = [int(n) for n in args.lengths.split(",")]
    depths = [10, 50, 90]
    run_params: dict = {}  # (c): the default run
    precision_lengths = [500, 1000, 2000]  # (d): the default scoring tests
    if args.small:
        args.length, lengths, depths = 300, [300, 600], [50]
        run_params = {"lengths": [300], "depths": [50], "mask_lengths": [300], "random_draws": 1}
        precision_lengths = [300]
        args.max_new_tokens = min(args.max_new_tokens, 12)
        if args.plot == parser.get_default("plot"):
            args.plot = None
    print(f"smollm2-135m on {torch.get_num_threads()} threads, torch {torch.__version__}")
    results = {}
    handle = _model() if parts & {"a", "c", "d"} else None
    if "a" in parts:
        results["a"] = part_a(handle, args.length, depths, args.max_new_tokens)
    if "b" in parts:
        results["b"] = part_b(lengths, args.max_new_tokens, args.plot)
    if "c" in parts:
        results["c"] = part_c(handle, run_params)
    if "d" in parts:
        results["d"] = part_d(
            handle, precision_lengths, depths, args.max_new_tokens, args.one_at_a_time
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
