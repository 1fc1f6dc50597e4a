"""The web dashboard's files: one page, its script and style, and plotly.js.

The files carry no data: the page asks for the bearer token and calls the
JSON-RPC methods (read methods only) from the browser, so the dashboard sees
exactly what any client sees. plotly.js is served from the installed `plotly`
package (its bundled `plotly.min.js`), found without importing the package.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import cache
from pathlib import Path

STATIC = Path(__file__).with_name("static")
#: URL path -> (file in STATIC, media type)
FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/style.css": ("style.css", "text/css; charset=utf-8"),
}
PLOTLY_PATH = "/static/plotly.min.js"
HEADERS = {
    # scripts only from this server; plotly sets inline styles and draws data: images
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@dataclass(frozen=True)
class Asset:
    data: bytes
    media_type: str


def asset(path: str) -> Asset | None:
    """The file served at `path`, or None when the dashboard has none there."""
    if path == PLOTLY_PATH:
        return Asset(_plotly(), "text/javascript; charset=utf-8")
    entry = FILES.get(path)
    if entry is None:
        return None
    name, media_type = entry
    return Asset(_read(STATIC / name), media_type)


@cache
def _read(path: Path) -> bytes:
    return path.read_bytes()


@cache
def _plotly() -> bytes:
    spec = importlib.util.find_spec("plotly")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        bundle = Path(location) / "package_data" / "plotly.min.js"
        if bundle.is_file():
            return bundle.read_bytes()
    message = "// plotly.js is missing: install the plotly package (pip install plotly)\n"
    return f'console.error("headscope: plotly.js is missing");\n{message}'.encode()
