"""JSONL input files (tasks, datasets, needles) with errors that name the line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from .errors import InvalidParamsError


def read_jsonl(
    path: str | Path, what: str, error: type[Exception] = InvalidParamsError
) -> Iterator[tuple[str, dict]]:
    """Yield `(where, row)` per non-blank line, `where` being "PATH line N".

    `what` names the file in errors ("task file", "dataset"); every error is raised as
    `error`, so callers keep their own exception type and add field checks on `row`.
    """
    path = Path(path).expanduser()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise error(f"{what} not found: {path}") from None
    except (OSError, UnicodeDecodeError) as reason:
        raise error(f"cannot read {what} {path}: {reason}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as reason:
            raise error(f"{where}: not valid JSON ({reason.msg})") from None
        if not isinstance(row, dict):
            raise error(f"{where}: expected a JSON object")
        yield where, row
