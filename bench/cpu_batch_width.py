"""How many tokens one pass should take on a CPU: prefill time of the same prompts
in passes of different widths, on smollm2-135m.

    .venv/bin/python bench/cpu_batch_width.py           # 12 needle prompts of 2,000 tokens
    .venv/bin/python bench/cpu_batch_width.py --wide    # a wider model: see below
    .venv/bin/python bench/cpu_batch_width.py --small   # 4 prompts of 300 tokens

`--wide` runs 8 random prompts of 1,000 tokens through a randomly initialised
4-layer Llama of Llama-3.2-1B's width (hidden 2048, MLP 8192, 32 query heads over
8 KV heads): whether the width a pass can take depends on the model's size.

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
    parser.add_argument("--wide", action="store_true", help="a 1B-wide random model")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if args.wide:
        model, ids = _wide_model()
    else:
        handle = _model()
        length, depths = (300, [50]) if args.small else (2000, [10, 50, 90])
        tests = _tests(handle, [length], depths)
        width = min(len(t.prompt_ids) for t in tests)
        ids = torch.tensor([t.prompt_ids[:width] for t in tests])
        model = handle.hf_model
    width = ids.shape[1]

    def prefill(rows: torch.Tensor) -> None:
        with torch.no_grad():
            model(rows, logits_to_keep=1)

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


def _wide_model() -> tuple[torch.nn.Module, torch.Tensor]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=4,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval(), torch.randint(0, 32000, (8, 1000))


if __name__ == "__main__":
    main()
