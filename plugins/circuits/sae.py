"""Discrete sparse autoencoders for circuit identification (O'Neill & Bui 2024).

One small SAE is shared by every head: each (prompt, head) residual-stream write
is one sample. After training, a sample's *code* is its most active dictionary
unit. A head whose codes on positive prompts (the model does the task) include
codes it never takes on negative prompts is doing something task-specific:

- node score of head h = |codes of h on positives \\ codes of h on negatives|;
- edge score of heads (u, v) = number of code pairs (code of u, code of v), seen
  together on some positive prompt, never on a negative one. Pairs are ordered:
  u sits in an earlier layer than v (an edge can only run forward), and a head's
  edge score is how many of the k best pairs it takes part in, k = n^2 / 4 for n
  heads by default (the published choice).

Edge sets are kept sparse: each (u, c_u, v, c_v) is one int64 key in a sorted
array, so memory grows with the prompts, not with (heads x units)^2.

Inputs are rescaled before training by one factor for all samples
(`global_scale`): the L1 coefficient then means the same on every model, and
heads keep their relative norms (a unit-norm scaling would erase them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


class DiscreteSAE(nn.Module):
    """f = ReLU(W_e (x - b) + b_e), x_hat = W_d f + b, with a tied bias b.

    Both weight matrices are used row-normalised (unit norm along their input
    dimension), the constraint of the published implementation.
    """

    def __init__(self, d_in: int, n_units: int, generator: torch.Generator | None = None):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(d_in))
        self.enc_weight = nn.Parameter(torch.randn(n_units, d_in, generator=generator))
        bound = d_in**-0.5
        self.enc_bias = nn.Parameter((torch.rand(n_units, generator=generator) * 2 - 1) * bound)
        self.dec_weight = nn.Parameter(torch.randn(d_in, n_units, generator=generator))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        weight = F.normalize(self.enc_weight, dim=-1)
        # W_e (x - b) + b_e written as W_e x + (b_e - W_e b): the same map, and the
        # backward pass needs no gradient with respect to the [samples, d] input
        return F.relu(F.linear(x, weight, self.enc_bias - weight @ self.bias))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.encode(x)
        return f, F.linear(f, F.normalize(self.dec_weight, dim=-1)) + self.bias


def sae_loss(x: torch.Tensor, f: torch.Tensor, x_hat: torch.Tensor, l1: float) -> torch.Tensor:
    """Mean squared reconstruction error plus `l1` times the mean L1 norm of the codes."""
    return F.mse_loss(x_hat, x) + l1 * f.abs().sum(-1).mean()


@dataclass
class TrainedSAE:
    sae: DiscreteSAE
    losses: list[float]


def train_sae(
    samples: torch.Tensor,
    n_units: int = 200,
    l1: float = 0.02,
    lr: float = 1e-3,
    steps: int = 500,
    seed: int = 0,
    on_step: Callable[[int], None] | None = None,
) -> TrainedSAE:
    """Full-batch Adam on samples [N, d]; deterministic for a seed. `on_step(i)` is
    called every 50 steps (progress, cancellation)."""
    generator = torch.Generator().manual_seed(seed)
    sae = DiscreteSAE(samples.shape[-1], n_units, generator)
    optimiser = torch.optim.Adam(sae.parameters(), lr=lr)
    losses = []
    with torch.enable_grad():
        for step in range(steps):
            optimiser.zero_grad()
            f, x_hat = sae(samples)
            loss = sae_loss(samples, f, x_hat, l1)
            loss.backward()
            optimiser.step()
            losses.append(float(loss.detach()))
            if on_step is not None and step % 50 == 0:
                on_step(step)
    return TrainedSAE(sae, losses)


@torch.no_grad()
def codes(sae: DiscreteSAE, samples: torch.Tensor, chunk: int = 8192) -> np.ndarray:
    """Most active unit per sample: samples [..., d] -> int array [...]."""
    flat = samples.reshape(-1, samples.shape[-1])
    out = torch.cat([sae.encode(part).argmax(-1) for part in flat.split(chunk)])
    return out.reshape(samples.shape[:-1]).numpy()


def unique_code_counts(positive: np.ndarray, negative: np.ndarray, n_units: int) -> np.ndarray:
    """Per head (column): how many codes appear on positives and never on negatives.

    positive [P, K] and negative [Q, K] hold one code per (prompt, head).
    """
    return (_seen(positive, n_units) & ~_seen(negative, n_units)).sum(1)


def _seen(code_rows: np.ndarray, n_units: int) -> np.ndarray:
    """[K, units] bool: head k took this code on some row."""
    heads = code_rows.shape[1]
    seen = np.zeros((heads, n_units), dtype=bool)
    seen[np.broadcast_to(np.arange(heads), code_rows.shape), code_rows] = True
    return seen


def global_scale(samples: torch.Tensor, rms: float = 1.0) -> float:
    """The one factor that brings the samples' root-mean-square element to `rms`."""
    current = float(samples.double().pow(2).mean().sqrt())
    return rms / current if current > 0 else 1.0


