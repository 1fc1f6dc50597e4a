"""headscope command line: thin wrappers that parse, call the engine and print.

This is where the parts meet: each invocation builds the plugin registry and, when
a command needs it, the findings store, and passes them down (`CommandKit`).
Plugin families add their own commands through `register_commands(app, kit)`.

Every command has a `--format json` form for tools. User errors print one line on
stderr and exit 1; there are no tracebacks for bad input.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from .core.errors import HeadscopeError, InvalidParamsError

APP_SETTINGS: dict[str, Any] = dict(
    help="Find, score and steer attention heads in transformer language models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
#: the built-in commands; `build_app` adds the plugins' commands to a copy
app = typer.Typer(**APP_SETTINGS)
models_app = typer.Typer(help="List, fetch and inspect models.", no_args_is_help=True)
runs_app = typer.Typer(help="Inspect, export and compare stored runs.", no_args_is_help=True)
db_app = typer.Typer(help="Where findings are stored, and schema upgrades.", no_args_is_help=True)
analyses_app = typer.Typer(help="Installed analyses and their parameters.", no_args_is_help=True)
tasks_app = typer.Typer(
    help="Tasks circuit analyses run on: examples and the model's accuracy.", no_args_is_help=True
)
app.add_typer(models_app, name="models")
app.add_typer(runs_app, name="runs")
app.add_typer(db_app, name="db")
app.add_typer(analyses_app, name="analyses")
app.add_typer(tasks_app, name="tasks")

console = Console()
err_console = Console(stderr=True)

FORMAT_HELP = "Output format: table for people, json for tools."
DB_HELP = "Database URL or SQLite path (default: headscope.db in the user data dir)."


def FormatOption(default: str = "table", help: str = FORMAT_HELP):  # noqa: N802
    return typer.Option(default, "--format", "-f", help=help)


def DbOption():  # noqa: N802
    return typer.Option(None, "--db", envvar="HEADSCOPE_DB", help=DB_HELP, show_envvar=True)


def _emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _check_format(value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise InvalidParamsError(f"unknown format {value!r}; choose {' or '.join(allowed)}")


@contextmanager
def progress_bar(enabled: bool = True):
    """A rich progress display on stderr; yields `update(stage, done, total)`."""
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


def ModelOption():  # noqa: N802
    return typer.Option(
        "smollm2-135m", "--model", "-m", help="Model name, directory, .gguf or hub id."
    )


class CommandKit:
    """What every command works with, built once per invocation: the plugin
    registry, the store, model loading with a progress bar, and output helpers.
    Plugin commands receive it as `kit` in `register_commands(app, kit)`."""

    console = console
    err_console = err_console
    format_option = staticmethod(FormatOption)
    db_option = staticmethod(DbOption)
    model_option = staticmethod(ModelOption)

    def __init__(self) -> None:
        self._registry = None

    def reset(self) -> None:
        """Forget the registry: each invocation sees the plugins installed now."""
        self._registry = None

    def registry(self):
        if self._registry is None:
            from .core.plugins import build_registry

            self._registry = build_registry()
        return self._registry

    def store(self, db: str | None):
        """The findings store (`--db`), with runs of dead processes marked interrupted."""
        from .storage.store import Store

        store = Store(db)
        store.mark_interrupted(only_dead_owners=True)
        return store

    def findings(self, db: str | None):
        """Read access to earlier runs, for commands that build on them."""
        from .core.analysis import FindingsReader

        return FindingsReader(self.store(db), self.registry())

    def load_model(self, name: str, show_progress: bool = True):
        from .core.models import load_spec

        with progress_bar(show_progress) as progress:
            return load_spec(self.registry().models.resolve(name), progress)

    @staticmethod
    def parse_params(pairs: list[str], params_file: Path | None = None) -> dict[str, Any]:
        """`--params FILE` then `-p key=value` pairs on top."""
        params = read_params_file(params_file) if params_file else {}
        params.update(parse_param_pairs(pairs))
        return params

    @staticmethod
    def emit_json(data: Any) -> None:
        _emit_json(data)

    @staticmethod
    def check_format(value: str, allowed: tuple[str, ...]) -> None:
        _check_format(value, allowed)


kit = CommandKit()


def build_app(commands_kit: CommandKit | None = None) -> typer.Typer:
    """The built-in commands plus every plugin's (`register_commands`)."""
    full = typer.Typer(**APP_SETTINGS)
    full.registered_commands = list(app.registered_commands)
    full.registered_groups = list(app.registered_groups)
    commands_kit = commands_kit or kit
    commands_kit.registry().register_commands(full, commands_kit)
    return full


