"""JSON-RPC over standard input and output: one message per line, one reply per line.

Replies are written in request order; notifications get none. A line longer than
the size limit is answered with a "request too large" error and skipped. Only
replies go to the output stream: the caller points everything else at stderr.
"""

from __future__ import annotations

import queue
import threading
from typing import BinaryIO

from .errors import REQUEST_TOO_LARGE
from .protocol import Endpoint, encode, error_response

_TOO_LARGE = object()


def _read_lines(source: BinaryIO, max_bytes: int, lines: queue.Queue) -> None:
    """Reader thread: complete lines (or _TOO_LARGE) into `lines`, then None at EOF."""
    while True:
        line = source.readline(max_bytes + 1)
        if not line:
            break
        if len(line) > max_bytes and not line.endswith(b"\n"):
            while line and not line.endswith(b"\n"):  # skip the rest of the long line
                line = source.readline(65536)
            lines.put(_TOO_LARGE)
            continue
        lines.put(line)
    lines.put(None)


def serve_stdio(
    endpoint: Endpoint,
    source: BinaryIO,
    sink: BinaryIO,
    stop: threading.Event,
    max_bytes: int,
) -> None:
    """Answer lines from `source` on `sink` until EOF or `stop` is set."""
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(
        target=_read_lines, args=(source, max_bytes, lines), name="stdio-reader", daemon=True
    )
    reader.start()
    while not stop.is_set():
        try:
            line = lines.get(timeout=0.2)
        except queue.Empty:
            continue
        if line is None:
            return
        if line is _TOO_LARGE:
            reply = encode(
                error_response(
                    REQUEST_TOO_LARGE,
                    f"Request too large: a line over {max_bytes} bytes",
                    {"limit_bytes": max_bytes},
                )
            )
        elif not line.strip():
            continue
        else:
            reply = endpoint.handle(line)
        if reply is not None:
            sink.write(reply.encode() + b"\n")
            sink.flush()