def default_edge_pairs(n_heads: int) -> int:
    """k of the edge variant: n^2 / 4 pairs for n heads (O'Neill & Bui)."""
    return max(1, n_heads * n_heads // 4)


def ordered_pairs(heads: int, heads_per_layer: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(u, v) index arrays of every head pair with u in an earlier layer than v
    (heads are numbered layer-major; with one head per layer, every u < v)."""
    upper_u, upper_v = np.triu_indices(heads, k=1)
    forward = upper_u // heads_per_layer < upper_v // heads_per_layer
    return upper_u[forward], upper_v[forward]


def pair_keys(code_rows: np.ndarray, n_units: int, heads_per_layer: int = 1) -> np.ndarray:
    """Sorted unique keys of every (head u, code, head v, code) of an ordered pair
    (`ordered_pairs`) seen on a row."""
    heads = code_rows.shape[1]
    upper_u, upper_v = ordered_pairs(heads, heads_per_layer)
    nodes = np.arange(heads, dtype=np.int64)[None, :] * n_units + code_rows.astype(np.int64)
    span = np.int64(heads * n_units)
    keys = nodes[:, upper_u] * span + nodes[:, upper_v]
    return np.unique(keys)


def unique_pair_counts(
    positive: np.ndarray, negative: np.ndarray, n_units: int, heads_per_layer: int = 1
) -> np.ndarray:
    """[K, K] (upper triangle): per ordered head pair, code pairs seen on positives,
    never on negatives."""
    heads = positive.shape[1]
    only_positive = np.setdiff1d(
        pair_keys(positive, n_units, heads_per_layer),
        pair_keys(negative, n_units, heads_per_layer),
        assume_unique=True,
    )
    span = heads * n_units
    u = (only_positive // span) // n_units
    v = (only_positive % span) // n_units
    counts = np.zeros((heads, heads), dtype=np.int64)
    np.add.at(counts, (u, v), 1)
    return counts


def edge_node_scores(
    pair_counts: np.ndarray, top_pairs: int, heads_per_layer: int = 1
) -> np.ndarray:
    """Per head: in how many of the `top_pairs` highest-scoring ordered head pairs it
    takes part (pairs with no unique code pair never count)."""
    heads = pair_counts.shape[0]
    upper_u, upper_v = ordered_pairs(heads, heads_per_layer)
    values = pair_counts[upper_u, upper_v]
    order = np.argsort(-values, kind="stable")[:top_pairs]
    order = order[values[order] > 0]
    scores = np.zeros(heads, dtype=np.int64)
    np.add.at(scores, upper_u[order], 1)
    np.add.at(scores, upper_v[order], 1)
    return scores


def top_pairs(
    pair_counts: np.ndarray, k: int, heads_per_layer: int = 1
) -> list[tuple[int, int, float]]:
    """The k ordered head pairs (u, v, count) with most unique code pairs (count > 0)."""
    heads = pair_counts.shape[0]
    upper_u, upper_v = ordered_pairs(heads, heads_per_layer)
    values = pair_counts[upper_u, upper_v]
    order = np.argsort(-values, kind="stable")[:k]
    return [(int(upper_u[i]), int(upper_v[i]), float(values[i])) for i in order if values[i] > 0]