def __getattr__(name: str) -> Any:
    """`headscope.cli.full_app`: the app with plugin commands (for `make docs`)."""
    if name == "full_app":
        return build_app()
    raise AttributeError(name)


# ----------------------------------------------------------------------------------
# run
# ----------------------------------------------------------------------------------
def parse_param_pairs(pairs: list[str]) -> dict[str, Any]:
    """`key=value` pairs; values parse as JSON when they can (`lengths=[500,1000]`)."""
    params: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise InvalidParamsError(f"--param {pair!r} is not key=value")
        key, raw = pair.split("=", 1)
        key = key.strip()
        if not key:
            raise InvalidParamsError(f"--param {pair!r} has an empty key")
        try:
            params[key] = json.loads(raw)
        except json.JSONDecodeError:
            params[key] = raw
    return params


def read_params_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InvalidParamsError(f"params file not found: {path}") from None
    except json.JSONDecodeError as error:
        raise InvalidParamsError(f"params file {path} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise InvalidParamsError(f"params file {path} must hold a JSON object")
    return data


@app.command("run")
def run_command(
    analysis: str = typer.Argument(..., help="Analysis name (see `headscope analyses list`)."),
    model: str = ModelOption(),
    params_file: Path | None = typer.Option(None, "--params", help="JSON file of parameters."),
    param: list[str] = typer.Option(
        [], "--param", "-p", help="key=value (JSON values allowed); repeatable."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed for every random choice in the run."),
    format: str = FormatOption(),
    plot: Path | None = typer.Option(
        None, "--plot", help="Also write the primary-metric heatmap PNG here."
    ),
    db: str | None = DbOption(),
) -> None:
    """Run an analysis on a model and store its findings."""
    from .core import jobs
    from .core.models import load_spec

    _check_format(format, ("table", "json"))
    registry = kit.registry()
    params = kit.parse_params(param, params_file)
    prepared = jobs.prepare(registry, analysis, model, params, seed)
    store = kit.store(db)
    show = format != "json"
    with progress_bar(show) as progress:
        handle = load_spec(registry.models.resolve(model), progress)
        jobs.check_against_model(prepared, handle, registry)
        run_id = jobs.record(store, prepared)
        summary = jobs.execute(
            store,
            registry,
            run_id,
            prepared,
            model_loader=lambda: handle,
            progress=lambda done, total, message: progress(analysis, done, total),
        )
    if plot is not None and summary.status == "succeeded":
        _write_plot(store, registry, run_id, None, plot)
    if format == "json":
        from .core.runs import run_document

        _emit_json(run_document(store, run_id))
    else:
        _print_run(store, registry, run_id, top=10)
        if plot is not None and summary.status == "succeeded":
            console.print(f"heatmap written to {plot}")
    if summary.status != "succeeded":
        raise SystemExit(1)


# ----------------------------------------------------------------------------------
# runs
# ----------------------------------------------------------------------------------
def _table(title: str, columns) -> Table:
    """A rich table with these column headings."""
    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    return table


def _status_style(status: str) -> str:
    return {"succeeded": "green", "failed": "red", "running": "yellow", "cancelled": "magenta"}.get(
        status, "white"
    )


@runs_app.command("list")
def runs_list(
    analysis: str | None = typer.Option(None, help="Only runs of this analysis."),
    model: str | None = typer.Option(None, help="Only runs on this model."),
    status: str | None = typer.Option(None, help="Only runs with this status."),
    limit: int = typer.Option(20, help="Rows per page."),
    offset: int = typer.Option(0, help="Rows to skip."),
    format: str = FormatOption(),
    db: str | None = DbOption(),
) -> None:
    """List stored runs, newest first."""
    _check_format(format, ("table", "json"))
    store = kit.store(db)
    runs = store.list_runs(analysis, model, status, limit, offset)
    if format == "json":
        _emit_json(
            {
                "total": store.count_runs(analysis, model, status),
                "runs": [r.as_dict() for r in runs],
            }
        )
        return
    table = _table("runs", ("id", "analysis", "model", "status", "seed", "duration (s)", "created"))
    for run in runs:
        duration = f"{run.duration_seconds:.1f}" if run.duration_seconds is not None else ""
        created = run.created_at.strftime("%Y-%m-%d %H:%M") if run.created_at else ""
        status_text = f"[{_status_style(run.status)}]{run.status}[/]"
        table.add_row(
            str(run.id), run.analysis, run.model, status_text, str(run.seed), duration, created
        )
    console.print(table)


def _print_run(store, registry, run_id: int, top: int | None, metric: str | None = None) -> None:
    run = store.get_run(run_id)
    console.print(
        f"[bold]run {run.id}[/]  {run.analysis} v{run.analysis_version} on {run.model}  "
        f"[{_status_style(run.status)}]{run.status}[/]"
        + (f"  {run.duration_seconds:.1f}s" if run.duration_seconds is not None else "")
    )
    if run.error:
        console.print(f"[red]error:[/] {run.error}")
    if run.params:
        console.print("params: " + json.dumps(run.params, default=str), highlight=False)
    metrics = store.metrics(run_id)
    if metrics:
        table = Table(title="metrics")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for name, value in metrics.items():
            table.add_row(name, f"{value:.4g}")
        console.print(table)
    for name, rows in (run.summary or {}).get("tables", {}).items():
        if rows:
            table = Table(title=name)
            for column in rows[0]:
                table.add_column(str(column))
            for row in rows:
                table.add_row(
                    *[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()]
                )
            console.print(table)
    metric_names = store.head_metrics(run_id)
    if not metric_names:
        return
    sort_by = registry.head_metric(run.analysis, metric, metric_names)
    if sort_by not in metric_names:
        sort_by = metric_names[0]
    pivot: dict[tuple[int, int], dict[str, float]] = {}
    for row in store.head_scores(run_id):
        pivot.setdefault((row["layer"], row["head"]), {})[row["metric"]] = row["value"]
    ranked = sorted(pivot.items(), key=lambda item: -item[1].get(sort_by, float("-inf")))
    shown = ranked if top is None else ranked[:top]
    title = f"heads by {sort_by}" + ("" if top is None else f" (top {len(shown)} of {len(ranked)})")
    # metrics indexed otherwise (e.g. per KV head) are not columns of this table
    counts = {n: sum(n in values for _, values in ranked) for n in metric_names}
    columns = [n for n in metric_names if counts[n] == counts[sort_by]]
    table = Table(title=title)
    table.add_column("layer", justify="right")
    table.add_column("head", justify="right")
    for name in columns:
        table.add_column(name, justify="right")
    for (layer, head), values in shown:
        table.add_row(
            str(layer), str(head), *[f"{values.get(n, float('nan')):.4f}" for n in columns]
        )
    console.print(table)
    others = [f"{n} ({counts[n]} rows)" for n in metric_names if n not in columns]
    if others:
        console.print(
            f"also stored: {', '.join(others)}; see runs export or --metric", highlight=False
        )
    artifacts = store.artifacts(run_id)
    if artifacts:
        console.print("artifacts: " + ", ".join(a["path"] for a in artifacts), highlight=False)


@runs_app.command("show")
def runs_show(
    run_id: int = typer.Argument(..., help="Run id."),
    top: int = typer.Option(20, help="Heads to list in the table (0 = all)."),
    metric: str | None = typer.Option(None, help="Sort heads by this metric."),
    format: str = FormatOption(),
    db: str | None = DbOption(),
) -> None:
    """Show a run: params, status, metrics and its heads."""
    from .core.runs import run_document

    _check_format(format, ("table", "json"))
    store = kit.store(db)
    if format == "json":
        _emit_json(run_document(store, run_id))
        return
    _print_run(store, kit.registry(), run_id, top=None if top == 0 else top, metric=metric)


@runs_app.command("export")
def runs_export(
    run_id: int = typer.Argument(..., help="Run id."),
    format: str = FormatOption("json", "csv (head scores) or json (everything)."),
    output: Path | None = typer.Option(
        None, "--output", "-o", help="Write here instead of stdout."
    ),
    db: str | None = DbOption(),
) -> None:
    """Export a run's findings as CSV or JSON."""
    from .core.runs import run_document
    from .storage.export import head_scores_csv

    _check_format(format, ("csv", "json"))
    store = kit.store(db)
    text = (
        head_scores_csv(store, run_id)
        if format == "csv"
        else json.dumps(run_document(store, run_id), indent=2, default=str) + "\n"
    )
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text)
        err_console.print(f"wrote {output}")


@runs_app.command("compare")
def runs_compare(
    run_a: int = typer.Argument(..., help="First run id."),
    run_b: int = typer.Argument(..., help="Second run id."),
    metric: str | None = typer.Option(
        None, help="Head metric for both runs (default: each analysis's own)."
    ),
    top_k: int | None = typer.Option(
        None, "--top-k", help="Head set = the k best heads of each run."
    ),
    threshold: float | None = typer.Option(None, help="Head set = heads scoring above this."),
    bands: int = typer.Option(3, help="Layer bands for the per-band overlap."),
    format: str = FormatOption(),
    db: str | None = DbOption(),
) -> None:
    """Overlap of two runs' head sets: Jaccard and overlap coefficient, by layer band."""
    from .core.compare import compare_runs

    _check_format(format, ("table", "json"))
    if top_k is not None and threshold is not None:
        raise InvalidParamsError("give --top-k or --threshold, not both")
    rule, value = (
        ("top", top_k)
        if top_k is not None
        else ("threshold", threshold)
        if threshold is not None
        else (None, None)
    )
    result = compare_runs(
        kit.store(db), kit.registry(), run_a, run_b, metric, metric, rule, value, bands
    )
    if format == "json":
        _emit_json(result)
        return
    for side in ("a", "b"):
        s = result[side]
        console.print(
            f"run {s['run_id']} ({s['analysis']} on {s['model']}): {len(s['heads'])} heads by {s['metric']} {s['rule']} {s['value']}"
        )
    console.print(
        f"shared {result['intersection']}  jaccard {result['jaccard']:.3f}  "
        f"overlap coefficient {result['overlap_coefficient']:.3f}"
    )
    table = _table(
        "by layer band", ("band", "layers", "A", "B", "shared", "jaccard", "overlap coef.")
    )
    for band in result["bands"]:
        table.add_row(
            band["band"],
            f"{band['layers'][0]}-{band['layers'][1]}",
            str(band["size_a"]),
            str(band["size_b"]),
            str(band["intersection"]),
            f"{band['jaccard']:.3f}",
            f"{band['overlap_coefficient']:.3f}",
        )
    console.print(table)
    if result["shared_heads"]:
        console.print("shared heads: " + ", ".join(f"L{l}H{h}" for l, h in result["shared_heads"]))  # noqa: E741


@runs_app.command("cancel")
def runs_cancel(
    run_id: int = typer.Argument(..., help="Run id."),
    format: str = FormatOption(),
    db: str | None = DbOption(),
) -> None:
    """Ask a queued or running run to stop (at its next progress point)."""
    _check_format(format, ("table", "json"))
    status = kit.store(db).request_cancel(run_id)
    if format == "json":
        _emit_json({"run_id": run_id, "status": status})
    else:
        console.print(f"run {run_id}: {status}")


# ----------------------------------------------------------------------------------
# plot
# ----------------------------------------------------------------------------------
def _write_plot(store, registry, run_id: int, metric: str | None, output: Path) -> str:
    from .core.plots import head_heatmap, scores_matrix

    run = store.get_run(run_id)
    available = store.head_metrics(run_id)
    if not available:
        raise InvalidParamsError(
            f"run {run_id} ({run.analysis}, {run.status}) has no per-head scores to plot"
        )
    chosen = registry.head_metric(run.analysis, metric, available)
    if chosen not in available:
        raise InvalidParamsError(
            f"run {run_id} has no head metric {chosen!r}; it has: {', '.join(available)}"
        )
    matrix = scores_matrix(store.head_scores(run_id, chosen))
    figure = head_heatmap(matrix, f"run {run_id}: {run.analysis} on {run.model} — {chosen}", chosen)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=120, bbox_inches="tight")
    return chosen


