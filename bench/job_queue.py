"""The run queue on a real PostgreSQL server (started as the tests start one).

1. Throughput: for each worker count, `headscope worker` processes on tiny-llama
   drain the same batch of head-detector runs; prints jobs/s and the ratio to one
   worker (the workers are started and registered before the runs are queued).
2. Faults: the batch again while a worker is SIGKILLed mid-run every
   `--kill-every` seconds (and a new one started; one run's worker at most
   `--kills-per-run` times, below the attempt limit of 10); prints, counted in the database, the runs that
   succeeded, the runs with other than one stored result, and the retries.
3. Reads under writes: `findings.query` latency (p50, p99) on a front end while
   workers write findings, against PostgreSQL (`serve --no-workers` + workers) and
   SQLite (`serve` running the analyses in its threads).

    .venv/bin/python bench/job_queue.py                               # the full setting
    .venv/bin/python bench/job_queue.py --jobs 4 --workers 1,2 --query-seconds 2 --kill-every 8
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from functools import cache
from pathlib import Path

from sqlalchemy import create_engine, text

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from headscope.core import jobs  # noqa: E402
from headscope.core.plugins import build_registry  # noqa: E402
from headscope.storage.runqueue.backend import enqueue, sync_app  # noqa: E402
from headscope.storage.store import Store  # noqa: E402

from helpers.postgres import Cluster  # noqa: E402
from helpers.rpc import Server  # noqa: E402

ANALYSIS, MODEL = "head-detector", "tiny-llama"
PARAMS = {"n_random": 1, "random_length": 8}
FAULTS = ["--heartbeat", "1", "--stalled-after", "4", "--max-attempts", "10"]


@cache
def engine(url: str):
    return create_engine(url)


def start_worker(url: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "headscope.cli", "worker", "--db", url, "-m", MODEL]
    return subprocess.Popen(
        [*command, "--torch-threads", "1", *FAULTS],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


def scalar(url: str, sql: str) -> int:
    with engine(url).connect() as connection:
        return int(connection.execute(text(sql)).scalar() or 0)


def wait_registered(url: str, count: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    sql = "SELECT count(*) FROM headscope_queue.procrastinate_workers"
    while time.time() < deadline:
        try:
            if scalar(url, sql) >= count:
                return
        except Exception:  # the schema is installed by the first worker
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{count} workers never registered")


def submit(url: str, count: int) -> None:
    registry, store = build_registry(), Store(url)
    app = sync_app(url)
    try:
        for _ in range(count):
            prepared = jobs.prepare(registry, ANALYSIS, MODEL, PARAMS, 0)
            enqueue(app, store, jobs.record(store, prepared), prepared.model_name)
    finally:
        app.close()


def running_owners(url: str, kills_per_run: int) -> set[int]:
    """Process ids of the workers running a run now that was killed fewer than
    `kills_per_run` times (the bench measures recovery; giving up after the last
    attempt is tested in tests/storage/runqueue)."""
    query = text(
        "SELECT r.owner_pid FROM runs r JOIN headscope_queue.procrastinate_jobs j "
        "ON j.id = r.queue_job WHERE r.status = 'running' AND j.attempts < :kills"
    )
    with engine(url).connect() as connection:
        rows = connection.execute(query, {"kills": kills_per_run})
        return {pid for (pid,) in rows if pid is not None}


def unfinished(url: str) -> int:
    return scalar(url, "SELECT count(*) FROM runs WHERE status IN ('queued', 'running')")


def drain(cluster: Cluster, workers: int, count: int) -> float:
    _, url = cluster.create_database()
    Store(url)  # tables
    processes = [start_worker(url) for _ in range(workers)]
    try:
        wait_registered(url, workers)
        start = time.perf_counter()
        submit(url, count)
        while unfinished(url):
            time.sleep(0.05)
        return count / (time.perf_counter() - start)
    finally:
        stop(processes)


def faults(
    cluster: Cluster, workers: int, count: int, kill_every: float, kills_per_run: int
) -> dict[str, int]:
    _, url = cluster.create_database()
    Store(url)
    processes = [start_worker(url) for _ in range(workers)]
    kills = 0
    try:
        wait_registered(url, workers)
        submit(url, count)
        last_kill = last_report = time.time()
        while left := unfinished(url):
            if time.time() - last_report >= 10:
                print(f"  ... {left} runs unfinished, {kills} workers killed", flush=True)
                last_report = time.time()
            busy = running_owners(url, kills_per_run)
            victims = [p for p in processes if p.poll() is None and p.pid in busy]
            if victims and time.time() - last_kill >= kill_every:  # kill one mid-run
                victim = random.choice(victims)
                victim.send_signal(signal.SIGKILL)
                victim.wait()
                processes.append(start_worker(url))
                kills, last_kill = kills + 1, time.time()
            time.sleep(0.05)
    finally:
        stop(processes)
    return {
        "kills": kills,
        "succeeded": scalar(url, "SELECT count(*) FROM runs WHERE status = 'succeeded'"),
        "not_succeeded": scalar(url, "SELECT count(*) FROM runs WHERE status <> 'succeeded'"),
        "runs_without_exactly_one_result": scalar(
            url,
            "SELECT count(*) FROM runs r WHERE (SELECT count(*) FROM run_metrics m "
            "WHERE m.run_id = r.id AND m.name = 'max_induction') <> 1",
        ),
        "attempts": scalar(url, "SELECT sum(attempts) FROM headscope_queue.procrastinate_jobs"),
        "retries": scalar(
            url, "SELECT sum(attempts) - count(*) FROM headscope_queue.procrastinate_jobs"
        ),
    }


def query_latency(server: Server, seconds: float) -> tuple[float, float, int]:
    client = server.client()
    body = {"metric": "induction", "model": MODEL, "limit": 20}
    times = []
    deadline = time.time() + seconds
    while time.time() < deadline:
        start = time.perf_counter()
        client.call("findings.query", **body)
        times.append(time.perf_counter() - start)
    client.close()
    cuts = statistics.quantiles(times, n=100)
    return cuts[49] * 1000, cuts[98] * 1000, len(times)


def reads_under_writes(cluster: Cluster, count: int, seconds: float, folder: Path) -> dict:
    results = {}
    _, url = cluster.create_database()
    Store(url)
    front = Server(url, "--no-workers", logs=folder)
    processes = [start_worker(url) for _ in range(2)]
    try:
        wait_registered(url, 2)
        submit(url, count)
        results["postgresql"] = query_latency(front, seconds)
    finally:
        stop(processes)
        front.stop()
    db = folder / "bench.db"
    server = Server(db)
    try:
        client = server.client()
        for _ in range(count):
            client.call("runs.submit", analysis=ANALYSIS, model=MODEL, params=PARAMS)
        results["sqlite"] = query_latency(server, seconds)
    finally:
        server.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument("--workers", default="1,2,4", help="worker counts, comma-separated")
    parser.add_argument(
        "--kill-every", type=float, default=2.0, help="seconds between kills (of a worker mid-run)"
    )
    parser.add_argument(
        "--kills-per-run", type=int, default=2, help="most times one run's worker is killed"
    )
    parser.add_argument("--query-seconds", type=float, default=10.0)
    args = parser.parse_args()
    counts = [int(part) for part in args.workers.split(",")]
    os.environ.setdefault("HEADSCOPE_DATA_DIR", tempfile.mkdtemp(prefix="headscope-bench-"))
    cluster = Cluster.start()
    try:
        rates = {n: drain(cluster, n, args.jobs) for n in counts}
        print(f"throughput: {args.jobs} {ANALYSIS} runs on {MODEL}")
        for n, rate in rates.items():
            print(f"  {n} worker(s): {rate:.2f} jobs/s, {rate / rates[counts[0]]:.2f}x")
        print(f"faults: a worker killed every {args.kill_every:g} s, {max(counts)} workers")
        counted = faults(cluster, max(counts), args.jobs, args.kill_every, args.kills_per_run)
        for key, value in counted.items():
            print(f"  {key}: {value}")
        print(f"findings.query while workers write ({args.query_seconds:g} s each)")
        with tempfile.TemporaryDirectory() as folder:
            latencies = reads_under_writes(cluster, args.jobs, args.query_seconds, Path(folder))
        for backend, (p50, p99, n) in latencies.items():
            print(f"  {backend}: p50 {p50:.1f} ms, p99 {p99:.1f} ms ({n} queries)")
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
