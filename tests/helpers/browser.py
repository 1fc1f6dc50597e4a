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


def wait_for(driver, css: str, text: str | None = None, timeout: float = 30) -> str:
    """The text of the first element matching `css` (containing `text`), once the
    page shows one; pages that poll redraw their elements, so the text is read at once."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def found(d):
        for element in d.find_elements(By.CSS_SELECTOR, css):
            try:
                shown = element.text
            except StaleElementReferenceException:
                continue
            if text is None or text in shown:
                return shown or " "
        return False

    return WebDriverWait(driver, timeout).until(found, f"no {css!r} with {text!r}")


def point_at_head(driver, plot_id: str, layer: int, head: int, click: bool = False) -> None:
    """Move the mouse over one head's cell of a dashboard heatmap (and click it),
    found from the plot's own axes; the page is scrolled to bring the cell into view."""
    from selenium.webdriver.common.actions.action_builder import ActionBuilder
    from selenium.webdriver.common.by import By

    x, y = driver.execute_script(
        "const [plot, layer, head] = arguments;"
        "const axes = plot._fullLayout;"
        "const top = plot.getBoundingClientRect().top + window.scrollY;"
        "const y = top + axes.yaxis.l2p(layer) + axes.yaxis._offset;"
        "window.scrollTo(0, Math.max(0, y - window.innerHeight / 2));"
        "const frame = plot.getBoundingClientRect();"
        "return [frame.left + axes.xaxis.l2p(head) + axes.xaxis._offset,"
        "        frame.top + axes.yaxis.l2p(layer) + axes.yaxis._offset];",
        driver.find_element(By.ID, plot_id),
        layer,
        head,
    )
    actions = ActionBuilder(driver)
    actions.pointer_action.move_to_location(int(x), int(y))
    if click:
        actions.pointer_action.click()
    actions.perform()
