"""Plugin loading and the registry of analyses, models, tasks and RPC methods.

Built-in families (`headscope.plugins.*`) and third-party packages register the
same way: through entry points in the `headscope` group. Loading is defensive: a
plugin that fails to import, or whose hook raises, is recorded with its error and
skipped; everything else keeps working.

`HEADSCOPE_LOAD_PLUGINS` allow-lists third-party plugins by entry-point or
distribution name (comma-separated); set to an empty string it loads none. The
built-in families (entry points of the `headscope` distribution) always load.

There is no process-wide registry: the CLI and the service call `build_registry()`
and pass the result to whatever needs it.
"""

from __future__ import annotations

import importlib.metadata
import os
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pluggy

from . import hookspecs
from .analysis import Analysis
from .errors import HeadscopeError, UnknownAnalysisError, UnknownTaskError
from .models import ModelRegistry, ModelSpec

DISTRIBUTION = "headscope"
#: hooks collected when the registry is built; `register_commands` is called by
#: the CLI with its app (`Registry.register_commands`)
HOOKS = ("register_analyses", "register_models", "register_tasks", "register_rpc_methods")


@dataclass
class PluginInfo:
    name: str
    version: str | None
    builtin: bool
    hooks: list[str] = field(default_factory=list)
    analyses: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    rpc_methods: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def add_error(self, message: str) -> None:
        self.error = message if self.error is None else f"{self.error}; {message}"


class Registry:
    """Everything the installed plugins provide, by name."""

    def __init__(self, manager: pluggy.PluginManager | None = None) -> None:
        self.analyses: dict[str, type[Analysis]] = {}
        self.analysis_plugins: dict[str, str] = {}
        self.models = ModelRegistry()
        self.tasks: dict[str, Any] = {}
        self.rpc_methods: list[Any] = []
        self.plugins: list[PluginInfo] = []
        self._manager = manager

    def analysis(self, name: str) -> type[Analysis]:
        if name not in self.analyses:
            known = ", ".join(sorted(self.analyses)) or "none"
            raise UnknownAnalysisError(f"unknown analysis {name!r}; installed: {known}")
        return self.analyses[name]

    def task(self, name: str) -> Any:
        if name.startswith("jsonl:"):  # a user task file (see core.tasks)
            from .tasks import JsonlTask

            return JsonlTask.load(name.removeprefix("jsonl:"))
        if name not in self.tasks:
            known = ", ".join(sorted(self.tasks)) or "none"
            raise UnknownTaskError(f"unknown task {name!r}; installed: {known}")
        return self.tasks[name]

    def plugin_version(self, plugin: str | None) -> str | None:
        for info in self.plugins:
            if info.name == plugin:
                return info.version
        return None

    def head_metric(
        self, analysis: str | None, metric: str | None = None, available: Sequence[str] = ()
    ) -> str | None:
        """The head metric to use for a run of `analysis`: `metric` when given, else
        the analysis's primary metric, else the first of the run's `available` ones."""
        if metric:
            return metric
        cls = self.analyses.get(analysis) if analysis else None
        if cls is not None and cls.primary_metric:
            return cls.primary_metric
        return available[0] if available else None

    def register_commands(self, app: Any, kit: Any) -> None:
        """Let every plugin add its CLI commands to `app` (a Typer app); `kit` is what
        the CLI shares with them (registry, store, model loading, output). A command
        whose name is taken is dropped and reported as that plugin's error."""
        if self._manager is None:
            return
        infos = {info.name: info for info in self.plugins}
        for impl in self._manager.hook.register_commands.get_hookimpls():
            info = infos[impl.plugin_name]
            if "register_commands" not in info.hooks:
                info.hooks.append("register_commands")
            taken = {_command_name(c) for c in app.registered_commands}
            taken |= {g.name for g in app.registered_groups}
            before = len(app.registered_commands)
            try:
                impl.function(**_accepted(impl, app=app, kit=kit))
            except Exception as error:
                info.add_error(f"register_commands: {type(error).__name__}: {error}")
            added = app.registered_commands[before:]
            del app.registered_commands[before:]
            for command in added:
                name = _command_name(command)
                if name in taken:
                    info.add_error(f"register_commands: {name!r} is already a command")
                    continue
                taken.add(name)
                app.registered_commands.append(command)
                info.commands.append(name)


