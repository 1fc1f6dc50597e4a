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
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from .core.compare import MAX_BANDS
from .core.errors import HeadscopeError, InvalidParamsError
from .core.runs import MAX_INT, MAX_SEED, RUN_STATUSES
from .core.workers import DEFAULT_MAX_QUEUED

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

#: width of tables written to a pipe or file, where no terminal sets one: wide
#: enough that names and numbers are not cut (a terminal's own width wins)
PIPED_WIDTH = 200
console = Console(width=None if sys.stdout.isatty() else PIPED_WIDTH)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else PIPED_WIDTH)

FORMAT_HELP = "Output format: table for people, json for tools."
DB_HELP = "Database URL or SQLite path (default: headscope.db in the user data dir)."


def FormatOption(default: str = "table", help: str = FORMAT_HELP):  # noqa: N802
    return typer.Option(default, "--format", "-f", help=help)


def DbOption():  # noqa: N802
    return typer.Option(None, "--db", envvar="HEADSCOPE_DB", help=DB_HELP, show_envvar=True)


def RunIdArgument(help: str = "Run id."):  # noqa: N802
    return typer.Argument(..., min=1, max=MAX_INT, help=help)


def SeedOption(help: str):  # noqa: N802
    return typer.Option(0, "--seed", min=0, max=MAX_SEED, help=help)


def _emit_json(data: Any) -> None:
    """JSON for tools: indented, or on one line with `headscope --compact`."""
    if kit.compact_json:
        text = json.dumps(data, separators=(",", ":"), default=str)
    else:
        text = json.dumps(data, indent=2, default=str)
    sys.stdout.write(text + "\n")


def _check_format(value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise InvalidParamsError(f"unknown format {value!r}; choose {' or '.join(allowed)}")


@contextmanager
def progress_bar(enabled: bool = True):
    """A rich progress display on stderr; yields `update(stage, done, total)`."""
    quiet_library_progress()
    if not enabled:
        yield lambda stage, done, total: None
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
    )
    if not err_console.is_terminal:  # a log file or a pipe: a line now and then
        yield _progress_lines()
        return
    with Progress(*columns, console=err_console, transient=False) as bar:
        tasks: dict[str, int] = {}

        def update(stage: str, done: float, total: float | None) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        yield update


def _progress_lines(every_s: float = 30.0):
    """Progress as plain lines: each stage's start and end, every 10% and every
    `every_s` seconds, so a piped or logged run still shows it is alive."""
    started: dict[str, float] = {}
    shown: dict[str, tuple[int, float]] = {}

    def update(stage: str, done: float, total: float | None) -> None:
        now = time.monotonic()
        started.setdefault(stage, now)
        tenth = int(10 * done / total) if total else 0
        last_tenth, last_time = shown.get(stage, (-1, 0.0))
        finished = bool(total) and done >= total
        if tenth == last_tenth and now - last_time < every_s and not finished:
            return
        if finished and last_tenth == 10:
            return
        shown[stage] = (10 if finished else tenth, now)
        amount = f"{100 * done / total:.0f}%" if total else f"{done:g}"
        err_console.print(f"{stage}: {amount} ({now - started[stage]:.0f} s)", highlight=False)

    return update


