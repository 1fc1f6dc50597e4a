"""Plugin loading and the registry of analyses, models and tasks.

Built-in plugins (modules in `headscope.plugins`) and third-party ones (entry points
in the `headscope` group) register through the same hooks. Loading is defensive: a
plugin that fails to import, or whose hook raises, is recorded with its error and
skipped; everything else keeps working.

`HEADSCOPE_LOAD_PLUGINS` allow-lists third-party plugins by entry-point or
distribution name (comma-separated); set to an empty string it loads none.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import threading
import traceback
from dataclasses import dataclass, field
from typing import Any

import pluggy

from . import hookspecs
from .analysis import Analysis
from .errors import HeadscopeError, UnknownAnalysisError, UnknownTaskError
from .models import ModelRegistry, ModelSpec

BUILTIN_PLUGINS = (
    "headscope.plugins.builtin_models",
    "headscope.plugins.head_detector",
    "headscope.plugins.retrieval_heads",
    "headscope.plugins.builtin_tasks",
    "headscope.plugins.head_patching",
    "headscope.plugins.sae_circuit",
    "headscope.plugins.context_heads",
    "headscope.plugins.attention_modulation",
)
HOOKS = ("register_analyses", "register_models", "register_tasks")


@dataclass
class PluginInfo:
    name: str
    version: str | None
    builtin: bool
    hooks: list[str] = field(default_factory=list)
    analyses: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Registry:
    """Everything the installed plugins provide, by name."""

    def __init__(self) -> None:
        self.analyses: dict[str, type[Analysis]] = {}
        self.analysis_plugins: dict[str, str] = {}
        self.models = ModelRegistry()
        self.tasks: dict[str, Any] = {}
        self.plugins: list[PluginInfo] = []

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


def _allowed_plugins() -> set[str] | None:
    raw = os.environ.get("HEADSCOPE_LOAD_PLUGINS")
    if raw is None:
        return None
    return {name.strip() for name in raw.split(",") if name.strip()}


def _headscope_version() -> str:
    from .. import __version__

    return __version__


def _load(manager: pluggy.PluginManager, infos: dict[str, PluginInfo]) -> None:
    for module_name in BUILTIN_PLUGINS:
        short = module_name.rsplit(".", 1)[-1]
        info = PluginInfo(short, _headscope_version(), builtin=True)
        infos[short] = info
        try:
            manager.register(importlib.import_module(module_name), name=short)
        except Exception as error:  # a broken built-in is reported, not fatal
            info.error = f"{type(error).__name__}: {error}"
    allowed = _allowed_plugins()
    for entry_point in importlib.metadata.entry_points(group=hookspecs.PROJECT):
        dist = entry_point.dist
        dist_name = dist.metadata["Name"] if dist is not None else None
        if allowed is not None and entry_point.name not in allowed and dist_name not in allowed:
            continue
        version = dist.version if dist is not None else None
        info = PluginInfo(entry_point.name, version, builtin=False)
        infos[entry_point.name] = info
        try:
            module = entry_point.load()
            manager.register(module, name=entry_point.name)
        except Exception as error:
            info.error = f"{type(error).__name__}: {error}"
            info.traceback = traceback.format_exc()  # type: ignore[attr-defined]


def build_registry() -> Registry:
    """Load plugins and collect what each one registers, attributing everything."""
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    infos: dict[str, PluginInfo] = {}
    _load(manager, infos)
    registry = Registry()

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

        return {
            "register_analyses": register_analysis,
            "register_models": register_model,
            "register_tasks": register_task,
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
                message = f"{hook}: {type(error).__name__}: {error}"
                info.error = message if info.error is None else f"{info.error}; {message}"
    registry.plugins = sorted(infos.values(), key=lambda i: (not i.builtin, i.name))
    return registry


_registry: Registry | None = None
_lock = threading.Lock()


def get_registry() -> Registry:
    """The process-wide registry, built on first use."""
    global _registry
    with _lock:
        if _registry is None:
            _registry = build_registry()
        return _registry


def reset_registry() -> None:
    """Forget loaded plugins (tests, or after installing a plugin in-process)."""
    global _registry
    with _lock:
        _registry = None