@app.command("plot")
def plot_command(
    run_id: int = typer.Argument(..., help="Run id."),
    output: Path = typer.Option(
        Path("headscope-heatmap.png"), "--output", "-o", help="PNG file to write."
    ),
    metric: str | None = typer.Option(
        None, help="Head metric (default: the analysis's primary one)."
    ),
    format: str = FormatOption(),
    db: str | None = DbOption(),
) -> None:
    """Write a layer x head heatmap of one of a run's head metrics."""

    _check_format(format, ("table", "json"))
    chosen = _write_plot(kit.store(db), kit.registry(), run_id, metric, output)
    if format == "json":
        _emit_json({"run_id": run_id, "metric": chosen, "path": str(output)})
    else:
        console.print(f"wrote {output} ({chosen})")


# ----------------------------------------------------------------------------------
# db, plugins, analyses
# ----------------------------------------------------------------------------------
@db_app.command("path")
def db_path(format: str = FormatOption(), db: str | None = DbOption()) -> None:
    """Print the database URL (and file path for SQLite)."""
    from .storage.db import database_path, database_url

    _check_format(format, ("table", "json"))
    url = database_url(db)
    path = database_path(url)
    if format == "json":
        _emit_json({"url": url, "path": str(path) if path else None})
    else:
        console.print(str(path) if path else url, highlight=False)


