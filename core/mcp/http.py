"""The MCP server over streamable HTTP: `headscope mcp --http`.

The same MCP server as over stdio (`server.build_server`), as the SDK's
streamable-HTTP app at `/mcp`, served by uvicorn. Requests pass the same
token rules as `headscope serve`: `rpc.http.check_binding` refuses an address
beyond loopback without a token, and every request's Authorization header goes
to the same `Authenticate` check (`rpc.auth`) before the SDK sees it. On loopback
the SDK's DNS-rebinding protection also checks the Host and Origin headers.

Shutdown on SIGTERM/SIGINT: uvicorn stops accepting, lets open requests finish
(up to the shutdown timeout), then the workers stop (running runs are recorded
as interrupted) and the database closes.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from typing import Any

import uvicorn

from ..errors import HeadscopeError
from ..rpc.auth import Authenticate, authenticator
from ..rpc.errors import UNAUTHORIZED
from ..rpc.http import DEFAULT_HOST, check_binding
from ..rpc.protocol import encode, error_response
from ..rpc.serve import SWITCH_INTERVAL_S, Announce, OpenService
from .server import build_server

log = logging.getLogger("headscope.mcp")

DEFAULT_PORT = 8766  # beside `headscope serve`'s 8765
PATH = "/mcp"


class RequireCaller:
    """ASGI middleware: HTTP requests whose Authorization header `authenticate`
    refuses get 401 with a JSON-RPC error body; the caller rides in the scope."""

    def __init__(self, app: Any, authenticate: Authenticate):
        self.app, self.authenticate = app, authenticate

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            header = dict(scope.get("headers") or []).get(b"authorization")
            headers = {} if header is None else {"Authorization": header.decode("latin-1")}
            caller = self.authenticate(headers)
            if caller is None:
                body = encode(
                    error_response(UNAUTHORIZED, "Unauthorized: a bearer token is required")
                ).encode()
                await send(
                    {
                        "type": "http.response.start",
                        "status": 401,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"www-authenticate", b"Bearer"),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
            scope = {**scope, "headscope.caller": caller}
        await self.app(scope, receive, send)


def listen(host: str, port: int) -> socket.socket:
    """A listening socket, so that port 0 gets a free port we can announce."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(64)
    except OSError as error:
        sock.close()
        raise HeadscopeError(f"cannot listen on {host}:{port}: {error.strerror}") from None
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in str(host) else host
    return f"http://{shown}:{port}{PATH}"


def serve_http(
    open_service: OpenService,
    announce: Announce,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    token: str | None = None,
    shutdown_timeout: float = 30.0,
    authenticate: Callable[[Any], tuple[Authenticate, bool]] | None = None,
) -> None:
    """Serve MCP over streamable HTTP until SIGTERM/SIGINT. `authenticate(service)`
    gives the request check and whether it requires a token, as for `rpc.serve`;
    without it, `token` (if any) is the one token, holding every scope."""
    check_binding(host, token or bool(authenticate))  # before the slow start, so a refusal is quick
    stop = threading.Event()
    sys.setswitchinterval(SWITCH_INTERVAL_S)  # requests get the GIL sooner while runs work
    # until uvicorn runs (it takes these signals, then raises them again when done)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    sock = listen(host, port)
    try:
        service = open_service()
    except BaseException:
        sock.close()
        raise
    try:
        if stop.is_set():  # stopped while the service opened
            return
        check, required = (
            authenticate(service)
            if authenticate
            else (authenticator(token, required=bool(token)), bool(token))
        )
        check_binding(host, required)
        app = build_server(service).streamable_http_app(streamable_http_path=PATH, host=host)
        config = uvicorn.Config(
            RequireCaller(app, check),
            log_level="warning",
            lifespan="on",
            timeout_graceful_shutdown=max(1, int(shutdown_timeout)),
        )
        server = uvicorn.Server(config)
        event = {
            "event": "listening",
            "url": url_of(sock),
            "pid": os.getpid(),
            "auth": required,
            "interrupted_runs": service.recovered,
        }
        threading.Thread(
            target=_announce_when_started, args=(server, announce, event), daemon=True
        ).start()
        server.run(sockets=[sock])
    finally:
        sock.close()
        service.close(shutdown_timeout)
        announce({"event": "stopped", "pid": os.getpid()})


def _announce_when_started(server: uvicorn.Server, announce: Announce, event: dict) -> None:
    while not (server.started or server.should_exit):
        threading.Event().wait(0.05)
    if server.started:
        announce(event)
