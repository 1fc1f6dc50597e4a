"""Running the service: open it, serve a transport until a signal or EOF, shut down.

Requests are answered by threads of the same process as the analyses, so queries
stay fast while an analysis runs: the interpreter's thread switch interval is
lowered from 5 ms to 1 ms (a request thread waiting for the GIL while an analysis
runs Python code gets it sooner), and analyses use all CPU cores but one by
default (`--torch-threads`), leaving a core to answer requests.

Shutdown order on SIGTERM/SIGINT (or end of input for stdio): stop taking
requests, let those in flight finish, stop the workers (running runs stop at their
next progress point and are recorded as interrupted, queued ones likewise), close
the database.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

from .auth import Authenticate
from .http import DEFAULT_HOST, DEFAULT_MAX_BYTES, DEFAULT_PORT, RpcHTTPServer, check_binding
from .methods import required_scope, service_methods
from .protocol import Endpoint
from .service import Service
from .stdio import serve_stdio

log = logging.getLogger("headscope.rpc")

SWITCH_INTERVAL_S = 0.001


def default_torch_threads() -> int:
    """Analyses get all cores but one, so requests always find a core free."""
    return max(1, (os.cpu_count() or 2) - 1)


Announce = Callable[[dict[str, Any]], None]
#: builds the service (store, registry, workers): slow, so called after quick checks
OpenService = Callable[[], Service]


def _prepare_process(stop: threading.Event) -> None:
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    _stop_on_signals(stop)


def _stop_on_signals(stop: threading.Event) -> None:
    def handler(signum: int, _frame: Any) -> None:
        log.info("received %s: shutting down", signal.Signals(signum).name)
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)


def claim_stdout():
    """A private copy of stdout for protocol messages; file descriptor 1 then writes
    to stderr, so a stray print (a library's warning) never corrupts the stream."""
    sink = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    return sink


def serve_http(
    open_service: OpenService,
    announce: Announce,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    token: str | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    shutdown_timeout: float = 30.0,
    authenticate: Callable[[Service], tuple[Authenticate, bool]] | None = None,
) -> None:
    """`authenticate(service)` gives the request check and whether it requires a
    token; without it, `token` (if any) is the one token, holding every scope."""
    stop = threading.Event()
    _prepare_process(stop)
    check_binding(host, token or bool(authenticate))  # before the slow start: quick
    service = open_service()
    try:
        check, required = authenticate(service) if authenticate else (None, bool(token))
        check_binding(host, required)
        endpoint = Endpoint(
            service_methods(service.registry), service, required_scope, Service.for_caller
        )
        server = RpcHTTPServer(endpoint, host, port, token, max_bytes, authenticate=check)
    except BaseException:
        service.close(shutdown_timeout)
        raise
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="http", daemon=True
    )
    thread.start()
    announce(
        {
            "event": "listening",
            "url": server.url,
            "dashboard": server.dashboard_url,
            "pid": os.getpid(),
            "auth": required,
            "interrupted_runs": service.recovered,
        }
    )
    try:
        while not stop.wait(0.5):
            pass
    finally:
        server.closing = True
        server.shutdown()
        if not server.drain(shutdown_timeout):
            log.warning("requests still in flight after %.0f s", shutdown_timeout)
        service.close(shutdown_timeout)
        server.server_close()
        announce({"event": "stopped", "pid": os.getpid()})


def serve_stdin(
    open_service: OpenService,
    announce: Announce,
    max_bytes: int = DEFAULT_MAX_BYTES,
    shutdown_timeout: float = 30.0,
) -> None:
    """Serve stdin/stdout; anything else written to stdout is sent to stderr instead."""
    stop = threading.Event()
    _prepare_process(stop)
    sink = claim_stdout()
    service = open_service()
    announce({"event": "ready", "pid": os.getpid(), "interrupted_runs": service.recovered})
    try:
        endpoint = Endpoint(service_methods(service.registry), service)
        serve_stdio(endpoint, sys.stdin.buffer, sink, stop, max_bytes)
    finally:
        service.close(shutdown_timeout)
        sink.close()
        announce({"event": "stopped", "pid": os.getpid()})