@db_app.command("upgrade")
def db_upgrade(format: str = FormatOption(), db: str | None = DbOption()) -> None:
    """Apply schema migrations (also done automatically on first use)."""
    from .storage.db import database_url, make_engine, upgrade

    _check_format(format, ("table", "json"))
    engine = make_engine(database_url(db))
    before, after = upgrade(engine)
    if format == "json":
        _emit_json({"before": before, "after": after})
    else:
        console.print(f"schema {before or 'empty'} -> {after}")


@app.command("plugins")
def plugins_command(format: str = FormatOption()) -> None:
    """List plugins: version, hooks, what they provide, and load errors."""

    _check_format(format, ("table", "json"))
    infos = kit.registry().plugins
    if format == "json":
        _emit_json([i.as_dict() for i in infos])
        return
    table = _table("plugins", ("name", "version", "hooks", "provides", "status"))
    for info in infos:
        provides = ", ".join(
            info.analyses + info.models + info.tasks + info.rpc_methods + info.commands
        )
        name = info.name + (" (built-in)" if info.builtin else "")
        status = "[red]failed to load[/]" if info.error else "ok"
        table.add_row(name, info.version or "", ", ".join(info.hooks), provides, status)
    console.print(table)
    for info in infos:
        if info.error:
            console.print(f"[red]{info.name}:[/] {info.error}", highlight=False, soft_wrap=True)


