"""Context sensitivity under any memory budget and any row chunk gives the same scores
(the eager reference is in test_faithfulness_reference)."""

from __future__ import annotations

import torch

from headscope.core.budget import MemoryBudget
from headscope.core.tracing import reads
from headscope.plugins.context.data import ContextExample
from headscope.plugins.context.sensitivity import context_sensitivity

from helpers.models import tiny_handle

EXAMPLES = [
    ContextExample("The sky is green.", "What colour is the sky?", "green", "blue", "The sky is"),
    ContextExample("Code: 4821. Door: red.", "What is the code?", "4821", "1234"),
    ContextExample("Tom has six cats and no dogs.", "How many cats?", "six cats", "two", "Tom has"),
]


def test_one_prompt_at_a_time_and_one_row_at_a_time_give_the_same_scores(monkeypatch):
    handle = tiny_handle("llama")
    marked = [e.marked(handle) for e in EXAMPLES]
    batched = context_sensitivity(handle, marked, max_new_tokens=4, batch_size=3)
    monkeypatch.setattr(reads, "ROW_CHUNK_ELEMENTS", 1)
    alone = context_sensitivity(
        handle, marked, max_new_tokens=4, batch_size=3, budget=MemoryBudget(1)
    )
    for metric, value in batched.items():
        torch.testing.assert_close(alone[metric], value, atol=1e-5, rtol=0)
