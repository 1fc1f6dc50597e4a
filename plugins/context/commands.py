"""The `steer` command: baseline and steered continuations of a prompt, side by side.

The context is marked with options (`--context`, `--span`, `--token-span`,
`--positions`); everything else is a `-p key=value` of `SteeringRequest`, checked
by that model exactly as `run` checks an analysis's params.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from headscope.core.errors import InvalidParamsError
from headscope.core.spans import parse_range

from .steering import SteeringRequest, steer


def steer_help() -> str:
    """The command's help, listing every setting from `SteeringRequest` itself."""
    settings = []
    for name, field in SteeringRequest.model_fields.items():
        if name in ("prompt", "spans"):
            continue
        value = field.default
        shown = value if isinstance(value, str) else json.dumps(value)
        default = "" if value is None else f" ({shown})"
        settings.append(f"{name}{default}")
    return (
        "Generate with and without attention steering towards a marked context.\n\n"
        "Mark the context with --context, --span, --token-span or --positions. Steering "
        "settings are -p key=value (JSON values allowed; `headscope steer` checks them "
        "as `run` checks params): " + ", ".join(settings) + ". Heads are all (the layer "
        "range), LAYER.HEAD,LAYER.HEAD, or the top heads of from_run."
    )


def marked_spans(
    context: list[str], span: list[str], token_span: list[str], positions: str | None
) -> list[dict[str, Any]]:
    """The span options as `SpanSpec` values."""
    spans: list[dict[str, Any]] = [{"text": text} for text in context]
    spans += [{"chars": parse_range(value, "--span")} for value in span]
    spans += [{"tokens": parse_range(value, "--token-span")} for value in token_span]
    if positions:
        try:
            spans.append({"positions": [int(p) for p in positions.split(",")]})
        except ValueError:
            raise InvalidParamsError(
                f"--positions {positions!r}: comma-separated integers"
            ) from None
    if not spans:
        raise InvalidParamsError("mark the context: --context, --span, --token-span or --positions")
    return spans


def add_steer_command(app: typer.Typer, kit: Any) -> None:
    @app.command("steer", help=escape(steer_help()))
    def steer_command(
        prompt: str | None = typer.Argument(None, help="Prompt text (or --prompt-file)."),
        prompt_file: Path | None = typer.Option(
            None, "--prompt-file", help="Read the prompt here."
        ),
        context: list[str] = typer.Option(
            [], "--context", "-c", help="Mark this text of the prompt as context; repeatable."
        ),
        span: list[str] = typer.Option(
            [], "--span", help="Mark characters START:END as context; repeatable."
        ),
        token_span: list[str] = typer.Option(
            [], "--token-span", help="Mark token positions START:END as context; repeatable."
        ),
        positions: str | None = typer.Option(
            None, "--positions", help="Mark these token positions (comma-separated)."
        ),
        param: list[str] = typer.Option(
            [], "--param", "-p", help="A steering setting key=value (see above); repeatable."
        ),
        model: str = kit.model_option(),
        device: str | None = kit.device_option(),
        dtype: str | None = kit.dtype_option(),
        format: str = kit.format_option(),
        db: str | None = kit.db_option(),
    ) -> None:
        kit.check_format(format, ("table", "json"))
        if (prompt is None) == (prompt_file is None):
            raise InvalidParamsError("give the prompt as an argument or with --prompt-file")
        if prompt_file is not None:
            try:
                prompt = prompt_file.read_text()
            except OSError as error:
                raise InvalidParamsError(
                    f"cannot read prompt file {prompt_file}: {error}"
                ) from None
        spans = marked_spans(context, span, token_span, positions)
        settings = kit.parse_params(param)
        request = SteeringRequest.parse({**settings, "prompt": prompt, "spans": spans})
        findings = kit.findings(db) if request.from_run is not None else None
        handle = kit.load_model(model, format != "json", device, dtype)
        result = steer(handle, request, findings)
        if format == "json":
            kit.emit_json(result.as_dict())
            return
        setting = result.modulation
        strength = (
            f"alpha {setting['alpha']}"
            if setting["form"] == "paint"
            else f"coefficient {setting['pasta_coefficient']}"
        )
        kit.console.print(
            f"context: {len(result.context_positions)} tokens; {setting['form']} {strength} on "
            f"{len(setting['heads'])} heads"
            + (f", sink beta {setting['sink_beta']}" if setting["sink_beta"] else ""),
            highlight=False,
        )
        table = Table(show_lines=True)
        table.add_column("baseline", overflow="fold")
        table.add_column("steered", overflow="fold")
        table.add_row(result.baseline, result.steered)
        kit.console.print(table)