@analyses_app.command("list")
def analyses_list(format: str = FormatOption()) -> None:
    """List installed analyses."""

    _check_format(format, ("table", "json"))
    registry = kit.registry()
    rows = [
        {
            "name": name,
            "version": cls.version,
            "plugin": registry.analysis_plugins.get(name),
            "summary": cls.summary,
        }
        for name, cls in sorted(registry.analyses.items())
    ]
    if format == "json":
        _emit_json(rows)
        return
    table = _table("analyses", ("name", "version", "plugin", "summary"))
    for row in rows:
        table.add_row(row["name"], row["version"], row["plugin"] or "", row["summary"])
    console.print(table)


@analyses_app.command("describe")
def analyses_describe(
    name: str = typer.Argument(..., help="Analysis name."), format: str = FormatOption()
) -> None:
    """Show an analysis's parameters with defaults and descriptions."""

    _check_format(format, ("table", "json"))
    cls = kit.registry().analysis(name)
    description = cls.describe()
    if format == "json":
        _emit_json(description)
        return
    console.print(f"[bold]{cls.name}[/] v{cls.version}: {cls.summary}")
    table = _table("params", ("name", "type", "default", "description"))
    for field_name, field in cls.Params.model_fields.items():
        annotation = getattr(field.annotation, "__name__", str(field.annotation))
        table.add_row(
            field_name,
            annotation.replace("typing.", ""),
            json.dumps(field.default, default=str),
            field.description or "",
        )
    console.print(table)


