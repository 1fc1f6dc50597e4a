"""retrieval-heads: the haystack builder, the score, the filter, the masking draws."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from headscope.core import tracing as T
from headscope.plugins.retrieval_heads.analysis import (
    NeedleOutcome,
    RetrievalHeads,
    copy_paste_scores,
    draw_random_heads,
    non_retrieval_heads,
    rouge1_recall,
)
from headscope.plugins.retrieval_heads.needles import (
    HaystackBuilder,
    Needle,
    load_haystack,
    load_needles,
)
from headscope.plugins.retrieval_heads.reference import (
    eager_copy,
    reference_argmax,
    reference_scores,
)

from helpers.cli import run_cli
from helpers.models import tiny_handle

NEEDLE = Needle(
    "The name of the captain's parrot was Admiral Pickles.",
    "What was the name of the captain's parrot?",
    "Admiral Pickles",
    "The name of the captain's parrot was",
)


def test_builtin_needles_and_haystack_load():
    needles = load_needles()
    assert len(needles) >= 3 and all(n.answer in n.needle for n in needles)
    documents = load_haystack()
    assert len(documents) >= 8


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_needle_sits_at_a_sentence_boundary_and_the_span_is_the_answer(family):
    handle = tiny_handle(family)
    builder = HaystackBuilder(handle.tokenizer, load_haystack())
    for depth in (0, 10, 50, 90, 100):
        test = builder.build(NEEDLE, 400, depth)
        assert 395 <= len(test.prompt_ids) <= 400
        assert handle.decode(test.answer_ids).strip() == NEEDLE.answer
        before = test.prompt[: test.needle_char_start].rstrip()
        assert before == "" or before[-1] in ".!?\"'", before[-20:]
        assert test.prompt[test.needle_char_start :].startswith(NEEDLE.needle)
    shallow = builder.build(NEEDLE, 400, 10).answer_span[0]
    deep = builder.build(NEEDLE, 400, 90).answer_span[0]
    assert shallow < deep


def test_span_on_the_real_tokenizer(smollm2):
    builder = HaystackBuilder(smollm2.tokenizer, load_haystack())
    for needle in load_needles():
        test = builder.build(needle, 700, 40)
        assert len(test.prompt_ids) <= 700
        assert smollm2.decode(test.answer_ids).strip() == needle.answer


def test_rouge_filter_follows_the_published_tokenisation():
    assert rouge1_recall("Admiral Pickles", "Admiral Pickles.") == 1.0
    assert rouge1_recall("Admiral Pickles", "admiral pickles!") == 1.0
    assert rouge1_recall("roasted fennel seed", "roasting fennel seeds") == 1.0  # stemming
    assert rouge1_recall("eat a sandwich and sit in Dolores Park", "sit in the park") < 0.5


def test_copy_paste_score_by_hand():
    prompt = [10, 11, 12, 13, 14, 15]
    span = (2, 5)  # tokens 12, 13, 14
    generated = [12, 13, 99]
    argmax = torch.tensor(
        [
            [[2, 3], [0, 2]],  # step 0 emits 12: head (0,0) at 2 copies; (1,1) at 2 copies
            [[3, 3], [1, 4]],  # step 1 emits 13: (0,0),(0,1) copy; (1,1) at 4 holds 14: no
            [[4, 2], [2, 2]],  # step 2 emits 99: nothing
        ]
    )
    scores = copy_paste_scores(argmax, generated, prompt, span)
    expected = torch.tensor([[2 / 3, 1 / 3], [0.0, 1 / 3]], dtype=torch.float64)
    torch.testing.assert_close(scores, expected)


def test_failed_tests_contribute_nothing(smollm2):
    from headscope.core.analysis import Finding

    test = HaystackBuilder(smollm2.tokenizer, load_haystack()).build(NEEDLE, 300, 50)
    good = torch.zeros(30, 9, dtype=torch.float64)
    good[3, 4] = 0.5
    bad = torch.ones(30, 9, dtype=torch.float64)
    outcomes = [
        NeedleOutcome(test, "Admiral Pickles.", 1.0, good),
        NeedleOutcome(test, "nothing", 0.0, bad),
    ]
    finding = Finding()
    params = RetrievalHeads.Params()
    scores = RetrievalHeads()._aggregate(finding, outcomes, smollm2, params)
    torch.testing.assert_close(scores, good)
    assert finding.metrics["tests_counted"] == 1 and finding.metrics["tests_run"] == 2


def test_random_draws_never_contain_a_retrieval_head():
    scores = torch.zeros(6, 4)
    scores[0, 1], scores[2, 3], scores[5, 0] = 0.4, 0.11, 0.9
    pool = non_retrieval_heads(scores, 0.1)
    assert len(pool) == 24 - 3
    rng = np.random.default_rng(0)
    for _ in range(200):
        drawn = draw_random_heads(rng, pool, 10)
        assert len(set(drawn)) == 10
        assert all(scores[layer, head] <= 0.1 for layer, head in drawn)


def test_argmax_and_scores_match_the_naive_reference_on_a_tiny_model():
    handle = tiny_handle("llama")
    builder = HaystackBuilder(handle.tokenizer, load_haystack())
    model = eager_copy(handle)
    analysis = RetrievalHeads()
    for depth in (20, 70):
        test = builder.build(NEEDLE, 240, depth)
        ours = analysis._score_test(handle, test, 12, stops=[])
        tokens, argmax = reference_argmax(model, test, 12, [], pad_id=1)
        fast = T.generate(
            handle,
            T.make_batch(handle, [test.prompt_ids]),
            12,
            [T.AttentionRows(list(range(handle.n_layers)), [-1], output="argmax")],
            stop_ids=[],
        )
        assert fast.tokens[0] == tokens
        ours_argmax = torch.stack(
            [
                torch.stack(
                    [fast.steps[t][("rows", layer)][0, :, 0] for layer in range(handle.n_layers)]
                )
                for t in range(12)
            ]
        )
        assert torch.equal(ours_argmax, argmax)
        # scores over a span covering the whole prompt exercise every copy event
        whole = (0, len(test.prompt_ids))
        torch.testing.assert_close(
            copy_paste_scores(ours_argmax, tokens, test.prompt_ids, whole),
            copy_paste_scores(argmax, tokens, test.prompt_ids, whole),
        )
        _, reference = reference_scores(model, test, 12, [], pad_id=1)
        torch.testing.assert_close(ours.scores, reference)


def test_scores_match_the_naive_reference_on_smollm2(smollm2):
    builder = HaystackBuilder(smollm2.tokenizer, load_haystack())
    model = eager_copy(smollm2)
    stops = T.stop_token_ids(smollm2, stop_at_newline=True)
    analysis = RetrievalHeads()
    for index, needle in enumerate(load_needles()[:2]):
        test = builder.build(needle, 400, 50, index)
        ours = analysis._score_test(smollm2, test, 16, stops)
        tokens, reference = reference_scores(model, test, 16, stops, smollm2.tokenizer.pad_token_id)
        assert ours.rouge == 1.0
        assert ours.tokens == tokens
        assert torch.equal(ours.scores, reference), (
            "per-head scores differ from the eager reference"
        )
        assert ours.scores.max() > 0.5  # some head copies the answer


@pytest.mark.parametrize(
    "params,message",
    [
        (["-p", "depths=[50,120]"], "depths must be within 0-100"),
        (["-p", "lengths=[]"], "at least one length"),
        (["-p", "lengths=[100000]"], "exceed tiny-llama's 512 positions"),
        (
            ["-p", 'haystack_files=["/nonexistent/hay.txt"]'],
            "haystack file not found: /nonexistent/hay.txt",
        ),
        (["-p", 'template="{question} only"'], "must contain {context}"),
        (["-p", "lengths=[40]"], "leaves no room for haystack text"),
    ],
)
def test_bad_params_give_clear_errors_and_store_nothing(capsys, tmp_path, params, message):
    db = str(tmp_path / "r.db")
    assert run_cli(capsys, "db", "upgrade", "--db", db).code == 0  # listed below
    short = ["-p", "lengths=[300]"] if "lengths" not in params[1] else []
    result = run_cli(
        capsys, "run", "retrieval-heads", "-m", "tiny-llama", *short, *params, "--db", db
    )
    assert result.code == 1 and message in result.err, result.err
    assert run_cli(capsys, "runs", "list", "-f", "json", "--db", db).json()["total"] == 0


def test_empty_needles_file_is_rejected(capsys, tmp_path):
    empty = tmp_path / "needles.jsonl"
    empty.write_text("\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"needle": "x", "question": "q?", "answer": "y"}\n')
    db = str(tmp_path / "r.db")
    for needles, message in [
        (empty, "holds no needles"),
        (bad, f"{bad} line 1: the answer 'y' is not part of the needle"),
    ]:
        args = ["run", "retrieval-heads", "-m", "tiny-llama", "-p", f"needles_file={needles}"]
        result = run_cli(capsys, *args, "--db", db)
        assert result.code == 1 and message in result.err
    assert run_cli(capsys, "runs", "list", "-f", "json", "--db", db).json()["total"] == 0


def test_end_to_end_on_smollm2_with_masking_and_reuse(capsys, tmp_path):
    db = str(tmp_path / "r.db")
    args = [
        "run",
        "retrieval-heads",
        "-m",
        "smollm2-135m",
        "-f",
        "json",
        "--db",
        db,
        "-p",
        "lengths=[400]",
        "-p",
        "depths=[50]",
        "-p",
        "mask_top_k=[0,5]",
        "-p",
        "mask_lengths=[400]",
        "-p",
        "random_draws=1",
        "-p",
        "max_new_tokens=16",
    ]
    result = run_cli(capsys, *args)
    assert result.code == 0, result.err
    document = result.json()
    metrics = document["metrics"]
    assert metrics["tests_run"] == 4 and metrics["tests_counted"] >= 3
    assert 0 < metrics["fraction_above_threshold"] < 0.5
    assert {"mask_top_5_accuracy", "mask_random_5_accuracy", "mask_top_0_accuracy"} <= set(metrics)
    kinds = {r["metric"] for r in document["head_scores"]}
    assert kinds == {"retrieval_score", "activation_frequency", "kv_retrieval_score"}
    kv = [r for r in document["head_scores"] if r["metric"] == "kv_retrieval_score"]
    assert len(kv) == 30 * 3
    reused = run_cli(
        capsys, *args, "-p", f"scores_from={document['run']['id']}", "-p", "mask_top_k=[5]"
    )
    assert reused.code == 0, reused.err
    again = reused.json()
    assert again["metrics"]["scores_from_run"] == document["run"]["id"]
    first = {
        (r["layer"], r["head"]): r["value"]
        for r in document["head_scores"]
        if r["metric"] == "retrieval_score"
    }
    second = {
        (r["layer"], r["head"]): r["value"]
        for r in again["head_scores"]
        if r["metric"] == "retrieval_score"
    }
    assert first == second
