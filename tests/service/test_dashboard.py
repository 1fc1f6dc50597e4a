"""The web dashboard of `headscope serve`, in headless Chromium against a real server.

Runs are written straight into the store (known scores, no model), then the
server opens it: the tests click through the pages as a user would.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from headscope.core.rpc.dashboard import FILES, PLOTLY_PATH
from headscope.storage.store import Store

from helpers.browser import chromium, point_at_head, wait_for
from helpers.rpc import Server

TOKEN = "dashboard-secret"
MODEL = {"name": "tiny-llama", "revision": "r1", "layers": 3, "query_heads": 4}
LAYERS, HEADS = 3, 4
#: the head the tests click, with scores no other head has
CLICKED = (1, 2)
INDUCTION, PREVIOUS = 0.9125, 0.0375


def detector_scores(shift: float) -> list[tuple[int, int, str, float]]:
    scores = []
    for layer in range(LAYERS):
        for head in range(HEADS):
            clicked = (layer, head) == CLICKED
            induction = INDUCTION if clicked else 0.1 + 0.01 * (layer * HEADS + head) + shift
            previous = PREVIOUS if clicked else 0.5 - 0.01 * head
            scores += [
                (layer, head, "induction", induction),
                (layer, head, "previous_token", previous),
            ]
    return scores


def write_runs(store: Store) -> dict[str, int]:
    """Two succeeded head-detector runs, a retrieval-heads run, and one still running."""
    model_id = store.ensure_model(MODEL)
    ids = {}
    for name, shift in (("first", 0.0), ("second", 0.05)):
        run_id = store.create_run("head-detector", "1", "tiny-llama", {"n_random": 2}, seed=0)
        store.mark_running(run_id, model_id, "r1")
        store.finish_run(run_id, detector_scores(shift), {"n_prompts": 3.0})
        ids[name] = run_id
    run_id = store.create_run("retrieval-heads", "1", "tiny-llama", {"lengths": [64]}, seed=0)
    store.mark_running(run_id, model_id, "r1")
    retrieval = [
        (layer, head, "retrieval_score", 0.25) for layer in range(LAYERS) for head in range(HEADS)
    ]
    store.finish_run(run_id, retrieval, {"accuracy": 0.5})
    ids["retrieval"] = run_id
    run_id = store.create_run("head-detector", "1", "tiny-llama", {"n_random": 9}, seed=1)
    store.mark_running(run_id, model_id, "r1")  # owned by this (live) process: not recovered
    store.update_progress(run_id, 1, 4, "prompt 1 of 4")
    ids["running"] = run_id
    return ids


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    db = tmp_path_factory.mktemp("dashboard") / "dashboard.db"
    store = Store(str(db))
    ids = write_runs(store)
    server = Server(db, env={"HEADSCOPE_TOKEN": TOKEN, "HEADSCOPE_LOAD_PLUGINS": ""})
    yield server, store, ids
    server.stop()


@pytest.fixture(scope="module")
def browser(served):
    server, _, _ = served
    with chromium() as driver:
        driver.get(server.listening["dashboard"])
        enter_token(driver, TOKEN)
        yield driver


def enter_token(driver, token: str) -> None:
    from selenium.webdriver.common.by import By

    field = driver.find_element(By.ID, "token")
    field.clear()
    field.send_keys(token)
    driver.find_element(By.CSS_SELECTOR, "#token-form button").click()


def runs_shown(driver, timeout: float = 30) -> list[int]:
    """The run ids the runs table shows, once it has been redrawn for new filters."""
    from selenium.webdriver.support.ui import WebDriverWait

    script = (
        "const t = document.getElementById('runs-table');"
        "return t && t.dataset.filters === location.hash"
        "  ? [...t.querySelectorAll('tbody tr')].map(r => r.dataset.run) : null;"
    )
    shown = WebDriverWait(driver, timeout).until(lambda d: d.execute_script(script))
    return [int(run_id) for run_id in shown]


def visit(driver, base: str, route: str) -> None:
    driver.get(f"{base}#{route}")


# ----------------------------------------------------------------------------------
# the files, over plain HTTP
# ----------------------------------------------------------------------------------
def test_the_files_are_served_without_a_token_and_carry_no_data(served):
    server, _, _ = served
    base = server.listening["dashboard"]
    assert base == server.url.removesuffix("rpc")
    for path in (*FILES, PLOTLY_PATH):
        response = httpx.get(base.rstrip("/") + path, timeout=30)
        assert response.status_code == 200, path
        assert "script-src 'self'" in response.headers["content-security-policy"]
        assert response.headers["x-content-type-options"] == "nosniff"
        assert "tiny-llama" not in response.text and "head-detector" not in response.text
    plotly = httpx.get(base.rstrip("/") + PLOTLY_PATH, timeout=30)
    assert plotly.headers["content-type"].startswith("text/javascript")
    assert len(plotly.content) > 1_000_000 and "plotly.js" in plotly.text[:2000]
    assert httpx.get(base + "static/nope.js", timeout=30).status_code == 404
    assert httpx.get(base + "static/../pyproject.toml", timeout=30).status_code == 404
    refused = httpx.post(server.url, json={"jsonrpc": "2.0", "method": "runs.list", "id": 1})
    assert refused.status_code == 401  # the data needs the token


def test_findings_head_answers_every_run_of_the_head(served):
    server, _, ids = served
    client = server.client(TOKEN)
    found = client.call("findings.head", layer=1, head=2, model="tiny-llama")
    assert [r["run_id"] for r in found["runs"]] == [ids["retrieval"], ids["second"], ids["first"]]
    assert found["runs"][1] == {
        "run_id": ids["second"],
        "analysis": "head-detector",
        "model": "tiny-llama",
        "primary_metric": "induction",
        "scores": {"induction": INDUCTION, "previous_token": PREVIOUS},
        "rank": 1,
        "heads": LAYERS * HEADS,
    }
    assert found["runs"][0]["rank"] == 1  # every retrieval score ties
    only = client.call("findings.head", layer=1, head=2, analysis="retrieval-heads")
    assert [r["run_id"] for r in only["runs"]] == [ids["retrieval"]]
    assert client.call("findings.head", layer=99, head=0)["runs"] == []


# ----------------------------------------------------------------------------------
# in the browser
# ----------------------------------------------------------------------------------
def test_runs_list_filters_and_shows_live_progress(served, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    server, store, ids = served
    base = server.listening["dashboard"]
    visit(browser, base, "/runs")
    table = wait_for(browser, "#runs-table", "prompt 1 of 4")
    assert all(f"#{run_id}" in table for run_id in ids.values())
    assert "25%" in table

    store.update_progress(ids["running"], 3, 4, "prompt 3 of 4")  # the page polls
    wait_for(browser, "#runs-table", "prompt 3 of 4")

    Select(browser.find_element(By.ID, "filter-analysis")).select_by_visible_text("retrieval-heads")
    assert runs_shown(browser) == [ids["retrieval"]]
    assert "analysis=retrieval-heads" in browser.current_url

    Select(browser.find_element(By.ID, "filter-analysis")).select_by_index(0)
    assert sorted(runs_shown(browser)) == sorted(ids.values())  # the page is redrawn
    Select(browser.find_element(By.ID, "filter-status")).select_by_visible_text("running")
    assert runs_shown(browser) == [ids["running"]]
    assert "status=running" in browser.current_url and "analysis" not in browser.current_url


def test_click_a_head_in_the_heatmap_opens_its_page(served, browser, tmp_path):
    from selenium.webdriver.common.by import By

    server, _, ids = served
    base = server.listening["dashboard"]
    visit(browser, base, f"/run/{ids['second']}")
    wait_for(browser, "#heatmap .nsewdrag")
    assert "induction" in browser.find_element(By.ID, "metric").get_attribute("value")
    assert "n_prompts" in wait_for(browser, "#metrics")
    assert '"n_random": 2' in browser.find_element(By.ID, "params").text
    top = browser.find_element(By.ID, "top-heads").text
    assert top.splitlines()[1].startswith("1.2")  # the best head first

    layer, head = CLICKED
    point_at_head(browser, "heatmap", layer, head)
    hover = wait_for(browser, "#heatmap .hoverlayer", "induction")
    assert "layer 1, head 2" in hover and f"{INDUCTION:.4f}" in hover
    point_at_head(browser, "heatmap", layer, head, click=True)

    title = wait_for(browser, "h1", "Head 1.2 on tiny-llama")
    assert browser.current_url.endswith("#/head/tiny-llama/1/2")
    cards = wait_for(browser, "#head-runs")
    assert f"{INDUCTION:.4f}" in cards and f"{PREVIOUS:.4f}" in cards and "0.2500" in cards
    for name in ("first", "second", "retrieval"):
        assert f"#{ids[name]}" in cards
    assert f"#{ids['running']}" not in cards  # unfinished runs have no findings
    assert f"rank 1 of {LAYERS * HEADS} by induction" in cards
    assert title == "Head 1.2 on tiny-llama"

    shot = tmp_path / "head.png"
    browser.save_screenshot(str(shot))
    assert distinct_colours(shot) > 5  # the page was drawn, not a blank frame


def test_two_runs_side_by_side_with_their_overlap(served, browser):
    from selenium.webdriver.common.by import By

    server, _, ids = served
    base = server.listening["dashboard"]
    visit(browser, base, f"/compare?a={ids['first']}&b={ids['second']}&top_k=3")
    wait_for(browser, "#overlap")
    overlap = browser.find_element(By.ID, "overlap")
    wait_for(browser, "#heatmap-a .nsewdrag")
    wait_for(browser, "#heatmap-b .nsewdrag")
    client = server.client(TOKEN)
    expected = client.call("runs.compare", run_a=ids["first"], run_b=ids["second"], top_k=3)
    cells = [c.text for c in overlap.find_elements(By.CSS_SELECTOR, "tbody td")]
    assert cells[:4] == [str(expected[k]) for k in ("size_a", "size_b", "intersection", "union")]
    shared = browser.find_element(By.XPATH, "//p[starts-with(., 'Shared heads')]").text
    assert "1.2" in shared


def test_without_the_token_the_page_says_what_is_missing(served):
    server, _, _ = served
    with chromium() as driver:
        driver.get(server.listening["dashboard"] + "#/runs")
        wait_for(driver, "#notice", "bearer token")
        assert driver.find_element("id", "notice").is_displayed()
        enter_token(driver, "wrong")
        wait_for(driver, "#notice", "bearer token")
        enter_token(driver, TOKEN)
        wait_for(driver, "#runs-table")
        assert not driver.find_element("id", "notice").is_displayed()


def distinct_colours(png: Path) -> int:
    """How many different pixel colours a screenshot has (a blank one has one)."""
    from PIL import Image

    with Image.open(png) as image:
        return len(image.convert("RGB").getcolors(maxcolors=1 << 24))


def test_serve_prints_the_dashboard_address(tmp_path):
    command = [sys.executable, "-m", "headscope.cli", "serve", "--port", "0"]
    env = {**os.environ, "HEADSCOPE_LOAD_PLUGINS": ""}
    env.pop("HEADSCOPE_TOKEN", None)
    process = subprocess.Popen(
        [*command, "--db", str(tmp_path / "x.db")], stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        lines = []
        for line in process.stderr:
            lines.append(line)
            if line.startswith("dashboard on"):
                break
        rpc_line = next(line for line in lines if line.startswith("headscope JSON-RPC on"))
        rpc_url = rpc_line.split()[3]
        dashboard = lines[-1].split()[2]
        assert dashboard == rpc_url.removesuffix("rpc") and dashboard.endswith("/")
        assert "<title>headscope</title>" in httpx.get(dashboard, timeout=30).text
    finally:
        process.terminate()
        process.communicate(timeout=60)
