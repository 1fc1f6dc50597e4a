"""`headscope worker` processes for tests, started with fast fault detection."""

from __future__ import annotations

import signal
import subprocess
import sys

FAST_FAULTS = ["--heartbeat", "0.3", "--stalled-after", "1.5"]


class Workers:
    def __init__(self, url: str, env: dict[str, str]):
        self.url, self.env, self.processes = url, env, []

    def start(self, *args: str) -> subprocess.Popen:
        command = [sys.executable, "-m", "headscope.cli", "worker", "--db", self.url]
        process = subprocess.Popen(
            [*command, "-m", "tiny-llama", *FAST_FAULTS, *args],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.processes.append(process)
        return process

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
