"""The architecture is checked, not hoped for: layers and independence are
import-linter contracts (pyproject.toml, run by `make test`); what they cannot
say is checked here on the same import graph."""

from __future__ import annotations

import grimp
import pytest


@pytest.fixture(scope="module")
def graph():
    return grimp.build_graph("headscope")


def _family(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "plugins" else None


def test_the_package_has_no_import_cycle(graph):
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(module: str) -> None:  # Tarjan's strongly connected components
        index[module] = low[module] = len(index)
        stack.append(module)
        for imported in graph.find_modules_directly_imported_by(module):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    assert cycles == []


def test_no_core_module_serves_one_plugin_family_only(graph):
    """A core module used by one family and nothing else belongs in that family."""
    lonely = {}
    packages = {m.rsplit(".", 1)[0] for m in graph.modules}
    for module in sorted(graph.modules):
        if not module.startswith("headscope.core.") or module in packages:
            continue  # a package's __init__ is the public face of its modules
        importers = graph.find_modules_that_directly_import(module)
        families = {_family(m) for m in importers if _family(m)}
        others = {m for m in importers if not m.startswith("headscope.plugins.")}
        if len(families) == 1 and not others:
            lonely[module] = families.pop()
    assert lonely == {}


def test_plugin_families_never_import_each_other(graph):
    crossings = []
    for module in sorted(graph.modules):
        family = _family(module)
        if family is None:
            continue
        for imported in graph.find_modules_directly_imported_by(module):
            other = _family(imported)
            if other is not None and other != family:
                crossings.append((module, imported))
    assert crossings == []
