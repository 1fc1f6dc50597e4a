"""The JSON-RPC 2.0 service: methods over the engine, OpenRPC discovery, transports.

`protocol` is the only module that knows the JSON-RPC library; `methods` holds the
method table; `service` owns the store, the plugin registry, loaded models and the
workers; `http` and `stdio` carry messages in and out.

Plugins add methods with `register_rpc_methods(register)`, registering
`RpcMethod(name, params_model, handler, result_type, summary, ...)`; error codes
they may name are in `errors`.
"""

from .protocol import RpcMethod

__all__ = ["RpcMethod"]
