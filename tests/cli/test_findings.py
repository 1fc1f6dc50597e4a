"""Findings across runs from the command line: findings top and runs head."""

from __future__ import annotations

import pytest

from headscope.storage.store import Store

from helpers.cli import run_cli
from helpers.store import failed_run, finished_run, grid


@pytest.fixture
def stored(tmp_path):
    """Two head-detector runs (tiny-llama then tiny-gpt2, 2 layers x 3 heads) and a failed one."""
    db = str(tmp_path / "findings.db")
    store = Store(db)
    llama = finished_run(
        store,
        "tiny-llama",
        grid("induction", 2, 3, lambda l, h: l + h / 10)  # noqa: E741
        + grid("previous_token", 2, 3, lambda l, h: -l - h),  # noqa: E741
    )
    gpt2 = finished_run(store, "tiny-gpt2", grid("induction", 2, 3, lambda l, h: 0.55 + l))  # noqa: E741
    failed = failed_run(store, "tiny-llama")
    return db, llama, gpt2, failed


def top(capsys, db, *args):
    return run_cli(capsys, "findings", "top", *args, "--db", db)


def heads(result):
    return [(h["run_id"], h["layer"], h["head"], h["value"]) for h in result.json()["heads"]]


def test_findings_top_ranks_heads_across_runs_with_filters_and_pages(capsys, stored):
    db, llama, gpt2, _ = stored
    page = top(capsys, db, "--analysis", "head-detector", "--limit", "4", "-f", "json")
    assert page.code == 0, page.err
    assert page.json()["metric"] == "induction"  # the analysis's primary metric
    assert heads(page) == [
        (gpt2, 1, 0, 1.55),  # ties ordered by run, layer and head
        (gpt2, 1, 1, 1.55),
        (gpt2, 1, 2, 1.55),
        (llama, 1, 2, 1.2),
    ]
    assert page.json()["next_offset"] == 4
    rest = top(capsys, db, "--analysis", "head-detector", "--limit", "4", "--offset", "10")
    assert rest.code == 0 and "next page" not in rest.out
    last = top(capsys, db, "--analysis", "head-detector", "--offset", "8", "-f", "json").json()
    assert len(last["heads"]) == 4 and last["next_offset"] is None  # 12 heads in all

    by_run = top(capsys, db, "--run", str(llama), "--metric", "previous_token", "-f", "json")
    assert by_run.json()["metric"] == "previous_token"
    assert heads(by_run)[0] == (llama, 0, 0, 0.0)
    filtered = top(
        capsys, db, "--metric", "induction", "--model", "tiny-llama", "--min-value", "1",
        "--order", "asc", "-f", "json",
    )  # fmt: skip
    assert heads(filtered) == [(llama, 1, 0, 1.0), (llama, 1, 1, 1.1), (llama, 1, 2, 1.2)]

    table = top(capsys, db, "--run", str(gpt2), "--limit", "2")
    assert table.code == 0 and "heads by induction" in table.out
    assert "tiny-gpt2" in table.out and "next page: --offset 2" in table.out


@pytest.mark.parametrize(
    "args, problem",
    [
        ((), "no metric given"),
        (("--run", "{failed}"), "has no results: it failed (boom)"),
        (("--run", "999"), "no run with id 999"),
        (("--metric", "induction", "--limit", "0"), "--limit: Input should be greater"),
        (("--metric", "induction", "--limit", "1001"), "--limit: Input should be less"),
        (("--metric", "induction", "--order", "up"), "--order: Input should be 'desc' or 'asc'"),
        (("--run", "0"), "--run: Input should be greater than or equal to 1"),
        (("--metric", "induction", "-f", "xml"), "unknown format"),
    ],
)
def test_findings_top_refuses_bad_queries_in_one_line(capsys, stored, args, problem):
    db, _, _, failed = stored
    result = top(capsys, db, *(a.format(failed=failed) for a in args))
    assert result.code == 1 and problem in result.err, result.err
    assert "Traceback" not in result.err and len(result.err.strip().splitlines()) == 1


def test_one_head_across_every_succeeded_run(capsys, stored):
    db, llama, gpt2, _ = stored
    result = run_cli(capsys, "runs", "head", "1.2", "-f", "json", "--db", db)
    assert result.code == 0, result.err
    assert result.json() == {
        "layer": 1,
        "head": 2,
        "runs": [  # newest first; the failed run has no scores
            {"run_id": gpt2, "analysis": "head-detector", "model": "tiny-gpt2",
             "primary_metric": "induction", "scores": {"induction": 1.55},
             "rank": 1, "heads": 6},
            {"run_id": llama, "analysis": "head-detector", "model": "tiny-llama",
             "primary_metric": "induction",
             "scores": {"induction": 1.2, "previous_token": -3.0}, "rank": 1, "heads": 6},
        ],
    }  # fmt: skip
    only = run_cli(capsys, "runs", "head", "1.2", "--model", "tiny-llama", "-f", "json", "--db", db)
    assert [r["run_id"] for r in only.json()["runs"]] == [llama]
    table = run_cli(capsys, "runs", "head", "0.1", "--db", db)
    assert table.code == 0 and "head 0.1" in table.out
    assert "previous_token" in table.out and "-1.0000" in table.out
    none = run_cli(capsys, "runs", "head", "7.0", "--db", db)
    assert none.code == 0 and "no succeeded run has scores for head 7.0" in none.out
    huge = run_cli(capsys, "runs", "head", f"{2**63}.0", "--db", db)
    assert huge.code == 1 and "layer" in huge.err and "Traceback" not in huge.err
    for bad in ("1", "a.b", "1.-2", "1.2.3"):
        refused = run_cli(capsys, "runs", "head", bad, "--db", db)
        assert refused.code == 1 and "is not LAYER.HEAD" in refused.err, bad
