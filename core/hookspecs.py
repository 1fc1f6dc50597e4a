"""Plugin hooks. A plugin is any module with `@hookimpl` functions named below.

Packages expose plugins through the `headscope` entry-point group:

    [project.entry-points.headscope]
    my_plugin = "my_package.plugin"

Each hook receives a `register` callback, so a plugin can register any number of
things and new keyword arguments can be added to hooks later without breaking
existing implementations (pluggy lets an implementation take a subset of them).
"""

from __future__ import annotations

import pluggy

PROJECT = "headscope"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_analyses(register):
    """Register analyses: call `register(AnalysisSubclass)` for each.

    An analysis is a class with a unique `name`, a pydantic `Params` model and a
    `run(ctx, params)` method (see `headscope.Analysis`).
    """


@hookspec
def register_models(register):
    """Register named models: call `register(ModelSpec(...))` for each.

    A `ModelSpec` gives a name and a source (a PyPI GGUF package, a local directory
    or file, a hub id) so `--model NAME` works everywhere.
    """


@hookspec
def register_tasks(register):
    """Register tasks (prompt sets with a metric): call `register(task)` for each.

    Tasks are what circuit analyses run on; a task has a unique `name`.
    """
