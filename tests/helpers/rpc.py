"""A real `headscope serve` process on a free port, and a JSON-RPC client for it."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

_ids = itertools.count(1)


class RpcError(Exception):
    def __init__(self, error: dict[str, Any]):
        super().__init__(f"{error['code']}: {error['message']}")
        self.code, self.message, self.data = error["code"], error["message"], error.get("data")


class Server:
    """`headscope serve --port 0` in its own process; `url` once it listens.
    `command` starts another HTTP server the same way (`("mcp", "--http")`)."""

    def __init__(
        self,
        db: Path | str,
        *args: str,
        env: dict[str, str] | None = None,
        logs: Path | None = None,
        command: tuple[str, ...] = ("serve",),
    ):
        """`db` is a file or a database URL (then its logs go to the folder `logs`)."""
        self.db = db
        where = logs / "server" if logs is not None else Path(db)
        self.log = where.with_suffix(f".{time.monotonic_ns()}.log")
        self.events = self.log.with_suffix(".events")
        command = [sys.executable, "-m", "headscope.cli", *command, "--port", "0"]
        command += ["--format", "json", "--db", str(db), *args]
        with open(self.events, "wb") as out, open(self.log, "wb") as err:
            self.process = subprocess.Popen(
                command, stdout=out, stderr=err, env={**os.environ, **(env or {})}
            )
        try:
            self.listening = self._wait_for("listening")
        except BaseException:
            self.process.kill()
            raise
        self.url = self.listening["url"]

    def _wait_for(self, event: str, timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.events.read_text().splitlines():
                if json.loads(line)["event"] == event:
                    return json.loads(line)
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()[-3000:]}")
            time.sleep(0.1)
        raise TimeoutError(f"no {event!r} event: {self.log.read_text()[-3000:]}")

    def client(self, token: str | None = None) -> Client:
        return Client(self.url, token)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout=timeout)


class Client:
    """A JSON-RPC client over one keep-alive HTTP connection."""

    def __init__(self, url: str, token: str | None = None):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = url
        self.http = httpx.Client(headers=headers, timeout=60)

    def post(self, body: bytes | str | Any) -> httpx.Response:
        if not isinstance(body, bytes | str):
            body = json.dumps(body)
        return self.http.post(self.url, content=body)

    def call(self, method: str, **params: Any) -> Any:
        request = {"jsonrpc": "2.0", "method": method, "params": params, "id": next(_ids)}
        reply = self.post(request).json()
        assert reply["id"] == request["id"]
        if "error" in reply:
            raise RpcError(reply["error"])
        return reply["result"]

    def wait_for(self, run_id: int, statuses: tuple[str, ...], timeout: float = 180) -> dict:
        """Poll runs.get until the run reaches one of `statuses`; returns the document."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            document = self.call("runs.get", run_id=run_id)
            if document["run"]["status"] in statuses:
                return document
            time.sleep(0.2)
        raise TimeoutError(f"run {run_id} never reached {statuses}: {document['run']}")

    def close(self) -> None:
        self.http.close()


def request(method: str, params: Any = None, id: Any = 1) -> dict[str, Any]:  # noqa: A002
    message: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": id}
    if params is not None:
        message["params"] = params
    return message
