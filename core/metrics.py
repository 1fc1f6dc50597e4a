"""Task metrics on next-token logits, differentiable so gradients can flow through them.

A task says which next tokens count as right (`answers`) and which as wrong
(`distractors`) for each prompt; `TokenMetric` turns the last position's logits
into one number per prompt:

- "logit_diff": mean logit of the answers minus mean logit of the distractors
  (IOI: logit of the indirect object minus logit of the subject);
- "prob_diff": probability mass on the answers minus mass on the distractors
  (greater-than: mass on later years minus mass on earlier ones).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

MetricKind = Literal["logit_diff", "prob_diff"]


@dataclass
class TokenMetric:
    """Per-row weighted sums of logits (or probabilities) at chosen token ids."""

    ids: torch.Tensor  # [b, k] token ids (padding entries have weight 0)
    weights: torch.Tensor  # [b, k]
    kind: MetricKind = "logit_diff"

    @classmethod
    def from_tokens(
        cls,
        answers: Sequence[Sequence[int]],
        distractors: Sequence[Sequence[int]],
        kind: MetricKind = "logit_diff",
    ) -> TokenMetric:
        """Answers weigh +1 and distractors -1 (divided by their count for logit_diff)."""
        if kind not in ("logit_diff", "prob_diff"):
            raise ValueError(f"unknown metric kind {kind!r}")
        width = max(len(a) + len(d) for a, d in zip(answers, distractors, strict=True))
        ids = torch.zeros(len(answers), width, dtype=torch.long)
        weights = torch.zeros(len(answers), width)
        for row, (good, bad) in enumerate(zip(answers, distractors, strict=True)):
            scale_good = 1.0 / len(good) if kind == "logit_diff" else 1.0
            scale_bad = 1.0 / len(bad) if kind == "logit_diff" else 1.0
            entries = [(t, scale_good) for t in good] + [(t, -scale_bad) for t in bad]
            for col, (token, weight) in enumerate(entries):
                ids[row, col] = int(token)
                weights[row, col] = weight
        return cls(ids, weights, kind)

    @property
    def size(self) -> int:
        return self.ids.shape[0]

    def tiled(self, copies: int) -> TokenMetric:
        """The metric for a batch made of `copies` stacked copies of the rows."""
        return TokenMetric(self.ids.repeat(copies, 1), self.weights.repeat(copies, 1), self.kind)

    def rows(self, index: Sequence[int]) -> TokenMetric:
        index = torch.as_tensor(list(index), dtype=torch.long)
        return TokenMetric(self.ids[index], self.weights[index], self.kind)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [b, vocab] (or [b, 1, vocab]) -> metric [b]."""
        if logits.dim() == 3:
            logits = logits[:, -1]
        values = logits.float()
        if self.kind == "prob_diff":
            values = torch.softmax(values, dim=-1)
        picked = values.gather(1, self.ids.to(values.device))
        return (picked * self.weights.to(values)).sum(-1)
