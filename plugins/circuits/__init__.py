"""Circuits: tasks with a metric, head patching, and SAE circuit identification.

- `tasks`: the built-in `ioi` and `greater-than` tasks (registered by their own
  entry point, `builtin_tasks`, as any package's tasks are);
- `head_patching`: the `head-patching` analysis (the reference circuit);
- `sae_circuit`: the `sae-circuit` analysis (He et al.: SAE codes of head outputs);
- `patching`, `gradients`: batched per-head patching and attribution patching;
- `head_results`, `sae`: head output vectors and the sparse autoencoder;
- `evaluation`: ROC AUC and precision/recall of a ranking against a reference.
"""

from headscope.core.hookspecs import hookimpl

from .head_patching import HeadPatching
from .sae_circuit import SaeCircuit


@hookimpl
def register_analyses(register):
    register(HeadPatching)
    register(SaeCircuit)