def _command_name(command: Any) -> str:
    """A Typer command's name: given, or made from its function's name."""
    return command.name or command.callback.__name__.replace("_", "-")


def _accepted(impl: Any, **arguments: Any) -> dict[str, Any]:
    """The hook arguments an implementation asks for (it may take a subset)."""
    return {name: arguments[name] for name in impl.argnames}


def _allowed_plugins() -> set[str] | None:
    raw = os.environ.get("HEADSCOPE_LOAD_PLUGINS")
    if raw is None:
        return None
    return {name.strip() for name in raw.split(",") if name.strip()}


def _load(manager: pluggy.PluginManager) -> dict[str, PluginInfo]:
    """Import every allowed entry point of the group and register it with pluggy."""
    allowed = _allowed_plugins()
    infos: dict[str, PluginInfo] = {}
    entry_points = importlib.metadata.entry_points(group=hookspecs.PROJECT)
    for entry_point in sorted(entry_points, key=lambda e: e.name):
        dist = entry_point.dist
        dist_name = dist.metadata["Name"] if dist is not None else None
        builtin = dist_name == DISTRIBUTION
        if entry_point.name in infos:
            continue  # the same distribution seen twice on sys.path
        if not builtin and allowed is not None:
            if entry_point.name not in allowed and dist_name not in allowed:
                continue
        version = dist.version if dist is not None else None
        info = PluginInfo(entry_point.name, version, builtin=builtin)
        infos[entry_point.name] = info
        try:
            manager.register(entry_point.load(), name=entry_point.name)
        except Exception as error:  # a broken plugin is reported, not fatal
            info.error = f"{type(error).__name__}: {error}"
            info.traceback = traceback.format_exc()  # type: ignore[attr-defined]
    return infos


def build_registry() -> Registry:
    """Load plugins and collect what each one registers, attributing everything."""
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    infos = _load(manager)
    registry = Registry(manager)

    def registrar(hook: str, plugin: str, info: PluginInfo):
        def register_analysis(cls: type[Analysis]) -> None:
            if not (isinstance(cls, type) and issubclass(cls, Analysis)) or not cls.name:
                raise HeadscopeError(f"{cls!r} is not an Analysis subclass with a name")
            if cls.name in registry.analyses:
                raise HeadscopeError(f"analysis {cls.name!r} is already registered")
            registry.analyses[cls.name] = cls
            registry.analysis_plugins[cls.name] = plugin
            info.analyses.append(cls.name)

        def register_model(spec: ModelSpec) -> None:
            spec.plugin = plugin
            registry.models.register(spec)
            info.models.append(spec.name)

        def register_task(task: Any) -> None:
            name = getattr(task, "name", None)
            if not name:
                raise HeadscopeError(f"task {task!r} has no name")
            if name in registry.tasks:
                raise HeadscopeError(f"task {name!r} is already registered")
            registry.tasks[name] = task
            info.tasks.append(name)

        def register_rpc_method(method: Any) -> None:
            name = getattr(method, "name", None)
            if not name or not callable(getattr(method, "handler", None)):
                raise HeadscopeError(f"{method!r} is not an RpcMethod with a name and handler")
            if name in {m.name for m in registry.rpc_methods}:
                raise HeadscopeError(f"RPC method {name!r} is already registered")
            registry.rpc_methods.append(method)
            info.rpc_methods.append(name)

        return {
            "register_analyses": register_analysis,
            "register_models": register_model,
            "register_tasks": register_task,
            "register_rpc_methods": register_rpc_method,
        }[hook]

    for hook in HOOKS:
        caller = getattr(manager.hook, hook)
        for impl in caller.get_hookimpls():
            info = infos[impl.plugin_name]
            if hook not in info.hooks:
                info.hooks.append(hook)
            try:
                impl.function(register=registrar(hook, impl.plugin_name, info))
            except Exception as error:
                info.add_error(f"{hook}: {type(error).__name__}: {error}")
    registry.plugins = sorted(infos.values(), key=lambda i: (not i.builtin, i.name))
    return registry
