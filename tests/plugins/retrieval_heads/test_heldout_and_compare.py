"""retrieval-heads: the masking check out of sample, named templates, and the
comparison with another run's heads (head-detector's induction heads)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from headscope.core.compare import overlap, select_heads
from headscope.core.errors import InvalidParamsError
from headscope.plugins.retrieval_heads.needles import (
    TEMPLATES,
    HaystackBuilder,
    check_disjoint,
    default_needles_path,
    heldout_haystack_paths,
    heldout_needles_path,
    load_haystack,
    load_needles,
    resolve_template,
)

from helpers.cli import run_cli
from helpers.models import tiny_handle

TINY = [
    "-m",
    "tiny-llama",
    "-f",
    "json",
    "-p",
    "lengths=[300]",
    "-p",
    "depths=[50]",
    "-p",
    "mask_top_k=[0,1]",
    "-p",
    "mask_lengths=[300]",
    "-p",
    "random_draws=1",
    "-p",
    "max_new_tokens=2",
]


def _records(document) -> list[dict]:
    artifact = next(a for a in document["artifacts"] if a["name"] == "tests.json")
    return json.loads(Path(artifact["path"]).read_text())


def test_builtin_heldout_set_shares_nothing_with_the_scoring_set():
    scoring = (load_needles(), load_haystack())
    heldout = (load_needles(heldout_needles_path()), load_haystack(heldout_haystack_paths()))
    assert len(heldout[0]) >= 4 and len(heldout[1]) >= 3
    check_disjoint(scoring, heldout)  # raises if they share a needle, answer or document
    text = " ".join(heldout[1])
    assert not any(n.answer in text or n.needle in text for n in scoring[0])
    with pytest.raises(InvalidParamsError, match="repeat scoring needles"):
        check_disjoint(scoring, (scoring[0][:1], heldout[1]))
    with pytest.raises(InvalidParamsError, match="also scoring documents"):
        check_disjoint(scoring, (heldout[0], scoring[1][:2]))


def test_masking_runs_on_heldout_needles_by_default(capsys, tmp_path):
    db = str(tmp_path / "r.db")
    result = run_cli(capsys, "run", "retrieval-heads", *TINY, "--db", db)
    assert result.code == 0, result.err
    document = result.json()
    heldout = load_needles(heldout_needles_path())
    records = _records(document)
    scored = [r for r in records if r["split"] == "scoring"]
    masked = [r for r in records if r["split"] == "held-out"]
    assert len(scored) == document["metrics"]["tests_run"] == len(load_needles())
    assert sorted(r["answer"] for r in masked) == sorted(n.answer for n in heldout)
    assert document["metrics"]["mask_tests"] == len(heldout)
    assert document["run"]["summary"]["masking tests"] == "held-out"

    # the published check, on the scored prompts themselves
    inside = run_cli(
        capsys, "run", "retrieval-heads", *TINY, "-p", "mask_on=scoring", "--db", db
    ).json()
    assert inside["metrics"]["mask_tests"] == len(load_needles())
    assert {r["split"] for r in _records(inside)} == {"scoring"}


def test_heldout_files_that_repeat_the_scoring_needles_are_refused(capsys, tmp_path):
    db = str(tmp_path / "r.db")
    args = ["-p", f"heldout_needles_file={default_needles_path()}", "--db", db]
    result = run_cli(capsys, "run", "retrieval-heads", *TINY, *args)
    assert result.code == 1 and "held-out needles repeat scoring needles" in result.err
    assert run_cli(capsys, "runs", "list", "-f", "json", "--db", db).json()["total"] == 0


def test_named_templates_end_the_prompt_where_they_say():
    handle = tiny_handle("llama")
    needle = load_needles()[1]
    documents = load_haystack()
    prefixed = HaystackBuilder(handle.tokenizer, documents, resolve_template("answer-prefix"))
    bare = HaystackBuilder(handle.tokenizer, documents, resolve_template("bare"))
    assert prefixed.build(needle, 300, 50).prompt.endswith("Answer: " + needle.answer_prefix)
    test = bare.build(needle, 300, 50)
    assert test.prompt.endswith(f"Question: {needle.question}\nAnswer:")
    assert test.prompt.count(needle.answer) == 1  # only in the needle itself
    assert resolve_template("{context} {question}") == "{context} {question}"
    assert set(TEMPLATES) == {"answer-prefix", "bare"}
    with pytest.raises(InvalidParamsError, match="must contain"):
        resolve_template("bar")


def test_compare_with_reports_overlap_with_the_other_runs_heads(capsys, tmp_path):
    db = str(tmp_path / "r.db")
    detector = run_cli(
        capsys, "run", "head-detector", "-m", "tiny-llama", "-f", "json", "--db", db
    ).json()
    detector_id = detector["run"]["id"]
    args = ["-p", f"compare_with={detector_id}", "-p", "threshold=0", "-p", "mask_top_k=[]"]
    result = run_cli(capsys, "run", "retrieval-heads", *TINY, *args, "--db", db)
    assert result.code == 0, result.err
    document = result.json()

    def scores(doc, metric):
        return {
            (r["layer"], r["head"]): r["value"] for r in doc["head_scores"] if r["metric"] == metric
        }

    ours = select_heads(scores(document, "retrieval_score"), "threshold", 0)
    theirs = select_heads(scores(detector, "induction"), "threshold", 0.3)  # its own rule
    expected = overlap(ours, theirs)
    metrics = document["metrics"]
    assert metrics["compare_jaccard"] == pytest.approx(expected["jaccard"])
    assert metrics["compare_shared_heads"] == expected["intersection"]
    assert metrics["compare_overlap_coefficient"] == pytest.approx(expected["overlap_coefficient"])
    assert document["run"]["summary"]["compared with"]["metric"] == "induction"

    missing = run_cli(capsys, "run", "retrieval-heads", *TINY, "-p", "compare_with=99", "--db", db)
    assert missing.code == 1 and "compare_with: no run with id 99" in missing.err
