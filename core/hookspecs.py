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


@hookspec
def register_rpc_methods(register):
    """Register JSON-RPC methods: call `register(RpcMethod(...))` for each.

    An `RpcMethod` (`headscope.core.rpc.protocol`) names the method, its pydantic
    params model, a `handler(service, params)` and, for `rpc.discover`, its result
    type and error codes. The service publishes it beside the built-in methods.
    """


@hookspec
def register_commands(app, kit):
    """Add CLI commands to `app`, the `headscope` Typer app (`@app.command()`).

    `kit` is what the CLI shares with plugin commands: `kit.registry()`,
    `kit.store(db)`, `kit.findings(db)`,
    `kit.load_model(name, show_progress, device, dtype, device_map)`,
    `kit.parse_params(pairs)`, `kit.emit_json(data)`, `kit.console`, and the
    option factories `kit.format_option()`, `kit.db_option()`, `kit.model_option()`,
    `kit.device_option()`, `kit.dtype_option()`, `kit.device_map_option()`.
    An implementation may take `app` alone.
    """
