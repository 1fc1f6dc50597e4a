"""A real `headscope mcp` process, driven by the mcp SDK's own client over stdio.

The SDK client is async; `McpSession` runs it on an event loop in a background
thread (anyio's blocking portal), so tests call it like a plain object.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from anyio.from_thread import BlockingPortal, start_blocking_portal
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client


class McpSession:
    def __init__(self, portal: BlockingPortal, client: Client, log: Path):
        self.portal, self.client, self.log = portal, client, log

    def tools(self) -> dict[str, Any]:
        return {tool.name: tool for tool in self.portal.call(self.client.list_tools).tools}

    def call(self, tool: str, **arguments: Any) -> Any:
        """A CallToolResult; `.structured_content` holds the JSON result."""
        return self.portal.call(self.client.call_tool, tool, arguments)

    def read(self, uri: str) -> tuple[str, str | bytes]:
        """(media type, text or decoded bytes) of a resource."""
        (contents,) = self.portal.call(self.client.read_resource, uri).contents
        if hasattr(contents, "blob"):
            return contents.mime_type, base64.b64decode(contents.blob)
        return contents.mime_type, contents.text

    def read_json(self, uri: str) -> Any:
        media_type, text = self.read(uri)
        assert media_type == "application/json"
        return json.loads(text)

    def resources(self) -> list[Any]:
        return self.portal.call(self.client.list_resources).resources

    def templates(self) -> list[Any]:
        return self.portal.call(self.client.list_resource_templates).resource_templates

    def wait_for(self, run_id: int, timeout: float = 180) -> Any:
        """Poll runs_get until the run has finished; returns the last CallToolResult."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = self.call("runs_get", run_id=run_id, head_scores=False)
            if result.structured_content["run"]["status"] not in ("queued", "running"):
                return result
            time.sleep(0.2)
        raise TimeoutError(f"run {run_id} never finished: {result.structured_content['run']}")


@contextmanager
def mcp_session(db: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[McpSession]:
    """`python -m headscope.cli mcp --db DB` as a subprocess, with a connected client."""
    log = db.with_suffix(f".{time.monotonic_ns()}.log")
    server = StdioServerParameters(
        command=sys.executable,
        args=["-m", "headscope.cli", "mcp", "--db", str(db), *args],
        env={**os.environ, **(env or {})},
    )
    with open(log, "w") as errlog, start_blocking_portal() as portal:
        client = Client(stdio_client(server, errlog), cache=None, read_timeout_seconds=120)
        with portal.wrap_async_context_manager(client) as connected:
            yield McpSession(portal, connected, log)


@contextmanager
def mcp_http_session(url: str, token: str | None = None) -> Iterator[McpSession]:
    """The SDK's streamable-HTTP client connected to `url`, sending `token`."""
    headers = {"Authorization": f"Bearer {token}"} if token else None
    with start_blocking_portal() as portal:
        http = create_mcp_http_client(headers=headers)
        transport = streamable_http_client(url, http_client=http)
        client = Client(transport, cache=None, read_timeout_seconds=120)
        with portal.wrap_async_context_manager(client) as connected:
            yield McpSession(portal, connected, Path("-"))
        portal.call(http.aclose)
