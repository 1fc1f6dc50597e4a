"""The MCP server over stdin/stdout: the one module that uses the mcp SDK.

The SDK's low-level `Server` carries the protocol; tools and resources come from
`tools` and `resources`. Each request's work (store queries, handlers that wait
for a model) runs in a thread, so the connection keeps answering while it waits.
A failed tool call is a tool result marked as an error, with the message and
the JSON-RPC error object, so the agent can read it and try again; a failed
resource read is an MCP error with headscope's code (docs/rpc.md).

As `headscope serve --stdio` does, the process keeps its output stream for
messages (anything else printed goes to stderr), opens the service, and serves
until end of input or SIGTERM/SIGINT; then the workers stop (running runs are
recorded as interrupted) and the database closes. The connection runs on a
daemon thread: its blocking read of stdin ends with the process, not before.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import signal
import sys
import threading
import uuid
from collections.abc import Callable
from typing import Any

import anyio
import mcp_types as types
from mcp.server import Server
from mcp.server.stdio import stdio_server
from mcp.shared.exceptions import MCPError

from ..errors import HeadscopeError
from ..rpc.errors import ERRORS, INTERNAL_ERROR, INVALID_PARAMS, error_object
from ..rpc.serve import SWITCH_INTERVAL_S, Announce, OpenService, claim_stdout
from ..version import __version__
from . import resources
from .tools import Outcome, build_tools

log = logging.getLogger("headscope.mcp")

PAGE = 50  # runs per resources/list page

INSTRUCTIONS = """\
headscope finds, scores and steers attention heads of language models.
Each run_<analysis> tool starts an analysis run and returns its run_id at once;
poll runs_get (head_scores=false keeps the answer short) until the status is
succeeded, then ask findings_query for the top heads, runs_compare to compare
two runs, or read headscope://runs/<run_id> (the full run) and
headscope://runs/<run_id>/heatmaps/<metric> (a PNG heatmap). A tool named like
runs_get is the JSON-RPC method runs.get of `headscope serve`, with the same
params. Model names: models_list; the default model is smollm2-135m, and
tiny-llama is a small random model (its scores mean nothing) for trying things
out in seconds."""


def build_server(service: Any) -> Server:
    """An MCP server answering with `service` (a `core.rpc.service.Service`)."""
    tools = build_tools(service.registry)
    listed = [
        types.Tool(name=tool.name, description=tool.description, input_schema=tool.input_schema)
        for tool in tools.values()
    ]

    async def list_tools(_ctx: Any, _params: Any) -> types.ListToolsResult:
        return types.ListToolsResult(tools=listed)

    async def call_tool(ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
        tool = tools.get(params.name)
        if tool is None:
            message = f"unknown tool {params.name!r}; tools: {', '.join(tools)}"
            return _tool_result(
                Outcome({"error": {"code": INVALID_PARAMS, "message": message}}, message)
            )
        request = getattr(ctx, "request", None)  # over HTTP: the request, with its caller
        caller = request.scope.get("headscope.caller") if request is not None else None
        return _tool_result(await _in_thread(tool.call, service, params.arguments or {}, caller))

    async def list_resources(_ctx: Any, params: Any) -> types.ListResourcesResult:
        cursor = params.cursor if params is not None else None
        if cursor is not None and not cursor.isdigit():
            raise MCPError(INVALID_PARAMS, f"cursor {cursor!r} is not one this server gave")
        offset = int(cursor or 0)
        entries, following = await _in_thread(
            _answer, resources.list_entries, service.store, offset, PAGE
        )
        return types.ListResourcesResult(
            resources=[
                types.Resource(
                    uri=e.uri, name=e.name, description=e.description, mime_type=e.mime_type
                )
                for e in entries
            ],
            next_cursor=None if following is None else str(following),
        )

    async def list_templates(_ctx: Any, _params: Any) -> types.ListResourceTemplatesResult:
        return types.ListResourceTemplatesResult(
            resource_templates=[
                types.ResourceTemplate(
                    uri_template=template, name=name, description=description, mime_type=media
                )
                for template, name, description, media in resources.TEMPLATES
            ]
        )

    async def read_resource(
        _ctx: Any, params: types.ReadResourceRequestParams
    ) -> types.ReadResourceResult:
        contents = await _in_thread(_answer, resources.read, service.store, params.uri)
        if contents.text is not None:
            read: Any = types.TextResourceContents(
                uri=params.uri, mime_type=contents.mime_type, text=contents.text
            )
        else:
            blob = base64.b64encode(contents.data or b"").decode("ascii")
            read = types.BlobResourceContents(
                uri=params.uri, mime_type=contents.mime_type, blob=blob
            )
        return types.ReadResourceResult(contents=[read])

    return Server(
        "headscope",
        version=__version__,
        instructions=INSTRUCTIONS,
        on_list_tools=list_tools,
        on_call_tool=call_tool,
        on_list_resources=list_resources,
        on_list_resource_templates=list_templates,
        on_read_resource=read_resource,
    )


def _tool_result(outcome: Outcome) -> types.CallToolResult:
    text = json.dumps(outcome.data, allow_nan=False)
    content = [types.TextContent(text=text)]
    if outcome.error is not None:
        content.insert(0, types.TextContent(text=outcome.error))
    return types.CallToolResult(
        content=content,
        structured_content=outcome.data if isinstance(outcome.data, dict) else None,
        is_error=outcome.error is not None,
    )


async def _in_thread(function: Callable[..., Any], *args: Any) -> Any:
    return await anyio.to_thread.run_sync(function, *args)


def _answer(function: Callable[..., Any], *args: Any) -> Any:
    """Call `function`; its errors as MCP errors with headscope's codes."""
    try:
        return function(*args)
    except HeadscopeError as error:
        code, message, data = error_object(error)
        raise MCPError(code, message, data) from None
    except Exception:  # a bug: log it, tell the client only where to look
        reference = uuid.uuid4().hex[:12]
        log.exception("internal error in %s (ref %s)", function.__name__, reference)
        raise MCPError(INTERNAL_ERROR, ERRORS[INTERNAL_ERROR][0], {"ref": reference}) from None


def serve_stdio(open_service: OpenService, announce: Announce, shutdown_timeout: float = 30.0):
    """Serve MCP on stdin/stdout until end of input or SIGTERM/SIGINT."""
    stop = threading.Event()
    sys.setswitchinterval(SWITCH_INTERVAL_S)  # requests get the GIL sooner while runs work
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    # the messages' own copies of stdin and stdout; fd 1 now writes to stderr
    source = os.fdopen(os.dup(sys.stdin.fileno()), "rb")
    sink = claim_stdout()
    service = open_service()
    announce({"event": "ready", "pid": os.getpid(), "interrupted_runs": service.recovered})
    try:
        connection = threading.Thread(
            target=_serve_connection,
            args=(build_server(service), source, sink),
            name="mcp",
            daemon=True,
        )
        connection.start()
        while connection.is_alive() and not stop.wait(0.2):
            pass
    finally:
        service.close(shutdown_timeout)
        announce({"event": "stopped", "pid": os.getpid()})


def _serve_connection(server: Server, source: io.BufferedReader, sink: io.BufferedWriter):
    async def serve() -> None:
        stdin = anyio.wrap_file(io.TextIOWrapper(source, encoding="utf-8", errors="replace"))
        stdout = anyio.wrap_file(io.TextIOWrapper(sink, encoding="utf-8"))
        async with stdio_server(stdin, stdout) as (read, write):
            await server.run(read, write, server.create_initialization_options())

    try:
        anyio.run(serve)
    except Exception:
        log.exception("the MCP connection failed")
