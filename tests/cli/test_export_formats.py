"""`runs export` formats: long CSV, wide CSV (a matrix per metric), Parquet, JSON."""

from __future__ import annotations

import csv
import io
import sys

import pytest

from headscope.storage.store import Store

from helpers.cli import run_cli
from helpers.store import finished_run, grid


@pytest.fixture
def stored(tmp_path):
    """A run with two full 3 x 4 metrics and one scored per KV head (2 of the 4)."""
    db = str(tmp_path / "export.db")
    scores = (
        grid("induction", 3, 4, lambda l, h: (l * 4 + h) / 7)  # noqa: E741
        + grid("previous_token", 3, 4, lambda l, h: -l + h / 3)  # noqa: E741
        + grid("kv_norm", 3, 2, lambda l, h: 10.0 * l + h)  # noqa: E741
    )
    run_id = finished_run(Store(db), "tiny-llama", scores)
    return db, run_id, {(l, h, m): v for l, h, m, v in scores}  # noqa: E741


def export(capsys, db, run_id, *args):
    return run_cli(capsys, "runs", "export", str(run_id), *args, "--db", db)


def test_wide_csv_is_a_layers_by_heads_matrix_per_metric(capsys, stored):
    db, run_id, scores = stored
    result = export(capsys, db, run_id, "-f", "wide-csv")
    assert result.code == 0, result.err
    rows = list(csv.reader(io.StringIO(result.out)))
    assert rows[0] == ["metric", "layer", "head_0", "head_1", "head_2", "head_3"]
    assert [(r[0], r[1]) for r in rows[1:]] == [
        (metric, str(layer))
        for metric in ("induction", "kv_norm", "previous_token")
        for layer in range(3)
    ]
    for metric, layer, *cells in rows[1:]:
        for head, cell in enumerate(cells):
            expected = scores.get((int(layer), head, metric))
            assert (float(cell) if cell else None) == expected, (metric, layer, head)

    one = export(capsys, db, run_id, "-f", "wide-csv", "--metric", "kv_norm")
    assert one.out.splitlines() == [
        "metric,layer,head_0,head_1",
        "kv_norm,0,0.0,1.0",
        "kv_norm,1,10.0,11.0",
        "kv_norm,2,20.0,21.0",
    ]
    long = export(capsys, db, run_id, "-f", "csv", "--metric", "induction")
    assert {r["metric"] for r in csv.DictReader(io.StringIO(long.out))} == {"induction"}


def test_parquet_holds_the_long_rows_with_full_precision(capsys, stored, tmp_path):
    import pyarrow.parquet as pq

    db, run_id, scores = stored
    path = tmp_path / "out" / "scores.parquet"  # its folder is created
    result = export(capsys, db, run_id, "-f", "parquet", "-o", str(path))
    assert result.code == 0, result.err
    assert f"wrote {path} ({len(scores)} rows)" in result.err and result.out == ""
    table = pq.read_table(path)
    assert table.column_names == ["run_id", "layer", "head", "metric", "value"]
    rows = table.to_pylist()
    assert {r["run_id"] for r in rows} == {run_id}
    assert {(r["layer"], r["head"], r["metric"]): r["value"] for r in rows} == scores

    only = tmp_path / "induction.parquet"
    export(capsys, db, run_id, "-f", "parquet", "-o", str(only), "--metric", "induction")
    assert set(pq.read_table(only).column("metric").to_pylist()) == {"induction"}


@pytest.mark.parametrize(
    "args, problem",
    [
        (("-f", "parquet"), "--format parquet writes a file: give -o FILE"),
        (("-f", "json", "--metric", "induction"), "--metric applies to the csv, wide-csv"),
        (("-f", "wide-csv", "--metric", "nope"), "has no head metric 'nope'; it has: induction"),
        (("-f", "xlsx"), "unknown format 'xlsx'"),
    ],
)
def test_bad_export_requests_are_one_line_errors(capsys, stored, args, problem):
    db, run_id, _ = stored
    result = export(capsys, db, run_id, *args)
    assert result.code == 1 and problem in result.err, result.err
    assert "Traceback" not in result.err


def test_parquet_without_pyarrow_says_what_to_install(capsys, stored, tmp_path, monkeypatch):
    db, run_id, _ = stored
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow fails
    path = tmp_path / "scores.parquet"
    result = export(capsys, db, run_id, "-f", "parquet", "-o", str(path))
    assert result.code == 1 and "pip install 'headscope[parquet]'" in result.err
    assert len(result.err.strip().splitlines()) == 1 and not path.exists()
