"""A second process writing runs into a store while the test process writes too.

`python -m helpers.store_writer URL WRITER RUNS` opens the store, prints "ready",
waits for a line on stdin (so that both writers start together), then writes RUNS
finished runs whose findings `expected_scores` predicts.
"""

from __future__ import annotations

import sys

from headscope.storage.store import Store

MODEL = {"name": "shared-model", "revision": "r1", "layers": 2, "query_heads": 3}


def expected_scores(writer: int, n: int) -> list[tuple[int, int, str, float]]:
    return [(layer, head, "s", writer + n / 100) for layer in range(2) for head in range(3)]


def write_runs(store: Store, writer: int, runs: int) -> None:
    for n in range(runs):
        model_id = store.ensure_model(MODEL)
        run_id = store.create_run("a", "1", MODEL["name"], {"writer": writer, "n": n}, seed=n)
        store.mark_running(run_id, model_id, MODEL["revision"])
        store.update_progress(run_id, 1, 2, f"writer {writer}")
        store.finish_run(run_id, expected_scores(writer, n), {"writer": float(writer)})


def main(url: str, writer: int, runs: int) -> None:
    store = Store(url)
    print("ready", flush=True)
    sys.stdin.readline()
    write_runs(store, writer, runs)
    print("done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
