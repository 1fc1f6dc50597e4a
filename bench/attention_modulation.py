"""Steered generation time vs plain generation on the same prompts, in one run.

Scores context heads on a few calibration prompts (the realistic head set: the top
`--top-k` heads by answer_context_mass in layers 2..L-1), then generates
`--new-tokens` tokens for the same held-out counterfactual prompts with headscope's
traced greedy decoding: plain (no intervention) and steered by each setting,
rotating the order every repetition. Every row decodes the full length (no stop
tokens), so each setting does the same number of steps. Prints, per setting, the
fastest and median seconds and the ratio to plain two ways: fastest vs fastest,
and the median of the ratios within each repetition (robust to a busy machine).
Target for the default PAINT setting: at most 1.3x. transformers' own `generate`
is timed for reference.

    .venv/bin/python bench/attention_modulation.py                  # smollm2-135m
    .venv/bin/python bench/attention_modulation.py --model tiny-llama --repeats 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from headscope.core import tracing as T
from headscope.core.models import load_model
from headscope.plugins.context.data import load_dataset, split
from headscope.plugins.context.modulation import Modulation, heads_by_score, layer_heads
from headscope.plugins.context.sensitivity import context_sensitivity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=8, help="Held-out prompts (one batch).")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--alpha", type=float, default=0.5)
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))

    handle = load_model(args.model)
    examples = load_dataset("counterfactual", 2 * args.prompts + 8, seed=0)
    calibration, held_out = split(examples, 0.3, seed=0)
    scores = context_sensitivity(handle, [e.marked(handle) for e in calibration[:8]], 4)
    matrix = scores["answer_context_mass"]
    layers = list(range(min(2, handle.n_layers - 1), handle.n_layers))
    ranked = {
        (layer, head): float(matrix[layer, head])
        for layer in layers
        for head in range(handle.n_heads)
    }
    top = heads_by_score(ranked, "top", args.top_k, layers)
    settings = {
        f"paint top-{args.top_k} (default)": Modulation(top, alpha=args.alpha),
        f"pasta top-{args.top_k}": Modulation(top, form="pasta"),
        f"paint top-{args.top_k} + sinks": Modulation(top, alpha=args.alpha, sink_beta=0.4),
        "paint all heads": Modulation(layer_heads(handle, layers), alpha=args.alpha),
    }
    marked = [e.marked(handle) for e in held_out[: args.prompts]]
    batch = T.make_batch(handle, [list(m.ids) for m in marked])

    def plain():
        return T.generate(handle, batch, args.new_tokens, [], stop_ids=[])

    def steered(modulation):
        items = modulation.items(handle, batch, marked)
        return T.generate(handle, batch, args.new_tokens, items, stop_ids=[])

    def transformers_generate():
        with torch.no_grad():
            handle.hf_model.generate(
                **{k: v for k, v in batch.model_inputs().items() if k != "position_ids"},
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                do_sample=False,
                pad_token_id=handle.tokenizer.pad_token_id,
            )

    runs = {"plain": plain, "transformers generate": transformers_generate}
    runs.update({name: (lambda m=m: steered(m)) for name, m in settings.items()})
    for run in runs.values():  # warm up every path once
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for repeat in range(args.repeats):
        shift = repeat % len(names)  # rotate the order: no setting always runs first
        for name in names[shift:] + names[:shift]:
            started = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - started)

    print(
        f"{handle.name}: {len(marked)} prompts x {args.new_tokens} new tokens, "
        f"batch width {batch.width}, {args.repeats} repeats, top-{args.top_k} heads in "
        f"{len(top)} layers"
    )
    print(
        f"{'setting':34} {'min s':>8} {'median s':>9} {'ratio (min)':>12} "
        f"{'ratio (median of paired)':>25}"
    )
    best_plain = min(times["plain"])
    ratios = {}
    for name in names:
        paired = [t / p for t, p in zip(times[name], times["plain"], strict=True)]
        ratios[name] = (min(times[name]) / best_plain, statistics.median(paired))
        print(
            f"{name:34} {min(times[name]):8.3f} {statistics.median(times[name]):9.3f} "
            f"{ratios[name][0]:11.2f}x {ratios[name][1]:24.2f}x"
        )
    default = next(iter(settings))
    best, paired = ratios[default]
    verdict = "met" if max(best, paired) <= 1.3 else "missed"
    print(
        f"target: {default} at most 1.3x plain -> {best:.2f}x (min), "
        f"{paired:.2f}x (median of paired runs): {verdict}"
    )


if __name__ == "__main__":
    main()
