"""Retrieval heads (Wu et al. 2024): needle-in-a-haystack tests, the retrieval
score, the masking check, and KV-cache plans built from head roles.

- `analysis`: the `retrieval-heads` analysis;
- `needles`: needles, haystack text and prompt building (data in `data/`);
- `reference`: an eager, plain-PyTorch computation of the score, for tests;
- `kv_plan`: KV-cache plans (full or streaming per KV head), their formats and size;
- `kv_plan_analysis`: the `kv-cache-plan` analysis and its evaluation.
"""

from headscope.core.hookspecs import hookimpl

from .analysis import RetrievalHeads
from .kv_plan_analysis import KVCachePlan


@hookimpl
def register_analyses(register):
    register(RetrievalHeads)
    register(KVCachePlan)
