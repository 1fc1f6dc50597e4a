"""Retrieval-head scoring speed, memory and exactness, measured side by side.

    .venv/bin/python bench/retrieval_heads.py [--length 2000] [--repeats 2]

On the same needle-in-a-haystack prompts (smollm2-135m, every built-in needle,
depth 50%) it prints:

(a) scoring time vs plain greedy generation of the same tokens (transformers
    `generate`, no tracing); target: at most 1.3x;
(b) scoring time vs the naive reference that asks transformers for every attention
    map (eager attention, output_attentions=True); target: at least 3x faster;
(c) peak resident memory of a process doing each (separate child processes);
(d) whether both give identical per-head scores.

Timings alternate between methods within one run so machine noise hits both.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch


def _setup(length: int):
    from headscope.core import tracing as T
    from headscope.core.models import load_model
    from headscope.plugins.retrieval_heads.needles import (
        HaystackBuilder,
        load_haystack,
        load_needles,
    )

    handle = load_model("smollm2-135m")
    builder = HaystackBuilder(handle.tokenizer, load_haystack())
    tests = [builder.build(n, length, 50, i) for i, n in enumerate(load_needles())]
    stops = T.stop_token_ids(handle, stop_at_newline=True)
    return handle, tests, stops


def _plain_generate(handle, test, n_tokens: int) -> float:
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


def child(mode: str, length: int) -> None:
    """Score one test in this process and print its peak resident memory."""
    from headscope.plugins.retrieval_heads.analysis import RetrievalHeads
    from headscope.plugins.retrieval_heads.reference import eager_copy, reference_scores

    handle, tests, stops = _setup(length)
    model = eager_copy(handle) if mode == "naive" else None
    before = _peak_kib()
    if mode == "naive":
        reference_scores(model, tests[0], 32, stops, handle.tokenizer.pad_token_id)
    else:
        RetrievalHeads()._score_test(handle, tests[0], 32, stops)
    print(json.dumps({"peak_kib": _peak_kib(), "before_kib": before}))


def _peak_kib() -> int:
    """This process's peak resident memory. Linux's VmHWM belongs to the process image
    (getrusage's maxrss survives exec and would report the parent's peak)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _child_peak(mode: str, length: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", mode, "--length", str(length)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--length", type=int, default=2000, help="prompt length in tokens")
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds per test")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--child", choices=["ours", "naive"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.child:
        child(args.child, args.length)
        return

    from headscope.plugins.retrieval_heads.analysis import RetrievalHeads
    from headscope.plugins.retrieval_heads.reference import eager_copy, reference_scores

    # memory first, in child processes started while this one is still small
    peaks = {mode: _child_peak(mode, args.length) for mode in ("ours", "naive")}
    handle, tests, stops = _setup(args.length)
    naive_model = eager_copy(handle)
    analysis = RetrievalHeads()
    pad = handle.tokenizer.pad_token_id
    print(
        f"smollm2-135m, {len(tests)} prompts of {[len(t.prompt_ids) for t in tests]} tokens, "
        f"{torch.get_num_threads()} threads"
    )

    # warm-up (first calls compile kernels and instrument modules)
    analysis._score_test(handle, tests[0], 4, stops)
    _plain_generate(handle, tests[0], 2)

    ours_t, plain_t, naive_t, identical = [], [], [], []
    for round_ in range(args.repeats):
        for test in tests:
            started = time.perf_counter()
            outcome = analysis._score_test(handle, test, args.max_new_tokens, stops)
            ours_t.append(time.perf_counter() - started)
            plain_t.append(_plain_generate(handle, test, len(outcome.tokens)))
            started = time.perf_counter()
            tokens, reference = reference_scores(naive_model, test, args.max_new_tokens, stops, pad)
            naive_t.append(time.perf_counter() - started)
            if round_ == 0:
                identical.append(
                    tokens == outcome.tokens and torch.equal(reference, outcome.scores)
                )
            print(
                f"  round {round_} needle {test.needle_index}: ours {ours_t[-1]:.2f}s  "
                f"plain {plain_t[-1]:.2f}s  naive {naive_t[-1]:.2f}s  "
                f"({len(outcome.tokens)} tokens, {outcome.response!r})",
                flush=True,
            )

    ours, plain, naive = sum(ours_t), sum(plain_t), sum(naive_t)
    print()
    print(
        f"(a) scoring / plain greedy generation:  {ours / plain:.2f}x  "
        f"(total {ours:.1f}s vs {plain:.1f}s; median per test {statistics.median(ours_t):.2f}s vs "
        f"{statistics.median(plain_t):.2f}s; target <= 1.3x)"
    )
    print(
        f"(b) naive full-attention reference / scoring:  {naive / ours:.2f}x faster  "
        f"(total {naive:.1f}s vs {ours:.1f}s; target >= 3x)"
    )
    print(
        f"(c) peak resident memory, one test:  scoring {peaks['ours']['peak_kib'] / 1024:.0f} MiB, "
        f"naive {peaks['naive']['peak_kib'] / 1024:.0f} MiB "
        f"(after loading: {peaks['ours']['before_kib'] / 1024:.0f} / {peaks['naive']['before_kib'] / 1024:.0f} MiB)"
    )
    print(
        f"(d) identical per-head scores and tokens on all {len(identical)} prompts: {all(identical)}"
    )


if __name__ == "__main__":
    main()
