"""Run the headscope CLI in-process or as a subprocess, capturing its output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from unittest.mock import patch


@dataclass
class CliResult:
    code: int
    out: str
    err: str

    def json(self):
        return json.loads(self.out)


def run_cli(capsys, *args: str) -> CliResult:
    """Invoke the real entry point (`main`) in this process."""
    from headscope.cli import main

    with patch.object(sys, "argv", ["headscope", *map(str, args)]):
        try:
            main()
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    out, err = capsys.readouterr()
    return CliResult(code, out, err)


def run_cli_process(*args: str, env: dict | None = None, timeout: float = 300) -> CliResult:
    """Invoke `python -m headscope.cli` as a separate process."""
    full_env = {**os.environ, **(env or {})}
    done = subprocess.run(
        [sys.executable, "-m", "headscope.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
    )
    return CliResult(done.returncode, done.stdout, done.stderr)
