"""Make the dashboard screenshots in docs/images/ (`make screenshots`).

Runs head-detector and context-heads with default params on a model (default
smollm2-135m: about two minutes on a 2-core CPU) into a scratch database, serves
it with `headscope serve`, and photographs the pages in headless Chromium
(Debian's `chromium` and `chromium-driver`): the runs list, a run's heatmap with
the mouse over its top head, that head's page, and the two runs compared. The
server and the browser are driven by the test suite's helpers (tests/helpers).

    .venv/bin/python docs/screenshots.py
    .venv/bin/python docs/screenshots.py --model tiny-llama --out /tmp/shots   # seconds
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from helpers import browser  # noqa: E402
from helpers.rpc import Server  # noqa: E402

ANALYSES = ("head-detector", "context-heads")


def run(analysis: str, model: str, db: Path) -> None:
    print(f"running {analysis} on {model} ...", flush=True)
    command = [sys.executable, "-m", "headscope.cli", "run", analysis, "--model", model]
    subprocess.run(
        [*command, "--db", str(db), "--format", "json"], check=True, stdout=subprocess.DEVNULL
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    args = parser.parse_args()
    reason = browser.missing()
    if reason:
        raise SystemExit(f"cannot take screenshots: {reason}")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="headscope-shots-") as scratch:
        db = Path(scratch) / "findings.db"
        for analysis in ANALYSES:
            run(analysis, args.model, db)
        server = Server(db)
        try:
            shoot(server, args.out)
        finally:
            server.stop()


def shoot(server: Server, out: Path) -> None:
    base = server.listening["dashboard"]
    client = server.client()
    runs = {run["analysis"]: run["id"] for run in client.call("runs.list")["runs"]}
    detector = runs["head-detector"]
    (top,) = client.call("findings.query", run_id=detector, limit=1)["heads"]
    layer, head, model = top["layer"], top["head"], top["model"]

    with browser.chromium() as driver:

        def show(route: str, height: int) -> None:
            driver.set_window_size(1400, height)
            driver.get(f"{base}#{route}")

        def save(name: str) -> None:
            driver.save_screenshot(str(out / name))
            print(f"wrote {out / name}")

        show("/runs", 700)
        browser.wait_for(driver, "#runs-table", "succeeded")
        save("dashboard-runs.png")

        show(f"/run/{detector}", 1100)
        browser.wait_for(driver, "#heatmap .nsewdrag")
        browser.point_at_head(driver, "heatmap", layer, head)
        browser.wait_for(driver, "#heatmap .hoverlayer", f"layer {layer}, head {head}")
        save("dashboard-run.png")

        show(f"/head/{model}/{layer}/{head}", 700)
        browser.wait_for(driver, "#head-runs")
        save("dashboard-head.png")

        show(f"/compare?a={detector}&b={runs['context-heads']}", 1400)
        browser.wait_for(driver, "#heatmap-b .nsewdrag")
        save("dashboard-compare.png")


if __name__ == "__main__":
    main()
