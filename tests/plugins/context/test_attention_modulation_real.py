"""Attention modulation on the embedded default model (smollm2-135m)."""

from __future__ import annotations

import pytest

from headscope.plugins.context.data import ContextExample, counterfactual_swaps
from headscope.plugins.context.faithfulness import evaluate
from headscope.plugins.context.modulation import Modulation, layer_heads
from headscope.plugins.context.steering import SteeringRequest, steer

pytestmark = pytest.mark.real_model


def test_steering_turns_a_memorised_answer_into_the_context_answer(smollm2):
    example = ContextExample(
        context="Big Ben is in the city of Paris. Scientists measured the temperature of the "
        "ocean at twelve different depths. A small boat drifted across the lake while the sun "
        "set behind the hills. Our train was delayed for an hour because of snow on the tracks.",
        question="In which city is Big Ben?",
        answer="Paris",
        memory_answer="London",
        answer_prefix="Big Ben is in the city of",
    )
    request = SteeringRequest.parse(
        {
            "prompt": example.prompt(),
            "spans": [{"text": example.context}],
            "heads": "all",
            "alpha": 0.5,
            "max_new_tokens": 4,
            "stop_at_newline": True,
        }
    )
    result = steer(smollm2, request)
    assert result.baseline.strip().startswith(example.memory_answer)
    assert result.steered.strip().startswith(example.answer)


def test_modulation_raises_context_faithfulness(smollm2):
    examples = counterfactual_swaps(8, 0)
    modulation = Modulation(layer_heads(smollm2, range(2, smollm2.n_layers)), alpha=0.5)
    base = evaluate(smollm2, examples, generate=False).metrics
    steered = evaluate(smollm2, examples, modulation, generate=False).metrics
    assert base["faithful_prob"] < 1.0
    assert steered["faithful_prob"] > base["faithful_prob"]
    assert steered["margin"] > base["margin"]
