"""attention-sinks' calibrated task metric against a plain PyTorch computation.

The reference finds each prompt's sinks from the plain model's eager attention
maps by hand (mean attention from later rows above the threshold, the head's
first sink kept) and rescales them after the softmax in the hand-written eager
attention of `helpers.reference`; the metric is the answer's logit minus the
distractor's at the last position.
"""

from __future__ import annotations

import numpy as np
import torch

from headscope.core import tracing as T
from headscope.core.tasks import JsonlTask, TaskExample, prepare_task
from headscope.plugins.attention_sinks.analysis import AttentionSinksParams, Prompts

from helpers.models import tiny_handle
from helpers.reference import BIAS_SPEC, biased_model, eager_model

ROWS = [
    ("the cat sat on the mat and the cat", " ", "x", "the dog sat on the mat and the dog"),
    ("abc abc abc ab", "c", "d", "abd abe abf ab"),
    ("one two one two one tw", "o", "e", "one tqo ont twe oni tw"),
]
LAYER, HEAD, THRESHOLD, BETA = 1, 2, 0.08, 0.4


def hand_sinks(model, ids: list[int]) -> list[int]:
    with torch.no_grad():
        a = model(torch.tensor([ids]), output_attentions=True).attentions[LAYER][0, HEAD]
    n = len(ids)
    received = [float(a[j + 1 :, j].mean()) if j < n - 1 else 0.0 for j in range(n)]
    above = [j for j in range(n) if received[j] > THRESHOLD]
    return above[1:]  # ACT keeps the first sink


def test_calibrated_metric_matches_hand_written_rescaling():
    handle = tiny_handle("llama")
    examples = [TaskExample(p, (a,), (d,), corrupted=c) for p, a, d, c in ROWS]
    data = prepare_task(handle, JsonlTask("rows.jsonl", examples), 10, np.random.default_rng(0))
    params = AttentionSinksParams(threshold=THRESHOLD, beta=BETA, batch_size=2)
    prompts = Prompts(handle, data, [LAYER], params)
    ours = prompts.outcomes(handle, T.head_map({LAYER: [HEAD]}), BETA)["metric"]
    plain = prompts.outcomes(handle, None, BETA)["metric"]

    model = eager_model("llama")
    calibrated_any = False
    for pair, got, unchanged in zip(data.pairs, ours, plain, strict=True):
        sinks = hand_sinks(model, pair.clean)
        calibrated_any |= bool(sinks)
        spec = {"heads": [], "keys": [], "value": 0.0, "mode": "add", "query_from": None}
        spec.update({"sinks": {HEAD: sinks}, "beta": BETA})
        BIAS_SPEC.clear()
        BIAS_SPEC[LAYER] = spec
        try:
            with torch.no_grad():
                logits = biased_model("llama")(torch.tensor([pair.clean])).logits[0, -1]
        finally:
            BIAS_SPEC.clear()
        expected = float(logits[pair.answers[0]] - logits[pair.distractors[0]])
        assert abs(got - expected) < 1e-4
        if not sinks:
            assert abs(got - unchanged) < 1e-5
    assert calibrated_any  # at least one prompt had a sink to calibrate
