"""Headless Chromium (Debian's `chromium` and `chromium-driver`), driven by selenium.

`make test` installs the browser when it runs as root (as in CI). Without one, the
browser tests skip with the reason, except under CI=true, where they fail: CI must
test the dashboard in a real browser (as for PostgreSQL, `helpers.postgres`).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from helpers.postgres import unavailable

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
DRIVERS = ("chromedriver",)


def _find(names: tuple[str, ...]) -> str | None:
    return next((path for name in names if (path := shutil.which(name))), None)


def missing() -> str | None:
    """Why no browser can be driven here, or None."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    if _find(BROWSERS) is None or _find(DRIVERS) is None:
        return (
            "headless Chromium is not installed "
            "(apt-get install chromium chromium-driver; `make test` does this as root)"
        )
    return None


@contextmanager
def chromium(width: int = 1400, height: int = 1000) -> Iterator[Any]:
    """A headless Chromium selenium driver; skips (fails under CI=true) without one."""
    reason = missing()
    if reason:
        unavailable(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = _find(BROWSERS)
    for argument in (
        "--headless=new",
        "--no-sandbox",  # root in containers has no user namespace for the sandbox
        "--disable-dev-shm-usage",
        "--disable-gpu",
        f"--window-size={width},{height}",
        "--hide-scrollbars",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=_find(DRIVERS)))
    try:
        yield driver
    finally:
        driver.quit()
