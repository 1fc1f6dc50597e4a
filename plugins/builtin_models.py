"""Built-in models: the embedded default (SmolLM2-135M), Gemma 3 270M, tiny test models."""

from headscope.core.hookspecs import hookimpl
from headscope.core.models import builtin_model_specs


@hookimpl
def register_models(register):
    for spec in builtin_model_specs():
        register(spec)