def quiet_library_progress() -> None:
    """transformers draws its own progress bars (loading, GGUF conversion); under
    ours they only garble the display."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


def ModelOption():  # noqa: N802
    return typer.Option(
        "smollm2-135m", "--model", "-m", help="Model name, directory, .gguf or hub id."
    )


def DeviceOption():  # noqa: N802
    return typer.Option(
        None,
        "--device",
        envvar="HEADSCOPE_DEVICE",
        show_envvar=True,
        help="Where the model runs: auto (the accelerator if any), cpu, cuda, cuda:N, mps.",
    )


def DtypeOption():  # noqa: N802
    return typer.Option(
        None,
        "--dtype",
        envvar="HEADSCOPE_DTYPE",
        show_envvar=True,
        help="Weight precision: auto (bfloat16 on CUDA, float16 on MPS, float32 on CPU), "
        "fast (as auto, but bfloat16 on CPUs with AMX), float32, bfloat16, float16.",
    )


def DeviceMapOption():  # noqa: N802
    return typer.Option(
        None,
        "--device-map",
        help="auto: shard the model's layers over every visible GPU (accelerate); "
        "--device auto does this by itself when there are several.",
    )


def use_default_placement(device: str | None, dtype: str | None) -> None:
    """Make --device / --dtype this process's default for every model it loads
    (requests that name their own placement keep it). Checked now, so a server or
    worker with an unavailable device stops before it listens or takes a run."""
    import os

    from .core.devices import DEVICE_ENV, DTYPE_ENV, resolve_placement

    resolve_placement(device, dtype)
    for name, value in ((DEVICE_ENV, device), (DTYPE_ENV, dtype)):
        if value is not None:
            os.environ[name] = value


class CommandKit:
    """What every command works with, built once per invocation: the plugin
    registry, the store, model loading with a progress bar, and output helpers.
    Plugin commands receive it as `kit` in `register_commands(app, kit)`."""

    console = console
    err_console = err_console
    format_option = staticmethod(FormatOption)
    db_option = staticmethod(DbOption)
    model_option = staticmethod(ModelOption)
    device_option = staticmethod(DeviceOption)
    dtype_option = staticmethod(DtypeOption)
    device_map_option = staticmethod(DeviceMapOption)

    def __init__(self) -> None:
        self._registry = None
        self.compact_json = False

    def reset(self) -> None:
        """Forget the registry: each invocation sees the plugins installed now."""
        self._registry = None
        self.compact_json = False

    def registry(self):
        if self._registry is None:
            from .core.plugins import build_registry

            self._registry = build_registry()
        return self._registry

    def store(self, db: str | None, mode: str = "create"):
        """The findings store (`--db`), with runs of dead processes marked interrupted.

        `mode` says what the command does: create (it writes, and makes a missing
        database), write (the database must exist) or read (it must exist and may be
        read-only). Refused databases raise before anything is loaded or written.
        """
        from .storage.store import Store

        store = Store(db, mode=mode)
        if not store.read_only:
            store.mark_interrupted(only_dead_owners=True)
        return store

    def findings(self, db: str | None):
        """Read access to earlier runs, for commands that build on them."""
        from .core.analysis import FindingsReader

        return FindingsReader(self.store(db, mode="read"), self.registry())

    def load_model(
        self,
        name: str,
        show_progress: bool = True,
        device: str | None = None,
        dtype: str | None = None,
        device_map: str | None = None,
    ):
        """Load a model on the device and in the precision asked for (see
        `device_option`, `dtype_option`, `device_map_option`); a device this
        machine lacks is an error before anything loads."""
        from .core.devices import resolve_placement
        from .core.models import load_spec

        spec = self.registry().models.resolve(name)
        placement = None if spec.remote else resolve_placement(device, dtype, device_map)
        with progress_bar(show_progress) as progress:
            return load_spec(spec, progress, placement=placement)

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


@app.callback()
def global_options(
    compact: bool = typer.Option(
        False, "--compact", help="Write --format json output on one line instead of indented."
    ),
) -> None:
    """Find, score and steer attention heads in transformer language models."""
    kit.compact_json = compact


def build_app(commands_kit: CommandKit | None = None) -> typer.Typer:
    """The built-in commands plus every plugin's (`register_commands`)."""
    full = typer.Typer(**APP_SETTINGS)
    full.registered_callback = app.registered_callback
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
    except IsADirectoryError:
        raise InvalidParamsError(f"params file {path} is a folder") from None
    except (OSError, UnicodeDecodeError) as error:
        raise InvalidParamsError(f"cannot read params file {path}: {error}") from None
    except json.JSONDecodeError as error:
        raise InvalidParamsError(f"params file {path} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise InvalidParamsError(f"params file {path} must hold a JSON object")
    return data


PLOT_SUFFIXES = (".png", ".pdf", ".svg")


def output_file(path: Path, what: str, suffixes: tuple[str, ...] = ()) -> Path:
    """A file we are about to write, checked before any work: not a folder, a
    known suffix, its parent folders created, and writable. Every command that
    writes a file goes through here, so they all behave alike."""
    if path.is_dir():
        raise InvalidParamsError(f"{what} {path} is a folder; give a file name")
    if suffixes and path.suffix.lower() not in suffixes:
        raise InvalidParamsError(f"{what} {path}: use a {', '.join(suffixes)} file name")
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab"):
            pass
    except OSError as error:
        raise InvalidParamsError(f"cannot write {what} {path}: {error.strerror}") from None
    if not existed:
        path.unlink()
    return path


@app.command("run")
def run_command(
    analysis: str = typer.Argument(..., help="Analysis name (see `headscope analyses list`)."),
    model: str = ModelOption(),
    params_file: Path | None = typer.Option(None, "--params", help="JSON file of parameters."),
    param: list[str] = typer.Option(
        [], "--param", "-p", help="key=value (JSON values allowed); repeatable."
    ),
    seed: int = SeedOption("Seed for every random choice in the run."),
    format: str = FormatOption(),
    plot: Path | None = typer.Option(
        None, "--plot", help="Also write the primary-metric heatmap here (.png, .pdf or .svg)."
    ),
    device: str | None = DeviceOption(),
    dtype: str | None = DtypeOption(),
    device_map: str | None = DeviceMapOption(),
    db: str | None = DbOption(),
    max_memory: str | None = typer.Option(
        None,
        "--max-memory",
        help="Memory the run's batches may use (e.g. 8GB, 512MiB); default: half of what "
        "the device has free. A batch that still runs out of memory is halved.",
    ),
) -> None:
    """Run an analysis on a model and store its findings (with the device, dtype and
    peak memory it used)."""
    from .core import jobs
    from .core.analysis import FindingsReader
    from .core.models import load_spec

    _check_format(format, ("table", "json"))
    registry = kit.registry()
    params = kit.parse_params(param, params_file)
    if plot is not None:
        output_file(plot, "plot file", PLOT_SUFFIXES)
    prepared = jobs.prepare(
        registry,
        analysis,
        model,
        params,
        seed,
        device=device,
        dtype=dtype,
        device_map=device_map,
        max_memory=max_memory,
    )
    store = kit.store(db)  # params are valid: only now may a database be made
    jobs.check_runs(prepared, FindingsReader(store, registry))
    show = format != "json"
    with progress_bar(show) as progress:
        handle = load_spec(registry.models.resolve(model), progress, placement=prepared.placement)
        jobs.check_against_model(prepared, handle, registry)
        run_id = jobs.record(store, prepared)
        try:
            summary = jobs.execute(
                store,
                registry,
                run_id,
                prepared,
                model_loader=lambda: handle,
                progress=lambda done, total, message: progress(analysis, done, total),
            )
        except KeyboardInterrupt:
            err_console.print(f"Interrupted: run {run_id} is stored as interrupted.")
            raise SystemExit(130) from None
    plot_error = None
    if plot is not None and summary.status == "succeeded":
        try:
            _write_plot(store, registry, run_id, None, plot)
        except (HeadscopeError, OSError) as error:  # the run is stored: still show it
            plot_error = f"run {run_id} is stored, but its heatmap was not written: {error}"
    if format == "json":
        from .core.runs import run_document

        _emit_json(run_document(store, run_id))
    else:
        _print_run(store, registry, run_id, top=10)
        if plot is not None and summary.status == "succeeded" and plot_error is None:
            console.print(f"heatmap written to {plot}")
    if plot_error is not None:
        raise InvalidParamsError(plot_error)
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
    status: Literal[RUN_STATUSES] | None = typer.Option(None, help="Only runs with this status."),  # type: ignore[valid-type]
    limit: int = typer.Option(20, min=1, max=MAX_INT, help="Rows per page."),
    offset: int = typer.Option(0, min=0, max=MAX_INT, help="Rows to skip."),
    format: str = FormatOption(),
    db: str | None = DbOption(),
) -> None:
    """List stored runs, newest first."""
    _check_format(format, ("table", "json"))
    store = kit.store(db, mode="read")
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
    placement = (run.summary or {}).get("placement")
    if placement:
        console.print(
            f"ran on {', '.join(placement['devices'])} in {placement['dtype']}, "
            f"peak memory {placement['peak_memory_bytes'] / 2**20:,.0f} MiB",
            highlight=False,
        )
    metrics = store.metrics(run_id)
    tables = (run.summary or {}).get("tables", {})
    # `<setting>.<metric>` metrics of a setting that a summary table has a row for
    # are in that table: list each number once
    settings = {str(row["setting"]) for rows in tables.values() for row in rows if "setting" in row}
    listed = {n: v for n, v in metrics.items() if n.split(".", 1)[0] not in settings}
    if listed:
        table = Table(title="metrics")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for name, value in listed.items():
            table.add_row(name, f"{value:.4g}")
        console.print(table)
    for name, rows in tables.items():
        if rows:
            table = Table(title=name)
            for column in rows[0]:
                table.add_column(str(column))
            for row in rows:
                table.add_row(
                    *[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()]
                )
            console.print(table)
    if len(listed) < len(metrics):
        console.print(
            f"{len(metrics) - len(listed)} more metrics per setting (setting.metric) "
            "are stored: runs show --format json lists them",
            highlight=False,
        )
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
    run_id: int = RunIdArgument(),
    top: int = typer.Option(20, min=0, help="Heads to list in the table (0 = all)."),
    metric: str | None = typer.Option(None, help="Sort heads by this metric."),
    format: str = FormatOption(),
    db: str | None = DbOption(),
) -> None:
    """Show a run: params, status, metrics and its heads."""
    from .core.runs import run_document

    _check_format(format, ("table", "json"))
    store = kit.store(db, mode="read")
    if metric is not None:
        store.get_run(run_id)  # an unknown run says so first
        available = store.head_metrics(run_id)
        if metric not in available:
            raise InvalidParamsError(
                f"run {run_id} has no head metric {metric!r}; it has: "
                f"{', '.join(available) or 'none'}"
            )
    if format == "json":
        _emit_json(run_document(store, run_id))
        return
    _print_run(store, kit.registry(), run_id, top=None if top == 0 else top, metric=metric)


