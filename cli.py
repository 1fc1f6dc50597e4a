"""headscope command line: thin wrappers that parse, call the engine and print."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from .core.errors import HeadscopeError

app = typer.Typer(
    help="Find, score and steer attention heads in transformer language models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
models_app = typer.Typer(help="List, fetch and inspect models.", no_args_is_help=True)
app.add_typer(models_app, name="models")

console = Console()
err_console = Console(stderr=True)

FORMAT_HELP = "Output format: table for people, json for tools."


def _emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


@contextmanager
def progress_bar(enabled: bool = True):
    """A rich progress display; yields a `progress(stage, done, total)` callback."""
    if not enabled:
        yield lambda stage, done, total: None
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=err_console, transient=False) as bar:
        tasks: dict[str, int] = {}

        def update(stage: str, done: float, total: float | None) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        yield update


# ----------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------
@models_app.command("list")
def models_list(
    format: str = typer.Option("table", "--format", "-f", help=FORMAT_HELP),
) -> None:
    """List registered models and whether each is ready to load offline."""
    from .core.models import default_registry

    rows = []
    for spec in default_registry().specs():
        source = spec.source
        cache = source.cache_path()
        rows.append(
            {
                "name": spec.name,
                "description": spec.description,
                "source": source.describe(),
                "ready": source.is_ready(),
                "cache_path": str(cache) if cache else None,
                "plugin": spec.plugin,
            }
        )
    if format == "json":
        _emit_json(rows)
        return
    table = Table(title="models")
    for column in ("name", "ready", "source", "description"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row["name"], "yes" if row["ready"] else "no", row["source"], row["description"]
        )
    console.print(table)
    console.print(
        "Also accepted: a model directory, a .gguf file, org/name (hub), remote:org/name."
    )


@models_app.command("pull")
def models_pull(
    name: str = typer.Argument(..., help="Registered model name, .gguf path or hub id."),
    format: str = typer.Option("table", "--format", "-f", help=FORMAT_HELP),
) -> None:
    """Fetch a model's weights and build its safetensors cache (once)."""
    from .core.models import default_registry

    spec = default_registry().resolve(name)
    with progress_bar(format != "json") as progress:
        materialised = spec.source.materialise(progress)
    result = {
        "name": spec.name,
        "cache_path": str(materialised.directory),
        "revision": materialised.revision,
        "converted_now": materialised.converted_now,
    }
    if format == "json":
        _emit_json(result)
    else:
        state = "converted" if materialised.converted_now else "already cached"
        console.print(f"{spec.name}: {state} at {materialised.directory}")


@models_app.command("info")
def models_info(
    name: str = typer.Argument(..., help="Registered model name, directory, .gguf or hub id."),
    format: str = typer.Option("table", "--format", "-f", help=FORMAT_HELP),
) -> None:
    """Load a model and print its structure, size, source and load time."""
    from .core.models import load_model

    with progress_bar(format != "json") as progress:
        handle = load_model(name, progress=progress)
    info = handle.info()
    if format == "json":
        _emit_json(info)
        return
    table = Table(title=handle.name, show_header=False)
    table.add_column("field")
    table.add_column("value")
    labels = {
        "family": "family",
        "layers": "layers",
        "query_heads": "query heads",
        "kv_heads": "KV heads",
        "head_dim": "head dim",
        "max_positions": "max positions",
        "parameters": "parameters",
        "source": "source",
        "cache_path": "cache path",
        "revision": "revision",
        "load_seconds": "load time (s)",
    }
    for key, label in labels.items():
        value = info[key]
        table.add_row(label, f"{value:,}" if key == "parameters" else str(value))
    console.print(table)


def main() -> None:
    """Entry point: user errors print one line and exit 1, never a traceback."""
    try:
        app()
    except HeadscopeError as error:
        err_console.print(f"[bold red]Error:[/] {error}", highlight=False)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        err_console.print("Interrupted.")
        raise SystemExit(130) from None
