"""headscope: find, score and steer attention heads.

The public API for plugin authors is small and stable: `hookimpl` to mark hook
implementations, `Analysis` to subclass, `RunContext` and `Finding` for its
`run(ctx, params)` method.
"""

# Absolute imports: tools that import this file by path under another module
# name (pytest collecting the repository root) must still find the package.
from headscope.core.analysis import Analysis, Artifact, Finding, RunContext
from headscope.core.hookspecs import hookimpl
from headscope.core.version import __version__

__all__ = ["Analysis", "Artifact", "Finding", "RunContext", "hookimpl", "__version__"]
