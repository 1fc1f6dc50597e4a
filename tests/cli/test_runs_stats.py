"""`runs stats`, `runs summarize` and the correlation in `runs compare`, against
numbers worked out by hand from runs written straight to a store."""

from __future__ import annotations

import math

import pytest

from headscope.storage.store import Store

from helpers.cli import run_cli
from helpers.store import finished_run, grid


def seeded_run(store, seed: int, metrics: dict[str, float], params=None) -> int:
    run_id = store.create_run("attention-modulation", "1", "tiny-llama", params or {}, seed=seed)
    store.mark_running(run_id, None, None)
    store.finish_run(run_id, [], metrics)
    return run_id


def test_runs_stats_by_hand(capsys, tmp_path):
    db = str(tmp_path / "s.db")
    # 2 layers x 5 heads scoring 0, 1, ..., 8, 10 (layer 1 head 4 is 10, not 9)
    scores = grid("induction", 2, 5, lambda layer, h: 5 * layer + h if (layer, h) != (1, 4) else 10)
    run_id = finished_run(Store(db), "tiny-llama", scores)
    result = run_cli(
        capsys, "runs", "stats", str(run_id), "--bins", "5", "--threshold", "5",
        "--threshold", "0.5", "--format", "json", "--db", db,
    )  # fmt: skip
    assert result.code == 0, result.err
    got = result.json()
    assert got["metric"] == "induction"
    assert got["count"] == 10
    assert got["mean"] == pytest.approx(46 / 10)
    assert got["sd"] == pytest.approx(math.sqrt(sum((v - 4.6) ** 2 for *_, v in scores) / 9))
    assert got["quantiles"]["0.5"] == pytest.approx(4.5)
    assert [b["count"] for b in got["histogram"]] == [2, 2, 2, 2, 2]
    assert got["above"] == {"5": 4, "0.5": 9}
    table = run_cli(capsys, "runs", "stats", str(run_id), "--threshold", "5", "--db", db)
    assert table.code == 0, table.err
    assert "10 heads, mean 4.6" in table.out and "heads above 5: 4" in table.out


def test_runs_summarize_by_hand(capsys, tmp_path):
    db = str(tmp_path / "m.db")
    store = Store(db)
    ids = [
        seeded_run(store, 0, {"modulated.gain": 0.2, "baseline.faithful": 0.5}),
        seeded_run(store, 1, {"modulated.gain": 0.4, "baseline.faithful": 0.7}),
        seeded_run(store, 2, {"modulated.gain": 0.9}, params={"alpha": 1.0}),
    ]
    result = run_cli(
        capsys, "runs", "summarize", *map(str, ids), "--format", "json", "--db", db
    )  # fmt: skip
    assert result.code == 0, result.err
    got = result.json()
    assert got["seeds"] == [0, 1, 2]
    assert got["differing_params"] == ["alpha"]
    assert list(got["metrics"]) == ["modulated.gain"]  # the only metric all three have
    gain = got["metrics"]["modulated.gain"]
    assert gain["mean"] == pytest.approx(0.5)
    # squared deviations 0.09, 0.01, 0.16: sample sd sqrt(0.26 / 2)
    assert gain["sd"] == pytest.approx(math.sqrt(0.13))
    assert (gain["min"], gain["max"], gain["n"]) == (0.2, 0.9, 3)
    table = run_cli(capsys, "runs", "summarize", *map(str, ids), "--db", db)
    assert "0.5 +- 0.3606" in table.out and "params that differ: alpha" in table.out


def test_runs_summarize_refuses_mixed_or_single_runs(capsys, tmp_path):
    db = str(tmp_path / "x.db")
    store = Store(db)
    one = seeded_run(store, 0, {"m": 1.0})
    other = finished_run(store, "tiny-llama", grid("induction", 1, 2, lambda layer, h: 0.1))
    mixed = run_cli(capsys, "runs", "summarize", str(one), str(other), "--db", db)
    assert mixed.code == 1 and "different analyses" in mixed.err
    single = run_cli(capsys, "runs", "summarize", str(one), "--db", db)
    assert single.code == 1 and "at least two runs" in single.err
    missing = run_cli(
        capsys, "runs", "summarize", str(one), str(one + 100), "--db", db
    )  # fmt: skip
    assert missing.code == 1 and "Traceback" not in missing.err


def test_runs_compare_prints_the_score_correlation(capsys, tmp_path):
    db = str(tmp_path / "c.db")
    store = Store(db)
    a = finished_run(store, "tiny-llama", grid("induction", 1, 4, lambda layer, h: [1, 2, 3, 4][h]))
    b = finished_run(store, "tiny-llama", grid("induction", 1, 4, lambda layer, h: [2, 1, 4, 3][h]))
    result = run_cli(capsys, "runs", "compare", str(a), str(b), "--format", "json", "--db", db)
    assert result.code == 0, result.err
    corr = result.json()["correlation"]
    # deviations (-1.5, -0.5, 0.5, 1.5) and (-0.5, -1.5, 1.5, 0.5): 3 / 5
    assert corr == {"heads": 4, "pearson": pytest.approx(0.6), "spearman": pytest.approx(0.6)}
    table = run_cli(capsys, "runs", "compare", str(a), str(b), "--db", db)
    assert "pearson 0.600" in table.out and "spearman 0.600" in table.out


def test_an_undefined_correlation_is_null_not_nan(capsys, tmp_path):
    db = str(tmp_path / "u.db")
    store = Store(db)
    flat = finished_run(store, "tiny-llama", grid("induction", 1, 4, lambda layer, h: 0.5))
    other = finished_run(store, "tiny-llama", grid("induction", 1, 4, lambda layer, h: h))
    result = run_cli(
        capsys, "runs", "compare", str(flat), str(other), "--format", "json", "--db", db
    )
    assert result.code == 0, result.err
    assert result.json()["correlation"] == {"heads": 4, "pearson": None, "spearman": None}
