"""Task files for tests: rows of (prompt, answer, distractor, corrupted) as JSONL."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path


def write_task_file(path: Path, rows: Iterable[tuple[str, str, str, str]]) -> Path:
    lines = [
        json.dumps({"prompt": p, "answer": a, "distractor": d, "corrupted": c})
        for p, a, d, c in rows
    ]
    path.write_text("\n".join(lines) + "\n")
    return path
