"""How many tokens one pass should take on a CPU: prefill time of the same prompts
in passes of different widths, on smollm2-135m.

    .venv/bin/python bench/cpu_batch_width.py           # 12 needle prompts of 2,000 tokens
    .venv/bin/python bench/cpu_batch_width.py --small   # 4 prompts of 300 tokens

The prompts are prefilled (no attention maps, last logits only) one at a time, then
2, 4 and all of them per pass; the rounds alternate and repeat, and each line gives
the best round's time against one at a time. A ratio above 1 means the wider pass
is slower per token, which sets `core.budget.CPU_TOKENS_PER_PASS`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from scale import _model, _tests  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--small", action="store_true", help="4 prompts of 300 tokens")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    handle = _model()
    length, depths = (300, [50]) if args.small else (2000, [10, 50, 90])
    tests = _tests(handle, [length], depths)
    width = min(len(t.prompt_ids) for t in tests)
    ids = torch.tensor([t.prompt_ids[:width] for t in tests])

    def prefill(rows: torch.Tensor) -> None:
        with torch.no_grad():
            handle.hf_model(rows, logits_to_keep=1)

    prefill(ids[:1, :64])  # warm-up
    sizes = sorted({1, 2, 4, len(ids)})
    best = {size: float("inf") for size in sizes}
    for _ in range(args.rounds):
        for size in sizes:
            started = time.perf_counter()
            for start in range(0, len(ids), size):
                prefill(ids[start : start + size])
            best[size] = min(best[size], time.perf_counter() - started)
    print(f"{len(ids)} prompts of {width} tokens on {torch.get_num_threads()} threads:")
    for size in sizes:
        print(
            f"  {size:2d} per pass ({size * width:6d} tokens): {best[size]:6.2f}s, "
            f"{best[size] / best[1]:.2f}x the time of one at a time"
        )


if __name__ == "__main__":
    main()
