"""Attention-sink detection (`core.tracing.sinks`) against attention written out by hand.

The reference takes the plain transformers model's eager attention maps of each
prompt alone (no padding), and applies ACT's rule by hand: key j of a head is a
sink when the mean attention it receives from the rows after it exceeds the
threshold; the head's earliest sink is kept (not calibrated).
"""

from __future__ import annotations

import torch

from headscope.core import tracing as T

from helpers.models import tiny_handle
from helpers.reference import eager_model

PROMPTS = ["the cat sat on the mat and the dog sat on the log", "a b c a b c a"]


def reference_received(model, ids: list[int]) -> list[torch.Tensor]:
    """Per layer [H, n]: mean attention key j gets from rows i > j (0 for the last)."""
    with torch.no_grad():
        maps = model(torch.tensor([ids]), output_attentions=True).attentions
    n = len(ids)
    out = []
    for attention in maps:
        a = attention[0]  # [H, n, n]
        received = torch.zeros(a.shape[0], n)
        for j in range(n - 1):
            received[:, j] = a[:, j + 1 :, j].mean(-1)
        out.append(received)
    return out


def reference_sinks(received: torch.Tensor, threshold: float) -> torch.Tensor:
    sinks = received > threshold
    for head in range(sinks.shape[0]):
        above = [j for j in range(sinks.shape[1]) if sinks[head, j]]
        if above:
            sinks[head, above[0]] = False  # ACT keeps the first sink
    return sinks


def test_sinks_match_hand_written_attention_on_a_padded_batch():
    handle = tiny_handle("llama")
    model = eager_model("llama")
    ids = [handle.encode(p) for p in PROMPTS]
    received = [reference_received(model, i) for i in ids]
    # a threshold near the median received attention, in the widest gap between
    # neighbouring values there, so float rounding cannot flip a comparison
    values = torch.cat([r.flatten() for rs in received for r in rs]).unique()
    middle = range(len(values) // 3, 2 * len(values) // 3)
    i = max(middle, key=lambda k: float(values[k + 1] - values[k]))
    threshold = float(values[i] + values[i + 1]) / 2
    batch = T.make_batch(handle, ids)
    layers = list(range(handle.n_layers))
    found = T.find_sinks(handle, batch, layers, threshold)
    later_sinks = 0
    for row, prompt in enumerate(ids):
        pad = batch.pads[row]
        for layer in layers:
            expected = reference_sinks(received[row][layer], threshold)
            got = found[layer][row, :, pad : pad + len(prompt)]
            assert torch.equal(got, expected), (row, layer)
            assert not found[layer][row, :, :pad].any()  # padding is never a sink
            later_sinks += int(expected[:, 1:].sum())
    assert later_sinks > 0  # sinks beyond the first token were found and compared


def test_sink_rule_on_hand_written_received_attention():
    received = torch.tensor(
        [
            [[0.9, 0.05, 0.3, 0.2, 0.0]],  # first token and two later sinks
            [[0.0, 0.02, 0.4, 0.01, 0.3]],  # no first-token sink: column 2 is kept
        ]
    )  # [b=2, H=1, width=5]
    assert T.sink_mask(received, 0.1).tolist() == [
        [[False, False, True, True, False]],
        [[False, False, False, False, True]],
    ]
    assert T.sink_mask(received, 0.1, keep_first=False)[1, 0].tolist() == [
        False,
        False,
        True,
        False,
        True,
    ]
    assert not T.sink_mask(torch.zeros(1, 2, 3), 0.1).any()
