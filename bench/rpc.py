"""findings.query latency and throughput over JSON-RPC, idle vs. while an analysis runs.

Starts `headscope serve` on a free loopback port with a scratch database, stores
one head-detector run to query, then runs two phases side by side in one process:
N concurrent clients (default 8), each on its own keep-alive connection, calling
`findings.query` back to back for a fixed time,

  1. idle: nothing else running;
  2. busy: while head-detector runs on the same model in the service's worker.

Each phase runs twice: saturated (every client calls back to back: throughput, and
latency at saturation) and paced (every client calls at a fixed rate: latency at a
steady load). Prints p50/p99 latency, throughput and errors per phase, the busy/idle
ratios, and whether the target holds: p99 under 20 ms and no errors while a job runs.

    .venv/bin/python bench/rpc.py                  # smollm2-135m, 8 clients, 10 s
    .venv/bin/python bench/rpc.py --model tiny-llama --seconds 5
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

SEED_PARAMS = {"n_random": 1, "random_length": 8, "prompts": ["The cat sat on the mat."]}
# enough work to outlast a phase on 2 cores; queued copies cover a fast machine
BUSY_PARAMS = {"n_random": 16, "random_length": 96, "repeats": 4}


class Rpc:
    """A JSON-RPC client on one keep-alive connection.

    The standard library's http.client costs about half of httpx per call; the
    clients share the machine's cores with the server, so a light client keeps the
    numbers about the server.
    """

    def __init__(self, url: str):
        parts = urlsplit(url)
        self.path, self.ids = parts.path, 0
        self.connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)

    def call(self, method: str, **params):
        self.ids += 1
        message = {"jsonrpc": "2.0", "method": method, "params": params, "id": self.ids}
        self.connection.request(
            "POST", self.path, json.dumps(message), {"Content-Type": "application/json"}
        )
        reply = json.loads(self.connection.getresponse().read())
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]

    def wait(self, run_id: int, statuses: tuple[str, ...], timeout: float = 900) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.call("runs.get", run_id=run_id, head_scores=False)["run"]
            if run["status"] in statuses:
                return run
            time.sleep(0.2)
        raise TimeoutError(f"run {run_id} stayed {run['status']}")


def start_server(folder: Path, extra: list[str]) -> tuple[subprocess.Popen, str]:
    events = folder / "events.jsonl"
    env = {**os.environ, "HEADSCOPE_DATA_DIR": str(folder), "HEADSCOPE_LOAD_PLUGINS": ""}
    command = [sys.executable, "-m", "headscope.cli", "serve", "--port", "0", "--format", "json"]
    command += ["--db", str(folder / "bench.db"), *extra]
    with open(events, "wb") as out, open(folder / "server.log", "wb") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, env=env)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        for line in events.read_text().splitlines():
            event = json.loads(line)
            if event["event"] == "listening":
                return process, event["url"]
        if process.poll() is not None:
            raise RuntimeError((folder / "server.log").read_text()[-2000:])
        time.sleep(0.1)
    raise TimeoutError("the server did not start")


def client_loop(
    url: str, seconds: float, query: dict, start_at: float, rate: float | None
) -> tuple[list, list]:
    """One client process: findings.query from `start_at` for `seconds`.

    Back to back when `rate` is None; else at `rate` calls per second on a fixed
    schedule, latency counted from the scheduled time (a slow reply delays the
    next call, and that wait counts too).
    """
    rpc = Rpc(url)
    rpc.call("findings.query", **query)  # connect and warm up
    latencies, errors = [], []
    time.sleep(max(0.0, start_at - time.time()))
    began_at = time.perf_counter()
    sent = 0
    while time.perf_counter() - began_at < seconds:
        scheduled = time.perf_counter() if rate is None else began_at + sent / rate
        time.sleep(max(0.0, scheduled - time.perf_counter()))
        sent += 1
        try:
            if not rpc.call("findings.query", **query)["heads"]:
                errors.append("empty result")
        except Exception as error:
            errors.append(repr(error))
        latencies.append((time.perf_counter() - scheduled) * 1000)
    return latencies, errors


def hammer(
    pool: ProcessPoolExecutor,
    url: str,
    clients: int,
    seconds: float,
    query: dict,
    rate: float | None = None,
) -> dict:
    """`clients` processes (no shared GIL on the client side) query for `seconds`."""
    start_at = time.time() + 1.0
    stagger = 0.0 if rate is None else 1.0 / (rate * clients)  # paced calls interleave
    futures = [
        pool.submit(client_loop, url, seconds, query, start_at + i * stagger, rate)
        for i in range(clients)
    ]
    latencies: list[float] = []
    errors: list[str] = []
    for future in futures:
        mine, failed = future.result()
        latencies += mine
        errors += failed
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    return {
        "requests": len(latencies),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "throughput": len(latencies) / seconds,
        "p50": cuts[49],
        "p99": cuts[98],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0, help="per phase")
    parser.add_argument("--rate", type=float, default=25.0, help="calls/s per paced client")
    parser.add_argument("--serve-arg", action="append", default=[], help="extra serve option")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    n, seconds = args.clients, args.seconds

    with (
        tempfile.TemporaryDirectory(prefix="headscope-bench-") as scratch,
        ProcessPoolExecutor(n) as pool,
    ):
        process, url = start_server(Path(scratch), args.serve_arg)
        try:
            rpc = Rpc(url)
            seeded = rpc.call(
                "runs.submit", analysis="head-detector", model=args.model, params=SEED_PARAMS
            )["run_id"]
            assert rpc.wait(seeded, ("succeeded", "failed"))["status"] == "succeeded"
            query = {"model": args.model, "metric": "induction", "limit": 20}
            idle = {
                "1 client": hammer(pool, url, 1, seconds / 2, query),
                "saturated": hammer(pool, url, n, seconds, query),
                "paced": hammer(pool, url, n, seconds, query, args.rate),
            }
            busy_runs = [
                rpc.call(
                    "runs.submit", analysis="head-detector", model=args.model, params=BUSY_PARAMS
                )["run_id"]
                for _ in range(3)
            ]
            started = rpc.wait(busy_runs[0], ("running", "succeeded", "failed"))
            if started["status"] != "running":
                raise RuntimeError(f"the busy run ended at once: {started['error']}")
            busy = {
                "saturated": hammer(pool, url, n, seconds, query),
                "paced": hammer(pool, url, n, seconds, query, args.rate),
            }
            still_running = rpc.call("runs.list", status="running")["total"] > 0
            for run_id in busy_runs:
                rpc.call("runs.cancel", run_id=run_id)
        finally:
            process.terminate()
            process.wait(timeout=120)

    print(f"findings.query (top 20 by induction on {args.model}) over HTTP on loopback")
    print(f"{n} client processes, {seconds:.0f} s per phase: saturated = back to back, ")
    print(f"paced = {args.rate:.0f} calls/s each ({n * args.rate:.0f}/s in all); serve options:")
    print(f"{args.serve_arg or 'defaults'}; load average before/after {load_before:.1f}/", end="")
    print(f"{os.getloadavg()[0]:.1f}")
    print()
    print(f"{'phase':<34}{'requests':>9}{'errors':>7}{'req/s':>7}{'p50 ms':>9}{'p99 ms':>9}")
    rows = [("idle, " + k, v) for k, v in idle.items()]
    rows += [("head-detector running, " + k, v) for k, v in busy.items()]
    for name, phase in rows:
        print(
            f"{name:<34}{phase['requests']:>9}{phase['errors']:>7}{phase['throughput']:>7.0f}"
            f"{phase['p50']:>9.2f}{phase['p99']:>9.2f}"
        )
    print()
    for kind in ("saturated", "paced"):
        ratio = {k: busy[kind][k] / idle[kind][k] for k in ("p50", "p99", "throughput")}
        print(
            f"busy/idle ({kind}): p50 {ratio['p50']:.2f}, p99 {ratio['p99']:.2f}, "
            f"throughput {ratio['throughput']:.2f}"
        )
    print(f"analysis still running at the end: {still_running}")
    for kind in ("saturated", "paced"):
        met = busy[kind]["p99"] < 20 and busy[kind]["errors"] == 0
        print(f"target, {kind} (busy p99 < 20 ms, no errors): {'met' if met else 'missed'}")
    for name, phase in rows:
        if phase["first_error"]:
            print(f"first error ({name}): {phase['first_error']}")


if __name__ == "__main__":
    main()
