"""Where headscope keeps files: model caches and the findings database.

Defaults follow the platform's conventions (platformdirs); `HEADSCOPE_CACHE_DIR`
and `HEADSCOPE_DATA_DIR` override them, which tests and shared set-ups use.
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

APP_NAME = "headscope"


def cache_dir() -> Path:
    """Root of derived, re-creatable files (converted model weights)."""
    override = os.environ.get("HEADSCOPE_CACHE_DIR")
    path = Path(override) if override else Path(platformdirs.user_cache_dir(APP_NAME))
    path.mkdir(parents=True, exist_ok=True)
    return path


def models_cache_dir() -> Path:
    path = cache_dir() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def data_dir() -> Path:
    """Root of files the user would miss if deleted (the findings database)."""
    override = os.environ.get("HEADSCOPE_DATA_DIR")
    path = Path(override) if override else Path(platformdirs.user_data_dir(APP_NAME))
    path.mkdir(parents=True, exist_ok=True)
    return path