# ----------------------------------------------------------------------------------
# tasks
# ----------------------------------------------------------------------------------
@tasks_app.command("list")
def tasks_list(format: str = FormatOption()) -> None:
    """List installed tasks (a task file is named jsonl:PATH)."""

    _check_format(format, ("table", "json"))
    registry = kit.registry()
    owners = {name: info.name for info in registry.plugins for name in info.tasks}
    rows = [
        {**task.describe(), "plugin": owners.get(name)}
        for name, task in sorted(registry.tasks.items())
    ]
    if format == "json":
        _emit_json(rows)
        return
    table = _table("tasks", ("name", "plugin", "metric", "description"))
    for row in rows:
        table.add_row(row["name"], row["plugin"] or "", row["metric"], row["description"])
    console.print(table)
    console.print("Also accepted: jsonl:PATH, a task file (see docs/tasks.md).")


@tasks_app.command("show")
def tasks_show(
    name: str = typer.Argument(..., help="Task name or jsonl:PATH."),
    model: str = ModelOption(),
    n: int = typer.Option(32, "--n", min=1, help="Examples to build and score."),
    examples: int = typer.Option(5, "--examples", min=0, help="Examples to print."),
    seed: int = typer.Option(0, "--seed", help="Seed for building examples."),
    format: str = FormatOption(),
) -> None:
    """Show a task's examples and the model's accuracy on them."""
    from .core.tasks import task_report

    _check_format(format, ("table", "json"))
    task = kit.registry().task(name)
    handle = kit.load_model(model, show_progress=format != "json")
    report = task_report(handle, task, n, seed, examples)
    if format == "json":
        _emit_json(report)
        return
    console.print(f"[bold]{report['name']}[/]: {report['description']}", highlight=False)
    console.print(f"metric: {report['metric']} ({report['metric_description']})", highlight=False)
    table = _table(
        f"examples on {handle.name}",
        ("prompt", "answer", "distractor", "corrupted", "metric", "corrupted metric"),
    )
    for row in report["examples"]:
        table.add_row(
            row["prompt"],
            _short(row["answers"]),
            _short(row["distractors"]),
            row["corrupted"],
            f"{row['metric_clean']:.3f}",
            f"{row['metric_corrupted']:.3f}",
        )
    console.print(table)
    dropped = ", ".join(f"{k}: {v}" for k, v in report["dropped"].items()) or "none"
    console.print(
        f"{report['pairs']} pairs (dropped: {dropped}); accuracy {report['accuracy']:.3f} "
        f"(metric > 0), top-1 accuracy {report['top1_accuracy']:.3f}, mean metric "
        f"{report['metric_clean']:.3f} clean vs {report['metric_corrupted']:.3f} corrupted",
        highlight=False,
    )


def _short(tokens: list[str]) -> str:
    shown = " | ".join(repr(t) for t in tokens[:3])
    return shown + (f" (+{len(tokens) - 3})" if len(tokens) > 3 else "")


# ----------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------
@models_app.command("list")
def models_list(format: str = FormatOption()) -> None:
    """List registered models and whether each is ready to load offline."""
    _check_format(format, ("table", "json"))
    rows = []
    for spec in kit.registry().models.specs():
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
    table = _table("models", ("name", "ready", "source", "description"))
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
    format: str = FormatOption(),
) -> None:
    """Fetch a model's weights and build its safetensors cache (once)."""
    _check_format(format, ("table", "json"))
    spec = kit.registry().models.resolve(name)
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
    format: str = FormatOption(),
) -> None:
    """Load a model and print its structure, size, source and load time."""
    _check_format(format, ("table", "json"))
    handle = kit.load_model(name, show_progress=format != "json")
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


