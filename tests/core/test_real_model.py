"""The embedded default model end to end (smollm2-135m from PyPI, cached safetensors)."""

from __future__ import annotations

import pytest

from headscope.core import tracing as T
from headscope.core.models import load_model

from helpers.reference import assert_rows_match_eager

pytestmark = pytest.mark.real_model


def test_structure_matches_smollm2(smollm2):
    info = smollm2.info()
    assert (info["layers"], info["query_heads"], info["kv_heads"], info["head_dim"]) == (
        30,
        9,
        3,
        64,
    )
    assert info["max_positions"] == 8192
    assert info["family"] == "llama"


def test_greedy_answer_to_ioi_prompt_is_mary(smollm2):
    batch = T.make_batch(smollm2, ["When Mary and John went to the store, John gave a drink to"])
    result = T.generate(smollm2, batch, 1)
    assert smollm2.decode(result.tokens[0]) == " Mary"


def test_second_load_comes_from_the_cache_quickly(smollm2):
    again = load_model("smollm2-135m")
    assert again.cache_path == smollm2.cache_path
    assert again.load_seconds < 2.0


def test_attention_rows_on_the_real_model_match_eager(smollm2):
    text = "The capital of France is Paris. The capital of Italy is"
    assert_rows_match_eager(smollm2, text, [0, 14, 29], [-1, 3])


def test_head_detector_on_smollm2_stores_all_270_heads(capsys, tmp_path):
    from helpers.cli import run_cli

    db = str(tmp_path / "real.db")
    result = run_cli(
        capsys, "run", "head-detector", "--model", "smollm2-135m", "--format", "json", "--db", db
    )
    assert result.code == 0, result.err
    document = result.json()
    heads = {(r["layer"], r["head"]) for r in document["head_scores"]}
    assert len(heads) == 270
    metrics = {r["metric"] for r in document["head_scores"]}
    assert metrics == {"previous_token", "duplicate_token", "induction", "sink_mass"}
    induction = {
        (r["layer"], r["head"]): r["value"]
        for r in document["head_scores"]
        if r["metric"] == "induction"
    }
    assert max(induction.values()) > 0.3  # SmolLM2 has clear induction heads
