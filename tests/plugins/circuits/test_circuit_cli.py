"""Circuit analyses from the command line: a user JSONL task end to end, errors, compare."""

from __future__ import annotations

import pytest

from helpers.cli import run_cli
from helpers.tasks import write_task_file

# Byte-level tiny models: answers are single characters; corruptions keep the length.
ROWS = [
    ("the cat sat on the mat and the cat", " ", "x", "the dog sat on the mat and the dog"),
    ("abc abc abc ab", "c", "d", "abd abe abf ab"),
    ("one two one two one tw", "o", "e", "one tqo ont twe oni tw"),
    ("red blue red blue red blu", "e", "a", "red blue rod blue rud blu"),
    ("x y x y x", " ", "z", "x y z y w"),
    ("hello hello hell", "o", "a", "hello jello hell"),
    ("1 2 3 1 2 3 1 2", " ", "4", "1 2 3 4 5 6 7 8"),
    ("aaa bbb aaa bb", "b", "a", "aaa bbb ccc bb"),
]


@pytest.fixture
def task_file(tmp_path):
    return write_task_file(tmp_path / "task.jsonl", ROWS)


def _run(capsys, db, *args):
    return run_cli(capsys, "run", *args, "-m", "tiny-llama", "-f", "json", "--db", db)


def test_user_jsonl_task_runs_end_to_end(capsys, tmp_path, task_file):
    db = str(tmp_path / "c.db")
    task = f"jsonl:{task_file}"
    shown = run_cli(capsys, "tasks", "show", task, "-m", "tiny-llama", "-f", "json")
    assert shown.code == 0, shown.err
    assert shown.json()["pairs"] == len(ROWS) and 0 <= shown.json()["accuracy"] <= 1

    patching = _run(capsys, db, "head-patching", "-p", f"task={task}", "-p", "directions=both")
    assert patching.code == 0, patching.err
    document = patching.json()
    metrics = {r["metric"] for r in document["head_scores"]}
    assert metrics == {"noising_effect", "denoising_effect", "attribution", "importance"}
    assert len(document["head_scores"]) == 4 * 3 * 4
    assert document["metrics"]["n_pairs"] == len(ROWS)
    patching_id = document["run"]["id"]

    args = ["-p", f"task={task}", "-p", "steps=40", "-p", "seeds=2", "-p", "reference_top_k=3"]
    auto = _run(capsys, db, "sae-circuit", *args, "-p", "reference=auto")
    assert auto.code == 0, auto.err
    found = auto.json()["metrics"]
    for name in ("auc_mean", "auc_std", "edge_auc_mean", "sae_seconds", "reference_seconds"):
        assert name in found, name
    assert 0 <= found["auc_mean"] <= 1

    stored = _run(capsys, db, "sae-circuit", *args, "-p", f"reference={patching_id}")
    assert stored.code == 0, stored.err
    summary = stored.json()["run"]["summary"]
    assert summary["reference"]["source"].startswith(f"run {patching_id} (head-patching")
    assert len(summary["reference"]["top_heads"]) == 3
    sae_id = stored.json()["run"]["id"]

    compared = run_cli(
        capsys, "runs", "compare", str(sae_id), str(patching_id), "-f", "json", "--db", db
    )
    assert compared.code == 0, compared.err
    result = compared.json()
    assert result["a"]["metric"] == "unique_codes" and result["b"]["metric"] == "importance"
    assert result["a"]["rule"] == "top" and len(result["b"]["heads"]) == 12  # all 12 heads
    table = run_cli(capsys, "runs", "show", str(sae_id), "--db", db)
    assert "AUC per seed" in table.out and "heads by unique_codes" in table.out


def test_malformed_task_file_names_the_line_and_stores_nothing(capsys, tmp_path, task_file):
    db = str(tmp_path / "e.db")
    task_file.write_text(task_file.read_text() + '{"prompt": "p", "answer": "a"}\n')
    for command in (
        ("run", "head-patching", "-m", "tiny-llama", "-p", f"task=jsonl:{task_file}"),
        ("run", "sae-circuit", "-m", "tiny-llama", "-p", f"task=jsonl:{task_file}"),
        ("tasks", "show", f"jsonl:{task_file}", "-m", "tiny-llama"),
    ):
        result = (
            run_cli(capsys, *command, "--db", db)
            if command[0] == "run"
            else run_cli(capsys, *command)
        )
        assert result.code == 1, command
        assert f"line {len(ROWS) + 1}: missing distractor" in result.err
        assert "Traceback" not in result.err + result.out
    assert run_cli(capsys, "runs", "list", "-f", "json", "--db", db).json()["total"] == 0


def test_bad_circuit_params_are_rejected(capsys, tmp_path, task_file):
    db = str(tmp_path / "b.db")
    task = f"task=jsonl:{task_file}"
    for args, expected in [
        (
            ("sae-circuit", "-p", task, "-p", "reference=latest"),
            "reference must be a run id or auto",
        ),
        (("sae-circuit", "-p", task, "-p", "train_prompts=40"), "exceeds the 16 prompts"),
        (("head-patching", "-p", "task=nope"), "unknown task 'nope'"),
        (("head-patching", "-p", "task=ioi"), "names that are single tokens"),
        (("head-patching", "-p", task, "-p", "mode=fast"), "mode"),
    ]:
        result = _run(capsys, db, *args)
        assert result.code == 1, args
        assert expected in result.err, (args, result.err)
    assert run_cli(capsys, "runs", "list", "-f", "json", "--db", db).json()["total"] == 0


def test_tasks_commands_list_and_help(capsys):
    listed = run_cli(capsys, "tasks", "list", "-f", "json")
    assert {"ioi", "greater-than"} <= {row["name"] for row in listed.json()}
    assert all(row["plugin"] == "builtin_tasks" for row in listed.json())
    for args in (["tasks", "--help"], ["tasks", "list", "--help"], ["tasks", "show", "--help"]):
        result = run_cli(capsys, *args)
        assert result.code == 0 and "Usage" in result.out, args


@pytest.mark.real_model
def test_circuit_analyses_on_smollm2(capsys, tmp_path, smollm2):
    db = str(tmp_path / "real.db")
    model = ["-m", "smollm2-135m", "-f", "json", "--db", db]
    patching = run_cli(
        capsys, "run", "head-patching", "-p", "n_examples=4", "-p", "mode=attribution", *model
    )
    assert patching.code == 0, patching.err
    assert patching.json()["metrics"]["accuracy"] == 1.0
    patching_id = patching.json()["run"]["id"]
    args = ["-p", "n_examples=8", "-p", "steps=30", "-p", "seeds=2", "-p", "train_prompts=4"]
    sae = run_cli(capsys, "run", "sae-circuit", *args, "-p", f"reference={patching_id}", *model)
    assert sae.code == 0, sae.err
    document = sae.json()
    assert len({(r["layer"], r["head"]) for r in document["head_scores"]}) == 270
    assert 0 <= document["metrics"]["auc_mean"] <= 1
    compared = run_cli(
        capsys, "runs", "compare", str(document["run"]["id"]), str(patching_id), "-f", "json",
        "--db", db,
    )  # fmt: skip
    assert compared.json()["size_a"] == compared.json()["size_b"] == 15