@runs_app.command("export")
def runs_export(
    run_id: int = RunIdArgument(),
    format: str = FormatOption(
        "json",
        "csv (head scores, a row each), wide-csv (a layers x heads matrix per metric), "
        "parquet (head scores, a row each; needs -o), json (everything), or for a "
        "kv-cache-plan run kv-plan (its plan as DuoAttention's full_attention_heads.tsv) "
        "or kv-plan-json (the plan as JSON).",
    ),
    output: Path | None = typer.Option(
        None, "--output", "-o", help="Write here instead of stdout."
    ),
    metric: str | None = typer.Option(
        None, help="Only this head metric (csv, wide-csv and parquet)."
    ),
    db: str | None = DbOption(),
) -> None:
    """Export a run's findings as CSV, wide CSV, Parquet or JSON, or a kv-cache-plan
    run's plan for a serving engine."""
    from .core.runs import run_document
    from .storage.export import head_scores_csv, head_scores_wide_csv, write_head_scores_parquet

    _check_format(format, ("csv", "wide-csv", "parquet", "json", *KV_PLAN_FORMATS))
    if format in ("json", *KV_PLAN_FORMATS) and metric is not None:
        raise InvalidParamsError("--metric applies to the csv, wide-csv and parquet formats")
    if format in KV_PLAN_FORMATS:
        _export_kv_plan(kit.store(db, mode="read"), run_id, format, output)
        return
    if format == "parquet":
        if output is None:
            raise InvalidParamsError("--format parquet writes a file: give -o FILE")
        output_file(output, "export file")
        rows = write_head_scores_parquet(kit.store(db, mode="read"), run_id, output, metric)
        err_console.print(f"wrote {output} ({rows} rows)", highlight=False, soft_wrap=True)
        return
    store = kit.store(db, mode="read")
    text = (
        head_scores_csv(store, run_id, metric)
        if format == "csv"
        else head_scores_wide_csv(store, run_id, metric)
        if format == "wide-csv"
        else json.dumps(run_document(store, run_id), indent=2, default=str) + "\n"
    )
    if output is None:
        sys.stdout.write(text)
    else:
        output_file(output, "export file").write_text(text)
        err_console.print(f"wrote {output}")


#: `runs export` formats of a kv-cache-plan run's plan
KV_PLAN_FORMATS = ("kv-plan", "kv-plan-json")


def _export_kv_plan(store, run_id: int, format: str, output: Path | None) -> None:
    from .plugins.retrieval_heads.kv_plan_analysis import PLAN_JSON, PLAN_TSV, KVCachePlan
    from .storage.export import stored_artifact

    name = PLAN_TSV if format == "kv-plan" else PLAN_JSON
    data = stored_artifact(store, run_id, KVCachePlan.name, name)
    if output is None:
        sys.stdout.write(data.decode())
    else:
        output_file(output, "export file").write_bytes(data)
        err_console.print(f"wrote {output}")


