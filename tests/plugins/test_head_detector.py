"""head-detector scores against a plain eager-attention computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from headscope.core.analysis import RunContext
from headscope.core.tracing import AttentionPatternScores, forward, make_batch
from headscope.plugins.head_detector import HeadDetector, HeadDetectorParams

from helpers.cli import run_cli
from helpers.models import tiny_handle
from helpers.reference import eager_model


def tl_scores(attention: torch.Tensor, tokens: list[int]) -> dict[str, torch.Tensor]:
    """TransformerLens-style "mul" scores from one prompt's eager attention [H, s, s]."""
    s = len(tokens)
    t = torch.tensor(tokens)
    dup = torch.zeros(s, s)
    ind = torch.zeros(s, s)
    prev = torch.zeros(s, s)
    sink = torch.zeros(s, s)
    for i in range(s):
        if i > 0:
            prev[i, i - 1] = 1
            sink[i, 0] = 1
        for j in range(i):
            if t[j] == t[i]:
                dup[i, j] = 1
                if j + 1 <= i:
                    ind[i, j + 1] = 1
    total = attention.sum(dim=(-1, -2))  # = s
    return {
        "duplicate_token": (attention * dup).sum(dim=(-1, -2)) / total,
        "induction": (attention * ind).sum(dim=(-1, -2)) / total,
        "previous_token": (attention * prev).sum(dim=(-1, -2)) / total,
        # sink: mean over rows 1..s-1 of attention to position 0
        "sink_mass": (attention * sink).sum(dim=(-1, -2)) / (s - 1),
    }


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_head_detector_matches_eager_attention(family):
    handle = tiny_handle(family)
    params = HeadDetectorParams(
        n_random=3,
        random_length=7,
        repeats=3,
        batch_size=2,
        prompts=["one two three four", "a longer natural prompt here", "x y"],
    )
    ctx = RunContext(lambda: handle, seed=5)
    finding = HeadDetector().run(ctx, params)
    ours = {}
    for layer, head, metric, value in finding.head_scores:
        ours.setdefault(metric, np.zeros((handle.n_layers, handle.n_heads)))[layer, head] = value

    # rebuild the same inputs and score them from eager attention maps
    rng = np.random.default_rng(5)
    special = set(handle.tokenizer.all_special_ids)
    vocab = [i for i in range(len(handle.tokenizer)) if i not in special]
    random_rows = [rng.choice(vocab, size=7, replace=True).tolist() * 3 for _ in range(3)]
    natural_rows = [handle.encode(p) for p in params.prompts]
    model = eager_model(family)
    expected = {m: np.zeros((handle.n_layers, handle.n_heads)) for m in ours}
    for rows, metrics in (
        (random_rows, ("duplicate_token", "induction")),
        (natural_rows, ("previous_token", "sink_mass")),
    ):
        for tokens in rows:
            with torch.no_grad():
                attentions = model(torch.tensor([tokens]), output_attentions=True).attentions
            for layer, attention in enumerate(attentions):
                scores = tl_scores(attention[0], tokens)
                for metric in metrics:
                    expected[metric][layer] += scores[metric].numpy() / len(rows)
    for metric in expected:
        np.testing.assert_allclose(ours[metric], expected[metric], atol=1e-5, err_msg=metric)


def test_pattern_scores_ignore_padding():
    handle = tiny_handle("llama")
    prompts = ["short", "a much longer prompt than the other one"]
    batch = make_batch(handle, prompts)
    pattern = torch.zeros(batch.size, batch.width, batch.width, dtype=torch.bool)
    for row, pad in enumerate(batch.pads):
        pattern[row, pad + 1 :, pad] = True  # attention to each prompt's first token
    result = forward(
        handle, batch, [AttentionPatternScores([0], patterns={"first": pattern})], logits_at=None
    )
    alone = []
    for prompt in prompts:
        single = make_batch(handle, [prompt])
        p = torch.zeros(1, single.width, single.width, dtype=torch.bool)
        p[0, 1:, 0] = True
        alone.append(
            forward(
                handle, single, [AttentionPatternScores([0], patterns={"first": p})], logits_at=None
            ).get("first", 0)[0]
        )
    torch.testing.assert_close(result.get("first", 0), torch.stack(alone), atol=1e-6, rtol=0)


def test_scores_do_not_depend_on_the_memory_budget(capsys, tmp_path):
    def scores(*extra):
        args = ["run", "head-detector", "-m", "tiny-llama", "-p", "n_random=3"]
        result = run_cli(capsys, *args, "-p", "random_length=6", *extra, "-f", "json",
                         "--db", str(tmp_path / "h.db"))  # fmt: skip
        assert result.code == 0, result.err
        rows = result.json()["head_scores"]
        return {(r["layer"], r["head"], r["metric"]): r["value"] for r in rows}

    batched, alone = scores(), scores("--max-memory", "1")
    assert batched.keys() == alone.keys()
    assert all(abs(batched[key] - alone[key]) < 1e-5 for key in batched)
