"""Circuit primitives against independent plain PyTorch computations on tiny models.

- head results (each head's residual-stream write, mean over tokens) against
  running the output projection on one head's slice at a time;
- the per-row patch against hooks that patch one prompt at a time;
- metric gradients against plain autograd with retained gradients;
- activation and attribution patching of every head against the same hooks.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from headscope.core import tracing as T
from headscope.core.metrics import TokenMetric
from headscope.core.tasks import Task, TaskExample, prepare_task
from headscope.plugins.circuits.gradients import head_output_gradients
from headscope.plugins.circuits.head_results import head_results
from headscope.plugins.circuits.patching import attribute_every_head, patch_every_head

from helpers.models import tiny_handle
from helpers.reference import FAMILIES, capture_o_inputs, dims, eager_model, hooks, out_proj

CLEAN = ["When Mary and John went out", "A quick test of patching.", "Third prompt"]
CORRUPT = ["When Alex and Sam went home", "A quack text of matching.", "Other prompt"]
ATOL = 2e-5


def _inputs(handle, prompts):
    batch = T.make_batch(handle, prompts)
    return batch, batch.model_inputs()


@pytest.mark.parametrize("family", FAMILIES)
def test_head_results_match_projection_of_one_head_at_a_time(family):
    handle = tiny_handle(family)
    batch, inputs = _inputs(handle, CLEAN)
    ours = head_results(handle, batch)  # [b, L, H, d]
    model = eager_model(family, "sdpa")
    heads, head_dim = dims(model)
    layers = list(range(handle.n_layers))
    captured = capture_o_inputs(model, family, inputs, layers)  # [b, s, H, hd]
    valid = batch.valid()
    for layer in layers:
        projection = out_proj(model, family, layer)
        with torch.no_grad():
            baseline = projection(torch.zeros(1, heads * head_dim))  # the bias alone
            for head in range(heads):
                alone = torch.zeros_like(captured[layer])
                alone[:, :, head] = captured[layer][:, :, head]
                written = projection(alone.flatten(2)) - baseline  # [b, s, d]
                for row in range(batch.size):
                    expected = written[row][valid[row]].mean(0)
                    torch.testing.assert_close(
                        ours[row, layer, head], expected, atol=ATOL, rtol=1e-4
                    )


def test_head_output_weights_respect_gpt2_conv1d_layout():
    handle = tiny_handle("gpt2")
    model = eager_model("gpt2", "sdpa")
    weights = handle.adapter.head_output_weights(model, 1)
    z = torch.randn(handle.head_dim)
    projection = out_proj(model, "gpt2", 1)
    full = torch.zeros(handle.n_heads * handle.head_dim)
    full[2 * handle.head_dim : 3 * handle.head_dim] = z
    with torch.no_grad():
        expected = projection(full[None])[0] - projection(torch.zeros(1, full.numel()))[0]
    torch.testing.assert_close(z @ weights[2], expected, atol=1e-5, rtol=0)
    # reading Conv1D like nn.Linear (transposed) gives a different map
    wrong = projection.weight.detach().T.reshape(handle.n_heads, handle.head_dim, -1)
    assert not torch.allclose(z @ wrong[2], expected, atol=1e-3)


def _patched_reference(model, family, clean_inputs, corrupt_inputs, row, layer, head):
    """Logits of one clean prompt with one head taken from its corrupted partner."""
    _, head_dim = dims(model)
    source = capture_o_inputs(model, family, corrupt_inputs, [layer])[layer][row]
    cols = slice(head * head_dim, (head + 1) * head_dim)

    def fn(module, args):
        x = args[0].clone()
        x[..., cols] = source[:, head][None]
        return (x,) + tuple(args[1:])

    single = {k: v[row : row + 1] for k, v in clean_inputs.items()}
    with hooks([(out_proj(model, family, layer), fn)]), torch.no_grad():
        return model(**single).logits[0, -1]


@pytest.mark.parametrize("family", FAMILIES)
def test_row_patch_matches_one_prompt_at_a_time_hooks(family):
    handle = tiny_handle(family)
    clean, clean_inputs = _inputs(handle, CLEAN)
    corrupt, corrupt_inputs = _inputs(handle, CORRUPT)
    assert clean.width == corrupt.width and clean.lengths == corrupt.lengths
    layers = list(range(handle.n_layers))
    recorded = T.forward(handle, corrupt, [T.HeadOutputs(layers)], logits_at=None)
    source = {layer: recorded.get("heads", layer) for layer in layers}
    # six rows: copies of the three prompts, each row patching another head
    last = handle.n_layers - 1
    plan = [(0, (0, 1)), (1, (1, 2)), (2, (last, 3)), (0, (last, 0)), (1, ()), (2, (1, 3))]
    batch = T.Batch(
        clean.input_ids[[r for r, _ in plan]],
        clean.attention_mask[[r for r, _ in plan]],
        [clean.lengths[r] for r, _ in plan],
    )
    patch = T.RowHeadPatch(
        row_heads=[[head] if head else [] for _, head in plan],
        source=source,
        source_rows=[r for r, _ in plan],
    )
    ours = T.forward(handle, batch, [patch]).logits[:, -1]
    model = eager_model(family, "sdpa")
    for i, (row, head) in enumerate(plan):
        if head:
            expected = _patched_reference(model, family, clean_inputs, corrupt_inputs, row, *head)
        else:
            with torch.no_grad():
                single = {k: v[row : row + 1] for k, v in clean_inputs.items()}
                expected = model(**single).logits[0, -1]
        torch.testing.assert_close(ours[i], expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_patching_a_head_with_its_own_output_changes_nothing(family):
    handle = tiny_handle(family)
    batch, _ = _inputs(handle, CLEAN)
    layers = list(range(handle.n_layers))
    own = T.forward(handle, batch, [T.HeadOutputs(layers)], logits_at=None)
    source = {layer: own.get("heads", layer) for layer in layers}
    every_head = [handle.heads()] * batch.size
    patch = T.RowHeadPatch(every_head, source, list(range(batch.size)))
    assert torch.equal(T.forward(handle, batch, [patch]).logits, T.forward(handle, batch).logits)


def test_row_patch_rejects_mismatched_inputs():
    handle = tiny_handle("llama")
    batch, _ = _inputs(handle, CLEAN)
    source = {0: torch.zeros(3, batch.width + 1, handle.n_heads, handle.head_dim)}
    with pytest.raises(Exception, match="equal length"):
        T.forward(handle, batch, [T.RowHeadPatch([[(0, 1)]] * 3, source, [0, 1, 2])])
    with pytest.raises(Exception, match="head 9 out of range"):
        T.forward(handle, batch, [T.RowHeadPatch([[(0, 9)]] * 3, source, [0, 1, 2])])


def _metric(kind):
    return TokenMetric.from_tokens([[70, 71], [80], [90]], [[72], [81, 82], [91]], kind)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["logit_diff", "prob_diff"])
def test_metric_gradients_match_plain_autograd(family, kind):
    handle = tiny_handle(family)
    batch, inputs = _inputs(handle, CLEAN)
    metric = _metric(kind)
    ours = head_output_gradients(handle, batch, metric)

    model = eager_model(family, "sdpa")
    heads, head_dim = dims(model)
    seen = {}

    def keep(layer):
        def fn(module, args):
            args[0].retain_grad()
            seen[layer] = args[0]

        return fn

    layers = list(range(handle.n_layers))
    with hooks([(out_proj(model, family, layer), keep(layer)) for layer in layers]):
        logits = model(**inputs).logits[:, -1]
    values = logits if kind == "logit_diff" else torch.softmax(logits, -1)
    expected_metric = torch.stack(
        [
            values[0, [70, 71]].mean() - values[0, 72],
            values[1, 80] - values[1, [81, 82]].mean(),
            values[2, 90] - values[2, 91],
        ]
        if kind == "logit_diff"
        else [
            values[0, 70] + values[0, 71] - values[0, 72],
            values[1, 80] - values[1, 81] - values[1, 82],
            values[2, 90] - values[2, 91],
        ]
    )
    expected_metric.sum().backward()
    torch.testing.assert_close(ours.metric, expected_metric.detach(), atol=1e-5, rtol=1e-4)
    for layer in layers:
        shape = (batch.size, batch.width, heads, head_dim)
        torch.testing.assert_close(
            ours.activations[layer], seen[layer].detach().view(shape), atol=ATOL, rtol=0
        )
        torch.testing.assert_close(
            ours.gradients[layer], seen[layer].grad.view(shape), atol=1e-5, rtol=1e-3
        )


class _ListTask(Task):
    name = "test-list"
    strict = True

    def __init__(self, rows):
        self.rows = rows

    def examples(self, tokenizer, n, rng):
        return [TaskExample(p, (a,), (d,), corrupted=c) for p, a, d, c in self.rows]


ROWS = [
    ("When Mary and John went out", "J", "M", "When Alex and Sam went home"),
    ("A quick test of patching.", "A", "B", "A quack text of matching."),
    ("Third prompt", "x", "y", "Other prompt"),
]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_patching_every_head_matches_hooks_and_attribution_matches_autograd(family):
    handle = tiny_handle(family)
    data = prepare_task(handle, _ListTask(ROWS), 3, np.random.default_rng(0))
    # a small pass size forces several head groups per pass and one prompt chunk
    result = patch_every_head(handle, data, ["noising", "denoising"], rows_per_pass=7)
    model = eager_model(family, "sdpa")
    clean, clean_inputs = _inputs(handle, [r[0] for r in ROWS])
    corrupt, corrupt_inputs = _inputs(handle, [r[3] for r in ROWS])
    metric = data.metric()
    with torch.no_grad():
        base = metric(model(**clean_inputs).logits[:, -1])
        base_corrupt = metric(model(**corrupt_inputs).logits[:, -1])
    torch.testing.assert_close(result.clean, base, atol=1e-4, rtol=0)
    torch.testing.assert_close(result.corrupted, base_corrupt, atol=1e-4, rtol=0)
    for layer, head in [(0, 0), (1, 3), (2, 1)]:
        changed = torch.stack(
            [
                metric.rows([row])(
                    _patched_reference(
                        model, family, clean_inputs, corrupt_inputs, row, layer, head
                    )[None]
                )[0]
                for row in range(3)
            ]
        )
        expected = (changed - base).mean()
        assert result.effects["noising"][layer, head] == pytest.approx(float(expected), abs=1e-4)
        back = torch.stack(
            [
                metric.rows([row])(
                    _patched_reference(
                        model, family, corrupt_inputs, clean_inputs, row, layer, head
                    )[None]
                )[0]
                for row in range(3)
            ]
        )
        expected = (back - base_corrupt).mean()
        assert result.effects["denoising"][layer, head] == pytest.approx(float(expected), abs=1e-4)

    attribution = attribute_every_head(handle, data, rows_per_pass=2)
    grads = head_output_gradients(handle, clean, metric)
    other = T.forward(handle, corrupt, [T.HeadOutputs(list(range(handle.n_layers)))])
    valid = clean.valid()[:, :, None]
    for layer in range(handle.n_layers):
        diff = other.get("heads", layer) - grads.activations[layer]
        expected = ((diff * grads.gradients[layer]).sum(-1) * valid).sum(dim=(0, 1)) / 3
        torch.testing.assert_close(attribution[layer], expected, atol=1e-5, rtol=1e-4)


def test_identical_prompts_have_zero_patching_effects():
    handle = tiny_handle("qwen2")
    rows = [(p, a, d, p) for p, a, d, _ in ROWS]
    data = prepare_task(handle, _ListTask(rows), 3, np.random.default_rng(0))
    result = patch_every_head(handle, data, ["noising", "denoising"], rows_per_pass=64)
    for effect in result.effects.values():
        assert torch.count_nonzero(effect) == 0
    assert torch.count_nonzero(attribute_every_head(handle, data)) == 0
