"""The MCP front end: `headscope mcp` lets LLM agents use the service over stdio.

It answers with the same `core.rpc.service.Service` `headscope serve` opens, and
its tools are the JSON-RPC methods (`tools`); stored runs and heatmaps are
resources (`resources`); `server` is the one module that knows the mcp SDK.
"""