@runs_app.command("compare")
def runs_compare(
    run_a: int = RunIdArgument("First run id."),
    run_b: int = RunIdArgument("Second run id."),
    metric: str | None = typer.Option(
        None, help="Head metric for both runs (default: each analysis's own)."
    ),
    top_k: int | None = typer.Option(
        None, "--top-k", min=1, max=MAX_INT, help="Head set = the k best heads of each run."
    ),
    threshold: float | None = typer.Option(None, help="Head set = heads scoring above this."),
    bands: int = typer.Option(
        3, min=1, max=MAX_BANDS, help="Layer bands for the per-band overlap."
    ),
    format: str = FormatOption(),
    db: str | None = DbOption(),
) -> None:
    """Overlap of two runs' head sets (Jaccard and overlap coefficient, by layer band) and
    the Pearson and Spearman correlation of their scores on the heads both score."""
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
        kit.store(db, mode="read"), kit.registry(), run_a, run_b, metric, metric, rule, value, bands
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
    corr = result["correlation"]
    if corr["pearson"] is not None:
        console.print(
            f"scores on the {corr['heads']} heads both score: pearson {corr['pearson']:.3f}  "
            f"spearman {corr['spearman']:.3f}",
            highlight=False,
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


@runs_app.command("stats")
def runs_stats(
    run_id: int = RunIdArgument(),
    metric: str | None = typer.Option(
        None, help="Head metric (default: the analysis's primary metric)."
    ),
    bins: int = typer.Option(10, min=1, max=1000, help="Histogram bins over [min, max]."),
    threshold: list[float] = typer.Option(
        [], "--threshold", help="Count heads scoring above this (repeatable)."
    ),
    format: str = FormatOption(),
    db: str | None = DbOption(),
) -> None:
    """Distribution of a run's head scores: count, mean, sd, quantiles, a histogram and
    how many heads score above each --threshold."""
    from .core.summaries import head_score_stats

    _check_format(format, ("table", "json"))
    result = head_score_stats(
        kit.store(db, mode="read"), kit.registry(), run_id, metric, bins, threshold
    )
    if format == "json":
        _emit_json(result)
        return
    console.print(
        f"run {run_id} ({result['analysis']} on {result['model']}), {result['metric']}: "
        f"{result['count']} heads, mean {result['mean']:.4g}, sd {result['sd']:.4g}",
        highlight=False,
    )
    quantiles = _table("quantiles", ("quantile", "value"))
    for q, value in result["quantiles"].items():
        quantiles.add_row(q, f"{value:.4g}")
    console.print(quantiles)
    histogram = _table("histogram", ("from", "to", "heads", ""))
    most = max(b["count"] for b in result["histogram"]) or 1
    for b in result["histogram"]:
        bar = "#" * round(30 * b["count"] / most)
        histogram.add_row(f"{b['low']:.4g}", f"{b['high']:.4g}", str(b["count"]), bar)
    console.print(histogram)
    for value, count in result["above"].items():
        console.print(f"heads above {value}: {count}", highlight=False)


@runs_app.command("summarize")
def runs_summarize(
    run_ids: list[int] = typer.Argument(..., help="Run ids (one analysis on one model)."),
    metric: list[str] = typer.Option(
        [], "--metric", help="Only these metrics (repeatable; default: every shared one)."
    ),
    format: str = FormatOption(),
    db: str | None = DbOption(),
) -> None:
    """Each metric's mean +- sd, min and max across runs of one analysis on one model
    (e.g. one per seed); params that differ besides the seed are named."""
    from .core.summaries import summarize_runs

    _check_format(format, ("table", "json"))
    result = summarize_runs(kit.store(db, mode="read"), run_ids)
    if metric:
        missing = [m for m in metric if m not in result["metrics"]]
        if missing:
            raise InvalidParamsError(f"not a metric all these runs have: {', '.join(missing)}")
        result["metrics"] = {m: result["metrics"][m] for m in metric}
    if format == "json":
        _emit_json(result)
        return
    console.print(
        f"{result['analysis']} on {result['model']}: runs "
        + ", ".join(map(str, result["runs"]))
        + " (seeds "
        + ", ".join(map(str, result["seeds"]))
        + ")",
        highlight=False,
    )
    if result["differing_params"]:
        console.print(
            "params that differ: " + ", ".join(result["differing_params"]), highlight=False
        )
    table = _table("across runs", ("metric", "n", "mean +- sd", "min", "max"))
    for name, s in result["metrics"].items():
        table.add_row(
            name,
            str(s["n"]),
            f"{s['mean']:.4g} +- {s['sd']:.4g}",
            f"{s['min']:.4g}",
            f"{s['max']:.4g}",
        )
    console.print(table)


@runs_app.command("cancel")
def runs_cancel(
    run_id: int = RunIdArgument(),
    format: str = FormatOption(),
    db: str | None = DbOption(),
) -> None:
    """Ask a queued or running run to stop (at its next progress point)."""
    _check_format(format, ("table", "json"))
    status = kit.store(db, mode="write").request_cancel(run_id)
    if format == "json":
        _emit_json({"run_id": run_id, "status": status})
    else:
        console.print(f"run {run_id}: {status}")


FORCE_HELP = "Also remove queued and running runs (what they find is then not stored)."
DRY_RUN_HELP = "List what would be removed; remove nothing."


@runs_app.command("delete")
def runs_delete(
    run_ids: list[int] = typer.Argument(..., help="Run ids.", metavar="ID"),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    dry_run: bool = typer.Option(False, "--dry-run", help=DRY_RUN_HELP),
    format: str = FormatOption(),
    db: str | None = DbOption(),
) -> None:
    """Remove runs with their findings and artifact files (all of them or none)."""
    _check_format(format, ("table", "json"))
    store = kit.store(db, mode="write")
    _print_removals(store.delete_runs(run_ids, force, dry_run), dry_run, format)


@runs_app.command("prune")
def runs_prune(
    status: list[str] = typer.Option(
        [], "--status", help="Only runs with this status; repeatable."
    ),
    older_than: float | None = typer.Option(
        None, "--older-than", metavar="DAYS", help="Only runs created more than DAYS days ago."
    ),
    analysis: str | None = typer.Option(None, help="Only runs of this analysis."),
    model: str | None = typer.Option(None, help="Only runs on this model."),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    dry_run: bool = typer.Option(False, "--dry-run", help=DRY_RUN_HELP),
    format: str = FormatOption(),
    db: str | None = DbOption(),
) -> None:
    """Remove every run matching all the filters given, with its findings and files."""
    from datetime import UTC, datetime, timedelta

    from .core.runs import RUN_STATUSES

    _check_format(format, ("table", "json"))
    unknown = [s for s in status if s not in RUN_STATUSES]
    if unknown:
        raise InvalidParamsError(
            f"unknown status {unknown[0]!r}; choose from {', '.join(RUN_STATUSES)}"
        )
    if older_than is not None and older_than < 0:
        raise InvalidParamsError("--older-than cannot be negative")
    if not (status or older_than is not None or analysis or model):
        raise InvalidParamsError(
            "say which runs to prune: --status, --older-than, --analysis or --model"
        )
    before = datetime.now(UTC) - timedelta(days=older_than) if older_than is not None else None
    store = kit.store(db, mode="write")
    run_ids = store.run_ids(analysis, model, status, before)
    _print_removals(store.delete_runs(run_ids, force, dry_run), dry_run, format)


def _print_removals(removals, dry_run: bool, format: str) -> None:
    if format == "json":
        _emit_json({"dry_run": dry_run, "runs": [r.as_dict() for r in removals]})
        return
    verb = "would remove" if dry_run else "removed"
    for removal in removals:
        run = removal.run
        console.print(
            f"{verb} run {run.id}: {run.analysis} on {run.model}, {run.status}, "
            f"created {run.created_at:%Y-%m-%d %H:%M}",
            highlight=False,
            soft_wrap=True,
        )
        for path in removal.files:
            console.print(f"  {path}", highlight=False, soft_wrap=True)
        for path in removal.kept:
            console.print(
                f"  left in place (not in this database's folder): {path}",
                highlight=False,
                soft_wrap=True,
            )
    files = sum(len(r.files) for r in removals)
    runs = f"{len(removals)} run" + ("" if len(removals) == 1 else "s")
    console.print(f"{verb} {runs} and {files} files", highlight=False)


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
    figure.savefig(output, dpi=120, bbox_inches="tight")
    return chosen


@app.command("plot")
def plot_command(
    run_id: int = RunIdArgument(),
    output: Path = typer.Option(
        Path("headscope-heatmap.png"), "--output", "-o", help="Image to write (.png, .pdf or .svg)."
    ),
    metric: str | None = typer.Option(
        None, help="Head metric (default: the analysis's primary one)."
    ),
    format: str = FormatOption(),
    db: str | None = DbOption(),
) -> None:
    """Write a layer x head heatmap of one of a run's head metrics."""
    _check_format(format, ("table", "json"))
    output_file(output, "plot file", PLOT_SUFFIXES)
    chosen = _write_plot(kit.store(db, mode="read"), kit.registry(), run_id, metric, output)
    if format == "json":
        _emit_json({"run_id": run_id, "metric": chosen, "path": str(output)})
    else:
        console.print(f"wrote {output} ({chosen})")


# ----------------------------------------------------------------------------------
# findings across runs, one head across runs, waiting for a run
# ----------------------------------------------------------------------------------
findings_app = typer.Typer(help="Query findings across stored runs.", no_args_is_help=True)
app.add_typer(findings_app, name="findings")

WAIT_POLL_S = 0.5


def _options_error(error, renamed: dict[str, str]) -> InvalidParamsError:
    """A pydantic ValidationError of command options, naming each as its --option."""
    problems = []
    for item in error.errors():
        name = ".".join(map(str, item["loc"]))
        problems.append(f"{renamed.get(name, '--' + name.replace('_', '-'))}: {item['msg']}")
    return InvalidParamsError("; ".join(problems))


@findings_app.command("top")
def findings_top(
    metric: str | None = typer.Option(
        None, help="Head metric (default: the primary metric of --run's or --analysis's analysis)."
    ),
    run: int | None = typer.Option(None, help="Only this run (it must have succeeded)."),
    model: str | None = typer.Option(None, help="Only runs on this model."),
    analysis: str | None = typer.Option(None, help="Only runs of this analysis."),
    min_value: float | None = typer.Option(None, help="Only heads scoring at least this."),
    order: str = typer.Option("desc", help="desc (highest scores first) or asc."),
    limit: int = typer.Option(20, help="Heads per page (1-1000)."),
    offset: int = typer.Option(0, help="Heads to skip."),
    format: str = FormatOption(),
    db: str | None = DbOption(),
) -> None:
    """Top heads by a metric across succeeded runs (what findings.query answers)."""
    from pydantic import ValidationError

    from .core.runs import FindingsQuery, query_findings

    _check_format(format, ("table", "json"))
    try:
        query = FindingsQuery(
            metric=metric,
            run_id=run,
            model=model,
            analysis=analysis,
            min_value=min_value,
            order=order,
            limit=limit,
            offset=offset,
        )
    except ValidationError as error:
        raise _options_error(error, {"run_id": "--run"}) from None
    page = query_findings(kit.store(db, mode="read"), kit.registry(), query)
    if format == "json":
        _emit_json(page)
        return
    table = _table(f"heads by {page['metric']}", ("run", "analysis", "model", "layer", "head"))
    table.add_column(page["metric"], justify="right")
    for row in page["heads"]:
        table.add_row(
            str(row["run_id"]),
            row["analysis"],
            row["model"],
            str(row["layer"]),
            str(row["head"]),
            f"{row['value']:.4f}",
        )
    console.print(table)
    if page["next_offset"] is not None:
        console.print(f"next page: --offset {page['next_offset']}")


def _parse_head(text: str) -> tuple[int, int]:
    layer, dot, head = text.partition(".")
    if not (dot and layer.isdigit() and head.isdigit()):
        raise InvalidParamsError(f"head {text!r} is not LAYER.HEAD (e.g. 5.3)")
    return int(layer), int(head)


@runs_app.command("head")
def runs_head(
    head: str = typer.Argument(..., help="The head as LAYER.HEAD, e.g. 5.3."),
    model: str | None = typer.Option(None, help="Only runs on this model."),
    analysis: str | None = typer.Option(None, help="Only runs of this analysis."),
    format: str = FormatOption(),
    db: str | None = DbOption(),
) -> None:
    """One head across every succeeded run: each run's scores for it, newest run first."""
    from pydantic import ValidationError

    from .core.errors import validation_error
    from .core.runs import HeadQuery, head_across_runs

    _check_format(format, ("table", "json"))
    layer, index = _parse_head(head)
    try:
        query = HeadQuery(layer=layer, head=index, model=model, analysis=analysis)
    except ValidationError as error:
        raise validation_error(error, f"invalid head query {head!r}") from None
    found = head_across_runs(kit.store(db, mode="read"), kit.registry(), query)
    runs = {entry["run_id"]: entry for entry in found["runs"]}
    if format == "json":
        _emit_json(found)
        return
    if not runs:
        console.print(f"no succeeded run has scores for head {layer}.{index}", highlight=False)
        return
    table = _table(f"head {layer}.{index}", ("run", "analysis", "model", "metric"))
    table.add_column("value", justify="right")
    for entry in runs.values():
        scores = list(entry["scores"].items())
        for i, (name, value) in enumerate(scores):
            first = i == 0
            table.add_row(
                str(entry["run_id"]) if first else "",
                entry["analysis"] if first else "",
                entry["model"] if first else "",
                name,
                f"{value:.4f}",
                end_section=i == len(scores) - 1,
            )
    console.print(table)


@runs_app.command("wait")
def runs_wait(
    run_id: int = RunIdArgument(),
    timeout: float | None = typer.Option(
        None, help="Give up after this many seconds (default: as long as it takes)."
    ),
    format: str = FormatOption(),
    db: str | None = DbOption(),
) -> None:
    """Wait until a run has finished, showing its progress; exit 0 if it succeeded."""
    import time

    from .core.runs import FINISHED

    _check_format(format, ("table", "json"))
    if timeout is not None and timeout < 0:
        raise InvalidParamsError("--timeout cannot be negative")
    store = kit.store(db, mode="read")
    run = store.get_run(run_id)
    deadline = None if timeout is None else time.monotonic() + timeout
    stage = f"run {run_id} ({run.analysis})"
    with progress_bar(format != "json" and run.status not in FINISHED) as progress:
        while run.status not in FINISHED:
            progress(stage, run.progress_done or 0, run.progress_total)
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise HeadscopeError(f"run {run_id} is still {run.status} after {timeout:g} s")
            time.sleep(WAIT_POLL_S if left is None else min(WAIT_POLL_S, left))
            store.mark_interrupted(only_dead_owners=True)  # its process may have died
            run = store.get_run(run_id)
            if run.progress_total:  # a finished run shows its last progress too
                progress(stage, run.progress_done or 0, run.progress_total)
    if format == "json":
        _emit_json(run.as_dict())
    else:
        console.print(
            f"run {run_id}: [{_status_style(run.status)}]{run.status}[/]"
            + (f" ({run.error})" if run.error else ""),
            highlight=False,
        )
    if run.status != "succeeded":
        raise SystemExit(1)


# ----------------------------------------------------------------------------------
# db, plugins, analyses
# ----------------------------------------------------------------------------------
@db_app.command("path")
def db_path(format: str = FormatOption(), db: str | None = DbOption()) -> None:
    """Print the database URL (and file path for SQLite); creates nothing."""
    from .storage.db import database_path, database_url

    _check_format(format, ("table", "json"))
    url = database_url(db)
    path = database_path(url)
    exists = path.exists() if path else None
    if format == "json":
        _emit_json({"url": url, "path": str(path) if path else None, "exists": exists})
        return
    console.print(f"url:  {url}", highlight=False, soft_wrap=True)
    if path:
        missing = "" if exists else " (no database there yet)"
        console.print(f"path: {path}{missing}", highlight=False, soft_wrap=True)


@db_app.command("upgrade")
def db_upgrade(format: str = FormatOption(), db: str | None = DbOption()) -> None:
    """Apply schema migrations (also done automatically on first use)."""
    from .storage.db import database_url, open_database, upgrade

    _check_format(format, ("table", "json"))
    engine, _ = open_database(database_url(db), "create")
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
    console.print(f"[bold]{escape(cls.name)}[/] v{escape(cls.version)}: {escape(cls.summary)}")
    table = _table("params", ("name", "type", "allowed", "default", "description"))
    schema = description["params_schema"]
    required = set(schema.get("required", ()))
    for field_name, field in schema.get("properties", {}).items():
        if "default" in field:
            default = json.dumps(field["default"])
        elif field_name in required:
            default = "(required)"
        else:  # a default factory: show what it makes
            made = cls.Params.model_fields[field_name].get_default(call_default_factory=True)
            default = json.dumps(made, default=str)
        cells = (field_name, _schema_type(field), _schema_allowed(field), default)
        table.add_row(*map(escape, cells), escape(field.get("description", "")))
    console.print(table)


_BOUNDS = (
    ("minimum", ">="),
    ("exclusiveMinimum", ">"),
    ("maximum", "<="),
    ("exclusiveMaximum", "<"),
)


def _schema_type(schema: dict[str, Any]) -> str:
    """A JSON schema's type for people: `integer`, `list of [integer, integer] or null`."""
    if "anyOf" in schema:
        return " or ".join(_schema_type(option) for option in schema["anyOf"])
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[-1]
    kind = schema.get("type", "any")
    if kind == "array" and "prefixItems" in schema:
        return "[" + ", ".join(map(_schema_type, schema["prefixItems"])) + "]"
    if kind == "array":
        return f"list of {_schema_type(schema.get('items', {}))}"
    return kind


def _schema_allowed(schema: dict[str, Any]) -> str:
    """The values a JSON schema allows, for people: its choices or its numeric bounds."""
    if "anyOf" in schema:
        return "; ".join(filter(None, map(_schema_allowed, schema["anyOf"])))
    if "enum" in schema:
        return " | ".join(str(value) for value in schema["enum"])
    if "const" in schema:
        return str(schema["const"])
    return ", ".join(f"{sign} {schema[key]}" for key, sign in _BOUNDS if key in schema)


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
    seed: int = SeedOption("Seed for building examples."),
    device: str | None = DeviceOption(),
    dtype: str | None = DtypeOption(),
    format: str = FormatOption(),
) -> None:
    """Show a task's examples and the model's accuracy on them."""
    from .core.tasks import task_report

    _check_format(format, ("table", "json"))
    task = kit.registry().task(name)
    handle = kit.load_model(model, format != "json", device, dtype)
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
    device: str | None = DeviceOption(),
    dtype: str | None = DtypeOption(),
    device_map: str | None = DeviceMapOption(),
    format: str = FormatOption(),
) -> None:
    """Load a model and print its structure, device, dtype, size, memory and load time."""
    _check_format(format, ("table", "json"))
    handle = kit.load_model(name, format != "json", device, dtype, device_map)
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
        "device": "device",
        "devices": "devices",
        "dtype": "dtype",
        "memory_bytes": "weights memory",
        "source": "source",
        "cache_path": "cache path",
        "revision": "revision",
        "load_seconds": "load time (s)",
    }
    for key, label in labels.items():
        value = info[key]
        if key == "parameters":
            value = f"{value:,}"
        elif key == "memory_bytes":
            value = f"{value / 2**20:,.1f} MiB"
        elif key == "devices":
            value = ", ".join(value)
        table.add_row(label, str(value))
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
    max_queued: int = typer.Option(
        DEFAULT_MAX_QUEUED,
        help="Runs that may wait in the queue at once; beyond it runs.submit answers "
        "-32009 (queue full) and stores nothing.",
    ),
    no_workers: bool = typer.Option(
        False,
        "--no-workers",
        help="A front end only (PostgreSQL): load no model; `headscope worker` "
        "processes run what is submitted.",
    ),
    format: str = FormatOption(
        help="Announce the address and shutdown as a line on stderr (table) or a JSON "
        "line on stdout (json; on stderr with --stdio)."
    ),
    device: str | None = DeviceOption(),
    dtype: str | None = DtypeOption(),
    db: str | None = DbOption(),
) -> None:
    """Serve the JSON-RPC API (see docs/rpc.md) and, over HTTP, the web dashboard at /
    (docs/dashboard.md), until SIGTERM or Ctrl-C.

    With a PostgreSQL database, submitted runs go to the queue there: this process
    runs them too unless --no-workers is given (see docs/deployment.md)."""
    import logging

    from .core.rpc import serve

    _check_format(format, ("table", "json"))
    use_default_placement(device, dtype)
    if not 0 <= port <= 65535:
        raise InvalidParamsError(f"--port {port} is not a TCP port (0-65535)")
    if max_request_bytes < 1024:
        raise InvalidParamsError("--max-request-bytes must be at least 1024")
    if shutdown_timeout < 0:
        raise InvalidParamsError("--shutdown-timeout cannot be negative")
    if torch_threads is not None and torch_threads < 1:
        raise InvalidParamsError("--torch-threads must be at least 1")
    if max_queued < 1:
        raise InvalidParamsError("--max-queued must be at least 1")
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
            err_console.print(f"dashboard on {event['dashboard']}")
        elif event["event"] == "ready":
            err_console.print(f"headscope JSON-RPC on stdin/stdout (pid {event['pid']})")
        else:
            err_console.print("headscope JSON-RPC stopped")

    def open_service():
        from .core.rpc.service import Service
        from .storage.store import Store

        threads = torch_threads or serve.default_torch_threads()
        store = Store(db)
        queued = _queued_runs(store, max_queued, no_workers)
        pool = queued.pool if queued else None
        return Service.open(store, kit.registry(), threads, max_queued, queued, pool)

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
            _token_check(token),
        )


