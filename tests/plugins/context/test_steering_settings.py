"""One steering-settings model behind attention-modulation, `steer` and `generate.steer`."""

from __future__ import annotations

import math

import pytest

from headscope.core import tracing as T
from headscope.core.errors import InvalidParamsError
from headscope.plugins.context.attention_modulation import ModulationParams
from headscope.plugins.context.modulation import Modulation, SteeringSettings
from headscope.plugins.context.rpc import SteerParams
from headscope.plugins.context.steering import SteeringRequest


@pytest.mark.parametrize("model", [ModulationParams, SteeringRequest, SteerParams])
def test_every_front_end_takes_the_same_settings_and_defaults(model):
    assert issubclass(model, SteeringSettings)
    for name, field in SteeringSettings.model_fields.items():
        assert model.model_fields[name].default == field.default, name


@pytest.mark.parametrize(
    "values,field",
    [
        ({"alpha": 9}, "alpha"),
        ({"alpha": math.nan}, "alpha"),
        ({"form": "other"}, "form"),
        ({"pasta_coefficient": 0}, "pasta_coefficient"),
        ({"sink_beta": 2}, "sink_beta"),
        ({"min_layer": 3, "max_layer": 1}, "below min_layer"),
        ({"strength": 1}, "strength"),
    ],
)
def test_a_modulation_checks_its_settings_as_the_params_do(values, field):
    with pytest.raises(InvalidParamsError, match=field):
        Modulation(T.head_map({0: [0]}), **values)
    with pytest.raises(InvalidParamsError, match=field):
        ModulationParams.parse({**values}, "invalid params")


def test_a_modulation_keeps_the_settings_it_was_given():
    settings = SteeringSettings(alpha=1.5, form="pasta", pasta_coefficient=0.05)
    modulation = Modulation(T.head_map({1: [0, 2]}), settings, "mine")
    described = modulation.describe()
    assert described == {
        "label": "mine",
        "form": "pasta",
        "alpha": 1.5,
        "pasta_coefficient": 0.05,
        "sink_beta": None,
        "heads": [[1, 0], [1, 2]],
    }
    assert Modulation(T.head_map({1: [0]}), alpha=0.8).settings.alpha == 0.8


@pytest.mark.parametrize(
    "heads,expected",
    [("all", "all"), ("17.3,18.6", [(17, 3), (18, 6)]), ([[1, 2]], [(1, 2)])],
)
def test_steering_heads_read_as_written_on_the_command_line(heads, expected):
    request = SteeringRequest.parse({"prompt": "p", "spans": [{"text": "p"}], "heads": heads})
    assert request.heads == expected


@pytest.mark.parametrize("heads", ["one", "1.x", 9.0])
def test_malformed_heads_name_the_format(heads):
    with pytest.raises(InvalidParamsError, match="LAYER.HEAD"):
        SteeringRequest.parse({"prompt": "p", "spans": [{"text": "p"}], "heads": heads})
