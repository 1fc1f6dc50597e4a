"""Context faithfulness: which heads read a marked context, and steering them.

- `data`: context-faithfulness datasets (built-in sets and JSONL files);
- `sensitivity`: per-head context attention scores (the `context-heads` metrics);
- `modulation`: PAINT/PASTA attention steering and ACT sink calibration;
- `faithfulness`: scoring answers with and without a modulation;
- `steering`: the steering settings and steered generation (`steer`, `generate.steer`);
- `context_heads`, `attention_modulation`: the two analyses;
- `commands`, `rpc`: the `steer` CLI command and the `generate.steer` RPC method.
"""

from headscope.core.hookspecs import hookimpl

from .attention_modulation import AttentionModulation
from .context_heads import ContextHeads


@hookimpl
def register_analyses(register):
    register(ContextHeads)
    register(AttentionModulation)


@hookimpl
def register_commands(app, kit):
    from .commands import add_steer_command

    add_steer_command(app, kit)


@hookimpl
def register_rpc_methods(register):
    from .rpc import GENERATE_STEER

    register(GENERATE_STEER)
