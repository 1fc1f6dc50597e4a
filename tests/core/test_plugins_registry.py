"""Plugins: built-ins, an out-of-tree package installed for the test, a broken one."""

from __future__ import annotations

import pytest

from headscope.core.plugins import build_registry

from helpers.cli import run_cli, run_cli_process


@pytest.fixture
def with_plugins(plugin_path, monkeypatch):
    monkeypatch.syspath_prepend(str(plugin_path))
    monkeypatch.delenv("HEADSCOPE_LOAD_PLUGINS", raising=False)
    yield plugin_path


def test_builtins_register_through_the_hooks():
    registry = build_registry()
    names = {info.name: info for info in registry.plugins}
    assert "head-detector" in names["head_detector"].analyses
    assert "register_analyses" in names["head_detector"].hooks
    assert "smollm2-135m" in names["builtin_models"].models
    assert all(info.error is None for info in registry.plugins)


def test_out_of_tree_plugin_runs_through_the_cli(with_plugins, capsys, tmp_path):
    listed = run_cli(capsys, "plugins", "--format", "json").json()
    example = next(p for p in listed if p["name"] == "example")
    assert example["version"] == "0.2.0" and not example["builtin"]
    assert set(example["analyses"]) == {"example-norms", "example-wait"}
    result = run_cli(
        capsys,
        "run",
        "example-norms",
        "-m",
        "tiny-llama",
        "-f",
        "json",
        "--db",
        str(tmp_path / "p.db"),
    )
    assert result.code == 0, result.err
    document = result.json()
    assert document["run"]["plugin"] == "example"
    assert document["run"]["packages"]["plugin:example"] == "0.2.0"
    assert len(document["head_scores"]) == 3 * 4


def test_broken_plugin_is_reported_and_everything_else_works(with_plugins, capsys, tmp_path):
    listed = run_cli(capsys, "plugins", "--format", "json").json()
    broken = next(p for p in listed if p["name"] == "broken")
    assert "ModuleNotFoundError" in broken["error"]
    table = run_cli(capsys, "plugins")
    assert "broken" in table.out and "ModuleNotFoundError" in table.out
    result = run_cli(
        capsys,
        "run",
        "head-detector",
        "-m",
        "tiny-llama",
        "-p",
        "n_random=1",
        "-p",
        "random_length=4",
        "-f",
        "json",
        "--db",
        str(tmp_path / "b.db"),
    )
    assert result.code == 0


def test_allow_list_limits_third_party_plugins(with_plugins, monkeypatch):
    monkeypatch.setenv("HEADSCOPE_LOAD_PLUGINS", "example")
    names = {info.name for info in build_registry().plugins}
    assert "example" in names and "broken" not in names
    monkeypatch.setenv("HEADSCOPE_LOAD_PLUGINS", "")
    names = {info.name for info in build_registry().plugins}
    assert names == {"builtin_models", "head_detector"} | {
        i.name for i in build_registry().plugins if i.builtin
    }


def test_plugins_in_a_fresh_process(plugin_path, tmp_path):
    env = {"PYTHONPATH": str(plugin_path), "HEADSCOPE_LOAD_PLUGINS": "example,broken"}
    listed = run_cli_process("plugins", "--format", "json", env=env)
    assert listed.code == 0, listed.err
    assert {p["name"] for p in listed.json()} >= {"example", "broken"}


def test_out_of_tree_plugin_adds_a_cli_command(with_plugins, capsys):
    result = run_cli(capsys, "example-heads", "-m", "tiny-llama", "-f", "json")
    assert result.code == 0, result.err
    assert result.json() == {"model": "tiny-llama", "layers": 3, "query_heads": 4, "kv_heads": 2}
    listed = run_cli(capsys, "plugins", "--format", "json").json()
    example = next(p for p in listed if p["name"] == "example")
    assert example["commands"] == ["example-heads"]
    assert "register_commands" in example["hooks"]
    assert example["rpc_methods"] == ["example.heads"]
    assert "example-heads" in run_cli(capsys, "--help").out


def test_builtin_families_ship_their_commands_and_rpc_methods():
    registry = build_registry()
    context = next(info for info in registry.plugins if info.name == "context")
    assert context.builtin and context.rpc_methods == ["generate.steer"]
    assert [m.name for m in registry.rpc_methods] == ["generate.steer"]


def test_a_command_name_already_taken_is_the_plugins_error():
    import pluggy
    import typer

    from headscope import hookimpl
    from headscope.core import hookspecs
    from headscope.core.plugins import PluginInfo, Registry

    class Greedy:
        @hookimpl
        def register_commands(self, app):
            @app.command("run")
            def replace_run():
                """Would shadow the built-in `run`."""

            @app.command()
            def greedy_hello():
                """A new command."""

    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    manager.register(Greedy(), name="greedy")
    registry = Registry(manager)
    registry.plugins = [PluginInfo("greedy", "1", builtin=False)]
    app = typer.Typer()

    @app.command("run")
    def builtin_run():
        """The built-in one."""

    registry.register_commands(app, kit=None)
    commands = {c.name or c.callback.__name__: c.callback for c in app.registered_commands}
    assert commands == {"run": builtin_run, "greedy_hello": commands["greedy_hello"]}
    info = registry.plugins[0]
    assert info.commands == ["greedy-hello"]
    assert "'run' is already a command" in info.error