def _token_check(token: str | None):
    """The request check of `serve` and `mcp --http`: the server's own token, then the
    named tokens in the store (`headscope tokens`); a token is required once either
    exists."""

    def authenticate(service):
        from .core.rpc.auth import authenticator

        required = bool(token) or service.store.has_tokens()
        return authenticator(token, service.store.token_by_hash, required), required

    return authenticate


def _queued_runs(store, max_queued: int, no_workers: bool):
    """With PostgreSQL, runs go to the queue in the database (and, unless
    `no_workers`, a worker thread here takes them); with SQLite, None: this
    process's threads take them as they always did."""
    from .storage.runqueue.backend import QueuedRuns, is_queue_url

    if not is_queue_url(store.url):
        if no_workers:
            raise InvalidParamsError(
                "--no-workers needs a PostgreSQL database (--db postgresql+psycopg://...): "
                "with SQLite, runs are taken by this process"
            )
        return None
    from .core.models import ModelPool
    from .storage.runqueue.worker import QueueWorker

    registry = kit.registry()
    queued = QueuedRuns(
        store, registry, max_queued, None if no_workers else ModelPool(registry.models)
    )
    if not no_workers:
        queued.start_worker(QueueWorker(store, registry, pool=queued.pool))
    return queued


@app.command("mcp")
def mcp_command(
    http: bool = typer.Option(
        False, "--http", help="Serve MCP over streamable HTTP at /mcp instead of stdin/stdout."
    ),
    host: str = typer.Option(
        "127.0.0.1", help="With --http: address to listen on; beyond loopback a token is required."
    ),
    port: int = typer.Option(
        8766, help="With --http: TCP port (0: any free port; the address is printed)."
    ),
    token: str | None = typer.Option(
        None,
        "--token",
        envvar="HEADSCOPE_TOKEN",
        show_envvar=True,
        help="With --http: bearer token clients must send (Authorization: Bearer TOKEN).",
    ),
    shutdown_timeout: float = typer.Option(
        30.0, help="Seconds to wait for requests and running analyses on shutdown."
    ),
    torch_threads: int | None = typer.Option(
        None,
        help="CPU threads per running analysis (default: all cores but one, which is "
        "left to answer requests while analyses run).",
    ),
    format: str = FormatOption(
        help="Announce the address and shutdown as a line on stderr (table) or, with "
        "--http, a JSON line on stdout (json)."
    ),
    device: str | None = DeviceOption(),
    dtype: str | None = DtypeOption(),
    db: str | None = DbOption(),
) -> None:
    """Serve MCP for LLM agents (see docs/mcp.md): on stdin/stdout until end of input,
    or over HTTP with --http; until SIGTERM or Ctrl-C."""
    import logging

    from .core.rpc.serve import default_torch_threads

    _check_format(format, ("table", "json"))
    use_default_placement(device, dtype)
    if torch_threads is not None and torch_threads < 1:
        raise InvalidParamsError("--torch-threads must be at least 1")
    if not 0 <= port <= 65535:
        raise InvalidParamsError(f"--port {port} is not a TCP port (0-65535)")
    if shutdown_timeout < 0:
        raise InvalidParamsError("--shutdown-timeout cannot be negative")
    logging.basicConfig(
        level=logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("headscope").setLevel(logging.INFO)

    def announce(event: dict[str, Any]) -> None:
        if format == "json" and http:
            sys.stdout.write(json.dumps(event) + "\n")
            sys.stdout.flush()
        elif event["event"] == "listening":
            err_console.print(f"headscope MCP on {event['url']} (pid {event['pid']})")
        elif event["event"] == "ready":
            err_console.print(f"headscope MCP on stdin/stdout (pid {event['pid']})")
        else:
            err_console.print("headscope MCP stopped")

    def open_service():
        from .core.rpc.service import Service
        from .storage.store import Store

        return Service.open(Store(db), kit.registry(), torch_threads or default_torch_threads())

    if http:
        from .core.mcp.http import serve_http

        serve_http(
            open_service, announce, host, port, token or None, shutdown_timeout, _token_check(token)
        )
    else:
        from .core.mcp.server import serve_stdio

        serve_stdio(open_service, announce, shutdown_timeout)


# ----------------------------------------------------------------------------------
# the queue in PostgreSQL: workers, queued submission, API tokens
# ----------------------------------------------------------------------------------
@app.command("worker")
def worker_command(
    model: list[str] = typer.Option(
        [],
        "--model",
        "-m",
        help="A model this worker serves (repeatable; loaded at start and kept). "
        "Default: runs on any model, each loaded when first needed.",
    ),
    heartbeat: float = typer.Option(5.0, help="Seconds between this worker's heartbeats."),
    stalled_after: float = typer.Option(
        30.0,
        help="Seconds without a heartbeat after which a worker counts as dead and its "
        "run goes back to the queue.",
    ),
    max_attempts: int = typer.Option(
        3, help="Attempts at a run whose worker died, before the run is failed."
    ),
    torch_threads: int | None = typer.Option(
        None, help="CPU threads for the analyses (default: torch's own choice)."
    ),
    shutdown_timeout: float = typer.Option(
        600.0,
        help="On SIGTERM or Ctrl-C, seconds to let the run in flight finish; after "
        "that the worker exits and the run is retried by another worker.",
    ),
    device: str | None = DeviceOption(),
    dtype: str | None = DtypeOption(),
    db: str | None = DbOption(),
) -> None:
    """Take queued runs from a PostgreSQL database and run them, until SIGTERM or Ctrl-C."""
    import logging
    import os
    import signal
    import threading

    from .storage.db import database_url
    from .storage.runqueue.backend import connection_info
    from .storage.runqueue.worker import QueueWorker
    from .storage.store import Store

    use_default_placement(device, dtype)
    if max_attempts < 1:
        raise InvalidParamsError("--max-attempts must be at least 1")
    if heartbeat <= 0:
        raise InvalidParamsError("--heartbeat must be positive")
    if torch_threads is not None and torch_threads < 1:
        raise InvalidParamsError("--torch-threads must be at least 1")
    logging.basicConfig(
        level=logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("headscope").setLevel(logging.INFO)
    connection_info(database_url(db))  # a clear error for SQLite before anything opens
    store = Store(db, mode="write")
    worker = QueueWorker(
        store,
        kit.registry(),
        model,
        heartbeat=heartbeat,
        stalled_after=stalled_after,
        max_attempts=max_attempts,
    )
    if torch_threads:
        import torch

        torch.set_num_threads(torch_threads)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    worker.preload()
    served = ", ".join(worker.models) or "any model"
    err_console.print(
        f"headscope worker {worker.name} taking runs for {served} (pid {os.getpid()})"
    )
    thread = threading.Thread(target=worker.serve, args=(stop,), name="queue-worker", daemon=True)
    thread.start()
    while thread.is_alive() and not stop.wait(0.5):
        pass
    thread.join(shutdown_timeout)
    if thread.is_alive():
        err_console.print("headscope worker: a run was still going; another worker retries it")
        os._exit(1)  # the run's thread cannot be stopped; its job is retried elsewhere
    err_console.print("headscope worker stopped")


@runs_app.command("submit")
def runs_submit(
    analysis: str = typer.Argument(..., help="Analysis name (see `headscope analyses list`)."),
    model: str = ModelOption(),
    params_file: Path | None = typer.Option(None, "--params", help="JSON file of parameters."),
    param: list[str] = typer.Option(
        [], "--param", "-p", help="key=value (JSON values allowed); repeatable."
    ),
    seed: int = SeedOption("Seed for every random choice in the run."),
    format: str = FormatOption(),
    db: str | None = DbOption(),
) -> None:
    """Queue a run in a PostgreSQL database for `headscope worker` processes; prints its id.

    Follow it with `headscope runs wait ID`. With SQLite, use `headscope run`."""
    from .core import jobs
    from .core.analysis import FindingsReader
    from .storage.runqueue.backend import connection_info, enqueue, sync_app

    _check_format(format, ("table", "json"))
    registry = kit.registry()
    prepared = jobs.prepare(registry, analysis, model, kit.parse_params(param, params_file), seed)
    store = kit.store(db)
    connection_info(store.url)  # SQLite has no queue: say so before storing anything
    jobs.check_runs(prepared, FindingsReader(store, registry))
    queue_app = sync_app(store.url)
    try:
        run_id = jobs.record(store, prepared)
        enqueue(queue_app, store, run_id, prepared.model_name)
    finally:
        queue_app.close()
    if format == "json":
        _emit_json({"run_id": run_id, "status": "queued"})
    else:
        console.print(f"run {run_id}: queued")


tokens_app = typer.Typer(
    help="Named API tokens for `headscope serve`, with scopes.", no_args_is_help=True
)
app.add_typer(tokens_app, name="tokens")


@tokens_app.command("create")
def tokens_create(
    name: str = typer.Argument(..., help="A name for the token (runs record it)."),
    scope: list[str] = typer.Option(
        ["read"],
        "--scope",
        "-s",
        help="read (query), submit (also run and cancel) or admin (also load and "
        "unload models); repeatable.",
    ),
    format: str = FormatOption(),
    db: str | None = DbOption(),
) -> None:
    """Make a token; it is printed once, and only its hash is stored."""
    from .core.rpc.auth import check_scopes, new_token, token_hash
    from .core.runs import MAX_NAME_LENGTH

    _check_format(format, ("table", "json"))
    if not name.strip() or len(name) > MAX_NAME_LENGTH:
        raise InvalidParamsError(f"a token name needs 1 to {MAX_NAME_LENGTH} characters")
    scopes = check_scopes(scope)
    token = new_token()
    kit.store(db).create_token(name, token_hash(token), scopes)
    if format == "json":
        _emit_json({"name": name, "scopes": scopes, "token": token})
    else:
        err_console.print(f"token {name!r} ({', '.join(scopes)}); shown only now:")
        console.print(token)


@tokens_app.command("list")
def tokens_list(format: str = FormatOption(), db: str | None = DbOption()) -> None:
    """Every token's name, scopes and dates (never the tokens themselves)."""
    _check_format(format, ("table", "json"))
    rows = kit.store(db, mode="read").tokens()
    if format == "json":
        when = ("created_at", "revoked_at")
        _emit_json([{**row, **{k: row[k] and row[k].isoformat() for k in when}} for row in rows])
        return
    table = _table("API tokens", ("name", "scopes", "created", "revoked"))
    for row in rows:
        revoked = row["revoked_at"].isoformat(timespec="seconds") if row["revoked_at"] else ""
        created = row["created_at"].isoformat(timespec="seconds")
        table.add_row(row["name"], ", ".join(row["scopes"]), created, revoked)
    console.print(table)


@tokens_app.command("revoke")
def tokens_revoke(
    name: str = typer.Argument(..., help="The token's name."), db: str | None = DbOption()
) -> None:
    """Revoke a token: servers refuse it from the next request on."""
    kit.store(db, mode="write").revoke_token(name)
    console.print(f"token {name!r} revoked")


def main() -> None:
    """Entry point: user errors print one line and exit 1, never a traceback."""
    try:
        kit.reset()
        build_app(kit)()
    except HeadscopeError as error:
        err_console.print(
            f"[bold red]Error:[/] {escape(str(error))}", highlight=False, soft_wrap=True
        )
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        err_console.print("Interrupted.")
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