# ----------------------------------------------------------------------------------
# serve
# ----------------------------------------------------------------------------------
@app.command("serve")
def serve_command(
    host: str = typer.Option(
        "127.0.0.1", help="Address to listen on; beyond loopback a token is required."
    ),
    port: int = typer.Option(8765, help="TCP port (0: any free port; the address is printed)."),
    token: str | None = typer.Option(
        None,
        "--token",
        envvar="HEADSCOPE_TOKEN",
        show_envvar=True,
        help="Bearer token clients must send (Authorization: Bearer TOKEN).",
    ),
    stdio: bool = typer.Option(
        False, "--stdio", help="JSON-RPC on stdin/stdout, one message per line, instead of HTTP."
    ),
    max_request_bytes: int = typer.Option(1024 * 1024, help="Largest request accepted, in bytes."),
    shutdown_timeout: float = typer.Option(
        30.0, help="Seconds to wait for requests and running analyses on shutdown."
    ),
    torch_threads: int | None = typer.Option(
        None,
        help="CPU threads per running analysis (default: all cores but one, which is "
        "left to answer requests while analyses run).",
    ),
    format: str = FormatOption(
        help="Announce the address and shutdown as a line on stderr (table) or a JSON "
        "line on stdout (json; on stderr with --stdio)."
    ),
    db: str | None = DbOption(),
) -> None:
    """Serve the JSON-RPC API (see docs/rpc.md) until SIGTERM or Ctrl-C."""
    import logging

    from .core.rpc import serve

    _check_format(format, ("table", "json"))
    if not 0 <= port <= 65535:
        raise InvalidParamsError(f"--port {port} is not a TCP port (0-65535)")
    if max_request_bytes < 1024:
        raise InvalidParamsError("--max-request-bytes must be at least 1024")
    if shutdown_timeout < 0:
        raise InvalidParamsError("--shutdown-timeout cannot be negative")
    if torch_threads is not None and torch_threads < 1:
        raise InvalidParamsError("--torch-threads must be at least 1")
    logging.basicConfig(
        level=logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("headscope").setLevel(logging.INFO)

    def announce(event: dict[str, Any]) -> None:
        if format == "json":
            stream = sys.stderr if stdio else sys.stdout
            stream.write(json.dumps(event) + "\n")
            stream.flush()
        elif event["event"] == "listening":
            err_console.print(f"headscope JSON-RPC on {event['url']} (pid {event['pid']})")
        elif event["event"] == "ready":
            err_console.print(f"headscope JSON-RPC on stdin/stdout (pid {event['pid']})")
        else:
            err_console.print("headscope JSON-RPC stopped")

    def open_service():
        from .core.rpc.service import Service
        from .storage.store import Store

        threads = torch_threads or serve.default_torch_threads()
        return Service.open(Store(db), kit.registry(), threads)

    if stdio:
        serve.serve_stdin(open_service, announce, max_request_bytes, shutdown_timeout)
    else:
        serve.serve_http(
            open_service,
            announce,
            host,
            port,
            token or None,
            max_request_bytes,
            shutdown_timeout,
        )


@app.command("mcp")
def mcp_command(
    torch_threads: int | None = typer.Option(
        None,
        help="CPU threads per running analysis (default: all cores but one, which is "
        "left to answer requests while analyses run).",
    ),
    db: str | None = DbOption(),
) -> None:
    """Serve MCP on stdin/stdout for LLM agents (see docs/mcp.md) until end of input or SIGTERM."""
    import logging

    from .core.mcp.server import serve_stdio
    from .core.rpc.serve import default_torch_threads

    if torch_threads is not None and torch_threads < 1:
        raise InvalidParamsError("--torch-threads must be at least 1")
    logging.basicConfig(
        level=logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("headscope").setLevel(logging.INFO)

    def announce(event: dict[str, Any]) -> None:
        if event["event"] == "ready":
            err_console.print(f"headscope MCP on stdin/stdout (pid {event['pid']})")
        else:
            err_console.print("headscope MCP stopped")

    def open_service():
        from .core.rpc.service import Service
        from .storage.store import Store

        return Service.open(Store(db), kit.registry(), torch_threads or default_torch_threads())

    serve_stdio(open_service, announce)


def main() -> None:
    """Entry point: user errors print one line and exit 1, never a traceback."""
    try:
        kit.reset()
        build_app(kit)()
    except HeadscopeError as error:
        err_console.print(f"[bold red]Error:[/] {error}", highlight=False, soft_wrap=True)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        err_console.print("Interrupted.")
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
