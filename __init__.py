"""headscope: find, score and steer attention heads.

The public API for plugin authors is small and stable: `hookimpl` to mark hook
implementations, `Analysis` to subclass, `RunContext` and `Finding` for its
`run(ctx, params)` method.
"""

__version__ = "0.1.0"

# Absolute imports: tools that import this file by path under another module
# name (pytest collecting the repository root) must still find the package.
from headscope.core.analysis import Analysis, Artifact, Finding, RunContext  # noqa: E402
from headscope.core.hookspecs import hookimpl  # noqa: E402

__all__ = ["Analysis", "Artifact", "Finding", "RunContext", "hookimpl", "__version__"]
