"""Make a file or folder read-only for this process, as a read-only mount would.

Root ignores file permissions, so for root the path is bind-mounted read-only over
itself (Linux); a test that can do neither is skipped.
"""

from __future__ import annotations

import gc
import os
import stat
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def read_only(path: Path) -> Iterator[Path]:
    # close what earlier in-process commands left open on the file: SQLite would keep
    # read-only connections' files open beside them (a separate process would not)
    gc.collect()
    if os.geteuid() != 0:
        with _without_write_permission(path):
            yield path
        return
    mounted = subprocess.run(["mount", "--bind", path, path], capture_output=True)
    if mounted.returncode == 0:
        mounted = subprocess.run(["mount", "-o", "remount,bind,ro", path], capture_output=True)
        if mounted.returncode != 0:
            subprocess.run(["umount", path], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot make {path} read-only as root: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=True)


@contextmanager
def _without_write_permission(path: Path) -> Iterator[None]:
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    modes = {p: p.stat().st_mode for p in paths}
    for p, mode in modes.items():
        p.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        yield
    finally:
        for p, mode in reversed(modes.items()):
            p.chmod(mode)
