"""Every primitive through nnsight's remote="local" path: the traces serialise.

remote="local" serialises the trace exactly as a request to NDIF would, hides
modules that are not installed on the server, deserialises and runs it. Results
must equal the plain local run.
"""

from __future__ import annotations

import pytest
import torch

from headscope.core import tracing as T

from helpers.models import tiny_handle
from helpers.reference import last_row_argmax, local_and_remote

PROMPTS = ["Remote execution check, one.", "And two"]


def _items(handle, batch):
    layers = list(range(handle.n_layers))
    source = T.forward(handle, batch, [T.HeadOutputs(layers)], logits_at=None)
    means = T.mean_head_outputs(handle, batch, [0])
    return {
        "rows": [T.AttentionRows(layers, [0, -1], output="probs")],
        "argmax": [T.AttentionRows(layers, [-1], output="argmax")],
        "capture": [T.HeadOutputs(layers, [1, -1])],
        "zero": [T.HeadAblation(T.head_map({0: [1]}))],
        "mean": [T.HeadAblation(T.head_map({0: [2]}), mode="mean", means=means)],
        "uniform": [T.UniformAttention(T.head_map({1: [0, 3]}))],
        "patch": [T.HeadPatch(T.head_map({1: [1]}), {1: source.get("heads", 1) * 0.5})],
        "bias": [T.AttentionBias(T.head_map({1: [2]}), [0, 1], 0.7, mode="scaled")],
    }


def _same(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _same(a[key], b[key])
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    else:
        assert a == b


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_forward_primitives_serialise(family):
    handle = tiny_handle(family)
    batch = T.make_batch(handle, PROMPTS)
    for name, items in _items(handle, batch).items():
        local, remote = local_and_remote(handle, T.forward, batch, items)
        _same(local.logits, remote.logits)
        _same(local.records, remote.records), name


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_generation_primitives_serialise(family):
    handle = tiny_handle(family)
    batch = T.make_batch(handle, PROMPTS[:1])
    items = [
        T.UniformAttention(T.head_map({0: [1]})),
        T.AttentionBias(T.head_map({1: [0]}), [0, 2], 1.5),
        T.AttentionRows([1, 2], [-1], output="argmax"),
    ]
    local, remote = local_and_remote(handle, T.generate, batch, 4, items, stop_ids=[])
    assert local.tokens == remote.tokens
    for a, b in zip(local.steps, remote.steps, strict=True):
        _same(a, b)


def test_a_batch_loop_is_one_request_and_gives_the_local_results(monkeypatch):
    from nnsight.intervention.backends.local import LocalSimulationBackend

    from headscope.core.budget import MemoryBudget, run_batched

    handle = tiny_handle("llama")
    prompts = [[1, 2, 3, 4, 5], [3, 4, 5, 6, 7, 8], [9, 9, 9], [5, 4, 3, 2]]
    one_each = MemoryBudget(1)  # a budget of one prompt per pass: four batches
    local = run_batched(handle, prompts, lambda g: last_row_argmax(handle, g), len, one_each)
    requests, send = [], LocalSimulationBackend.__call__
    monkeypatch.setattr(
        LocalSimulationBackend, "__call__", lambda self, t: requests.append(1) or send(self, t)
    )
    reported = []
    handle.remote = "local"
    try:
        remote = run_batched(
            handle, prompts, lambda g: last_row_argmax(handle, g), len, one_each,
            progress=lambda done, total: reported.append((done, total)),
        )  # fmt: skip
    finally:
        handle.remote = False
    assert len(requests) == 1
    assert reported == [(4, 4)]  # the server reports nothing; the end is reported here
    assert not handle.in_request
    for a, b in zip(local, remote, strict=True):
        assert torch.equal(a, b)


def test_the_shipped_handle_and_context_are_the_servers_own():
    import pickle

    from headscope.core.analysis import RunContext
    from headscope.core.models import ModelHandle

    handle = tiny_handle("llama")
    handle.remote = True
    try:
        shipped = ModelHandle.__new__(ModelHandle)  # as the request's pickler rebuilds it
        shipped.__setstate__(handle.__getstate__())
    finally:
        handle.remote = False
    assert shipped.remote is False and shipped.in_request  # traces there are the request's
    assert shipped.lock is not handle.lock
    ctx = RunContext(lambda: handle, seed=5, progress=lambda *a: True, max_memory=1000)
    copy = pickle.loads(pickle.dumps(ctx))
    copy.progress(1, 2, "on the server")  # reports to nobody, cancels nothing
    assert not copy.cancelled and copy.seed == 5 and copy.budget.max_bytes == 1000
    with pytest.raises(Exception, match="no model"):
        _ = copy.model


def test_an_error_on_the_server_comes_back_and_leaves_the_handle_remote():
    from headscope.core.budget import run_batched
    from headscope.core.errors import ContextTooLongError

    handle = tiny_handle("llama")
    too_long = [[1] * (handle.max_positions + 1)]
    handle.remote = "local"
    try:
        with pytest.raises(ContextTooLongError, match="positions"):
            run_batched(handle, too_long, lambda g: last_row_argmax(handle, g), len)
        assert handle.remote == "local" and not handle.in_request
    finally:
        handle.remote = False


def test_a_per_item_loop_goes_in_a_bounded_number_of_requests(monkeypatch):
    from nnsight.intervention.backends.local import LocalSimulationBackend

    from headscope.core.budget import REQUESTS_PER_LOOP, run_each

    handle = tiny_handle("llama")
    prompts = [[1 + i % 7, 2, 3 + i % 5, 4] for i in range(40)]
    local = run_each(handle, prompts, lambda p: last_row_argmax(handle, [p])[0])
    requests, send = [], LocalSimulationBackend.__call__
    monkeypatch.setattr(
        LocalSimulationBackend, "__call__", lambda self, t: requests.append(1) or send(self, t)
    )
    reported = []
    handle.remote = "local"
    try:
        remote = run_each(
            handle, prompts, lambda p: last_row_argmax(handle, [p])[0],
            progress=lambda done, total: reported.append(done),
        )  # fmt: skip
    finally:
        handle.remote = False
    assert len(requests) == 14 <= REQUESTS_PER_LOOP  # 3 items per request
    assert reported == [min(40, 3 * k) for k in range(1, 15)]
    for a, b in zip(local, remote, strict=True):
        assert torch.equal(a, b)
