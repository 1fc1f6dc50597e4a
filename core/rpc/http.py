"""JSON-RPC over HTTP: `POST /rpc` (or `/`), one message per request.

Built on the standard library's ThreadingHTTPServer: a thread per connection suits
a synchronous dispatcher whose methods are short (runs go to the model workers),
HTTP/1.1 keep-alive serves repeated calls on one connection, and it adds no
dependency. What a service needs on top is here: bearer tokens (required when the
address is not loopback; checked by one `auth.Authenticate` callable, which other
transports can share), a request size limit checked before the body is read,
socket timeouts for slow clients, TCP_NODELAY (small responses are not held back
by Nagle's algorithm), and a shutdown that stops accepting, lets requests in
flight finish, then stops the workers.

HTTP status: 200 for any JSON-RPC response (errors included), 204 when the message
was only notifications, 401 / 411 / 413 / 503 / 404 / 405 for transport problems (with a
JSON-RPC error body where a client may read one).

`GET /` and `GET /static/...` serve the web dashboard (`dashboard`): static files
that carry no data, so they need no token; the page asks for one and calls the
JSON-RPC methods with it.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from ..errors import HeadscopeError
from . import dashboard
from .auth import Authenticate, Caller, authenticator
from .errors import REQUEST_TOO_LARGE, SHUTTING_DOWN, UNAUTHORIZED
from .protocol import Endpoint, encode, error_response

log = logging.getLogger("headscope.rpc.http")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
DEFAULT_MAX_BYTES = 1024 * 1024
PATHS = ("/rpc", "/")
#: how long an unwanted body may pause before the connection is dropped
DISCARD_WAIT_S = 2.0


def host_addresses(host: str) -> set[str]:
    """The addresses `host` names; a host that names none is a clear error."""
    try:
        infos = socket.getaddrinfo(host, None)
    except (socket.gaierror, UnicodeError):
        raise HeadscopeError(f"--host {host!r} is not an address or a known host name") from None
    return {info[4][0].split("%")[0] for info in infos}


def is_loopback(host: str) -> bool:
    """True when every address `host` names is a loopback address."""
    addresses = host_addresses(host)
    return bool(addresses) and all(ipaddress.ip_address(a).is_loopback for a in addresses)


def check_binding(host: str, token: str | bool | None) -> None:
    """Refuse a host that names no address, and listening beyond this machine
    without a token."""
    if not token and not is_loopback(host):
        raise HeadscopeError(
            f"--host {host} is reachable from other machines: set a bearer token with "
            "--token or HEADSCOPE_TOKEN, or create named ones with `headscope tokens create`"
        )
    if token:
        host_addresses(host)


class RpcHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64

    def __init__(
        self,
        endpoint: Endpoint,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        token: str | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        idle_timeout: float = 60.0,
        authenticate: Authenticate | None = None,
    ):
        """`authenticate` decides who a request comes from (its caller has checked
        the binding); without it, `token` (if any) is the one accepted token, holding
        every scope."""
        if authenticate is None:
            check_binding(host, token)
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.endpoint, self.max_bytes = endpoint, max_bytes
        self.authenticate = authenticate or authenticator(token, required=bool(token))
        self.idle_timeout = idle_timeout
        self.closing = False  # set at shutdown: requests on open connections get 503
        self._in_flight = 0
        self._in_flight_lock = threading.Condition()
        try:
            super().__init__((host, port), _Handler)
        except OSError as error:
            raise HeadscopeError(f"cannot listen on {host}:{port}: {error.strerror}") from None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        shown = f"[{host}]" if ":" in str(host) else host
        return f"http://{shown}:{port}/rpc"

    @property
    def dashboard_url(self) -> str:
        return self.url.removesuffix("rpc")

    def track(self, delta: int) -> None:
        with self._in_flight_lock:
            self._in_flight += delta
            self._in_flight_lock.notify_all()

    def drain(self, timeout: float) -> bool:
        """Wait for requests in flight to finish; False if some are still running."""
        deadline = time.monotonic() + timeout
        with self._in_flight_lock:
            while self._in_flight:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._in_flight_lock.wait(left)
        return True


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "headscope"
    sys_version = ""
    disable_nagle_algorithm = True
    server: RpcHTTPServer

    def setup(self) -> None:
        self.timeout = self.server.idle_timeout
        super().setup()

    def version_string(self) -> str:
        return self.server_version

    def handle_expect_100(self) -> bool:
        """Refuse an oversized or unauthorised body before the client sends it."""
        length = self.headers.get("Content-Length", "")
        if self.server.authenticate(self.headers) is None:
            self._refuse_unauthorised(close=True)
            return False
        if length.isdigit() and int(length) > self.server.max_bytes:
            self._refuse_too_large(int(length))
            return False
        return super().handle_expect_100()

    def do_POST(self) -> None:  # noqa: N802 (the http.server naming)
        self.server.track(+1)
        try:
            self._post()
        finally:
            self.server.track(-1)

    def _post(self) -> None:
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            length = -1
        if length < 0 or self.headers.get("Transfer-Encoding"):
            return self._reply(411, None, close=True)  # a body must come with its length
        limit = self.server.max_bytes
        if self.path.split("?")[0] not in PATHS:
            self._discard(length, limit)
            return self._reply(404, None)
        if self.server.closing:
            self._discard(length, limit)
            body = error_response(SHUTTING_DOWN, "Shutting down: the service is stopping")
            return self._reply(503, encode(body), close=True)
        caller: Caller | None = self.server.authenticate(self.headers)
        if caller is None:
            self._discard(length, limit)
            return self._refuse_unauthorised(close=False)
        if length > limit:
            self._discard(length, 8 * limit)
            return self._refuse_too_large(length)
        reply = self.server.endpoint.handle(self.rfile.read(length), caller)
        if reply is None:
            return self._reply(204, None)
        self._reply(200, reply)

    def do_GET(self) -> None:  # noqa: N802
        path = self.path.split("?")[0]
        if path == "/health":
            return self._reply(200, '{"status":"ok"}')
        asset = dashboard.asset(path)
        if asset is not None:
            return self._send_asset(asset)
        self._reply(405 if path in PATHS else 404, None)

    def _send_asset(self, asset: dashboard.Asset) -> None:
        self.send_response(200)
        self.send_header("Content-Type", asset.media_type)
        self.send_header("Content-Length", str(len(asset.data)))
        for key, value in dashboard.HEADERS.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(asset.data)

    def _refuse_unauthorised(self, close: bool) -> None:
        body = error_response(UNAUTHORIZED, "Unauthorized: a bearer token is required")
        self._reply(401, encode(body), {"WWW-Authenticate": "Bearer"}, close=close)

    def _refuse_too_large(self, length: int) -> None:
        limit = self.server.max_bytes
        body = error_response(
            REQUEST_TOO_LARGE,
            f"Request too large: {length} bytes (limit {limit})",
            {"limit_bytes": limit},
        )
        self._reply(413, encode(body), close=True)

    def _discard(self, length: int, cap: int) -> None:
        """Read and drop a body we will not use, up to `cap` bytes; past that, hang up.

        Closing with unread data would reset the connection and could lose our reply.
        A client that announces more than it sends (a `Content-Length` of 10^10 with
        a 2-byte body) is waited for `DISCARD_WAIT_S` per read, not the idle timeout.
        """
        left = min(length, cap)
        self.connection.settimeout(DISCARD_WAIT_S)
        try:
            while left > 0:
                chunk = self.rfile.read1(min(left, 65536))
                if not chunk:
                    break
                left -= len(chunk)
        except TimeoutError:
            self.close_connection = True
        finally:
            self.connection.settimeout(self.timeout)
        if length > cap or left > 0:
            self.close_connection = True

    def _reply(
        self,
        status: int,
        body: str | None,
        headers: dict[str, str] | None = None,
        close: bool = False,
    ) -> None:
        data = body.encode() if body is not None else b""
        self.send_response(status)
        if body is not None:
            self.send_header("Content-Type", "application/json")
        if status != 204:
            self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if close or self.close_connection:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if data:
            self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        log.debug("%s " + format, self.address_string(), *args)
