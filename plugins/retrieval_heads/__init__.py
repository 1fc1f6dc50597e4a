"""Retrieval heads (Wu et al. 2024): needle-in-a-haystack tests, the retrieval
score, and the masking check.

- `analysis`: the `retrieval-heads` analysis;
- `needles`: needles, haystack text and prompt building (data in `data/`);
- `reference`: an eager, plain-PyTorch computation of the score, for tests.
"""

from headscope.core.hookspecs import hookimpl

from .analysis import RetrievalHeads


@hookimpl
def register_analyses(register):
    register(RetrievalHeads)
