"""retrieval-heads in batches: left-padded batches score and mask exactly as one
test at a time does, and a run under any memory budget (or an injected
out-of-memory) stores the same findings."""

from __future__ import annotations

import pytest
import torch

from headscope.core import tracing as T
from headscope.plugins.retrieval_heads import analysis as retrieval
from headscope.plugins.retrieval_heads.analysis import RetrievalHeads
from headscope.plugins.retrieval_heads.needles import HaystackBuilder, Needle, load_haystack

from helpers.cli import run_cli
from helpers.models import tiny_handle
from helpers.reference import FAMILIES

NEEDLE = Needle(
    "The name of the captain's parrot was Admiral Pickles.",
    "What was the name of the captain's parrot?",
    "Admiral Pickles",
    "The name of the captain's parrot was",
)


def needle_tests(handle, lengths=(240, 300), depths=(20, 70)):
    builder = HaystackBuilder(handle.tokenizer, load_haystack())
    return [builder.build(NEEDLE, n, d) for n in lengths for d in depths]


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_scoring_equals_one_test_at_a_time(family):
    handle = tiny_handle(family)
    tests = needle_tests(handle)
    assert len({len(t.prompt_ids) for t in tests}) > 1  # the batch is padded
    analysis = RetrievalHeads()
    batched = analysis._score_batch(handle, tests, 10, stops=[])
    for test, outcome in zip(tests, batched, strict=True):
        alone = analysis._score_test(handle, test, 10, stops=[])
        assert outcome.tokens == alone.tokens
        # a span over the whole prompt counts every copy event, not only the answer's
        whole = (0, len(test.prompt_ids))
        span_test = type(test)(**{**test.__dict__, "answer_span": whole})
        assert torch.equal(outcome.scores, alone.scores)
        assert torch.equal(
            analysis._score_test(handle, span_test, 10, stops=[]).scores,
            analysis._score_batch(handle, [span_test, *tests], 10, stops=[])[0].scores,
        )


@pytest.mark.parametrize("family", FAMILIES)
def test_per_row_masks_in_one_batch_equal_separate_runs(family):
    handle = tiny_handle(family)
    tests = needle_tests(handle, lengths=(240, 300), depths=(50,))
    masks = [{}, {0: (0, 1)}, {1: (2,), handle.n_layers - 1: (0, 3)}]
    jobs = [(test, 1, "top", mask) for test in tests for mask in masks]
    analysis = RetrievalHeads()
    together = analysis._masked_batch(handle, jobs, 8, stops=[])
    for job, response in zip(jobs, together, strict=True):
        assert analysis._masked_batch(handle, [job], 8, stops=[]) == [response]


def test_per_row_uniform_attention_matches_one_map_per_run():
    handle = tiny_handle("llama")
    batch = T.make_batch(handle, ["The quick brown fox jumps", "Hello"])
    maps = [{0: (1,), 2: (0, 3)}, {}]
    rows = T.AttentionRows([0, 1, 2], [-1], output="probs")
    together = T.generate(handle, batch, 4, [T.UniformAttention(maps), rows], stop_ids=[])
    for row, heads in enumerate(maps):
        single = T.make_batch(handle, [batch.input_ids[row, batch.pads[row] :].tolist()])
        items = [T.UniformAttention(heads)] if heads else []
        alone = T.generate(handle, single, 4, [*items, rows], stop_ids=[])
        assert together.tokens[row] == alone.tokens[0]
        pad = batch.pads[row]
        for step in range(4):
            for layer in (0, 1, 2):
                ours = together.steps[step][("rows", layer)][row, :, 0, pad:]
                torch.testing.assert_close(ours, alone.steps[step][("rows", layer)][0, :, 0])
    # the mask acts: masked heads attend uniformly, unlike the same heads unmasked
    plain = T.generate(handle, batch, 1, [rows], stop_ids=[])
    masked_rows = together.steps[0][("rows", 0)][0, 1, 0]
    assert not torch.allclose(masked_rows, plain.steps[0][("rows", 0)][0, 1, 0])
    assert torch.allclose(masked_rows, torch.full_like(masked_rows, 1 / batch.width))


def test_per_row_masks_must_match_the_batch():
    handle = tiny_handle("llama")
    batch = T.make_batch(handle, ["one", "two"])
    with pytest.raises(Exception, match="3 head maps for a batch of 2"):
        T.forward(handle, batch, [T.UniformAttention([{}, {}, {}])])


PARAMS = [
    "-p",
    "lengths=[250,320]",
    "-p",
    "depths=[30,80]",
    "-p",
    "mask_top_k=[0,2]",
    "-p",
    "mask_lengths=[250]",
    "-p",
    "random_draws=2",
    "-p",
    "max_new_tokens=6",
]


def stored(capsys, db, *extra):
    result = run_cli(
        capsys, "run", "retrieval-heads", "-m", "tiny-llama", *PARAMS, *extra, "-f", "json",
        "--db", db,
    )  # fmt: skip
    assert result.code == 0, result.err
    document = result.json()
    scores = {(r["layer"], r["head"], r["metric"]): r["value"] for r in document["head_scores"]}
    return scores, document["metrics"], document["artifacts"]


def test_any_memory_budget_and_an_injected_out_of_memory_store_the_same_findings(
    capsys, tmp_path, monkeypatch
):
    db = str(tmp_path / "r.db")
    default = stored(capsys, db)
    one_at_a_time = stored(capsys, db, "--max-memory", "1")  # too small for any batch
    assert one_at_a_time[:2] == default[:2]

    sizes = []
    real_generate = retrieval.generate

    def short_of_memory(handle, batch, *args, **kwargs):
        sizes.append(batch.size)
        if batch.size > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return real_generate(handle, batch, *args, **kwargs)

    monkeypatch.setattr(retrieval, "generate", short_of_memory)
    halved = stored(capsys, db)
    assert max(sizes) > 2 and sizes.count(1) + sizes.count(2) > 0
    assert halved[:2] == default[:2]


@pytest.mark.parametrize("value", ["lots", "0", "-5GB"])
def test_a_bad_memory_budget_is_a_clear_error_and_stores_nothing(capsys, tmp_path, value):
    db = str(tmp_path / "r.db")
    assert run_cli(capsys, "db", "upgrade", "--db", db).code == 0
    result = run_cli(
        capsys, "run", "retrieval-heads", "-m", "tiny-llama", "--max-memory", value, "--db", db
    )
    assert result.code == 1 and "memory budget" in result.err, result.err
    assert run_cli(capsys, "runs", "list", "-f", "json", "--db", db).json()["total"] == 0


def test_batched_scores_equal_one_at_a_time_on_smollm2(smollm2):
    builder = HaystackBuilder(smollm2.tokenizer, load_haystack())
    tests = [builder.build(NEEDLE, n, 50) for n in (300, 400)]
    stops = T.stop_token_ids(smollm2, stop_at_newline=True)
    analysis = RetrievalHeads()
    batched = analysis._score_batch(smollm2, tests, 12, stops)
    for test, outcome in zip(tests, batched, strict=True):
        alone = analysis._score_test(smollm2, test, 12, stops)
        assert outcome.tokens == alone.tokens and outcome.rouge == alone.rouge == 1.0
        assert torch.equal(outcome.scores, alone.scores)
