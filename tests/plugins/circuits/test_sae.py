"""The discrete-SAE scores against hand-computed examples, and the ranking evaluation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from headscope.plugins.circuits import sae
from headscope.plugins.circuits.evaluation import evaluate_ranking

# 3 positive and 2 negative prompts, 3 heads, codes from 5 units
POSITIVE = np.array([[0, 1, 2], [0, 3, 2], [4, 1, 2]])
NEGATIVE = np.array([[0, 1, 3], [0, 1, 4]])


def test_unique_code_counts_match_a_hand_computed_example():
    # head 0: positives {0, 4}, negatives {0} -> {4}: 1
    # head 1: positives {1, 3}, negatives {1} -> {3}: 1
    # head 2: positives {2}, negatives {3, 4} -> {2}: 1 ... and nothing else
    assert sae.unique_code_counts(POSITIVE, NEGATIVE, 5).tolist() == [1, 1, 1]
    more = np.array([[4, 3, 0], [2, 3, 1]])
    # head 0: {0, 4, 2} \ {0} = {2, 4}; head 1: {1, 3} \ {1} = {3}; head 2: {2, 0, 1} \ {3, 4}
    positives = np.concatenate([POSITIVE, more])
    assert sae.unique_code_counts(positives, NEGATIVE, 5).tolist() == [2, 1, 3]


def test_unique_pair_counts_match_a_hand_computed_example():
    counts = sae.unique_pair_counts(POSITIVE, NEGATIVE, 5)
    # (head 0, head 1): positive pairs {(0,1), (0,3), (4,1)}, negative {(0,1)} -> 2
    # (head 0, head 2): {(0,2), (4,2)} vs {(0,3), (0,4)} -> 2
    # (head 1, head 2): {(1,2), (3,2)} vs {(1,3), (1,4)} -> 2
    assert counts[0, 1] == 2 and counts[0, 2] == 2 and counts[1, 2] == 2
    assert np.tril(counts).sum() == 0
    negative = np.array([[0, 3, 2]])
    counts = sae.unique_pair_counts(POSITIVE, negative, 5)
    # (0,1): {(0,1),(0,3),(4,1)} \ {(0,3)} -> 2; (0,2): {(0,2),(4,2)} \ {(0,2)} -> 1;
    # (1,2): {(1,2),(3,2)} \ {(3,2)} -> 1
    assert (counts[0, 1], counts[0, 2], counts[1, 2]) == (2, 1, 1)


def test_sparse_pair_counts_equal_a_dense_brute_force():
    rng = np.random.default_rng(3)
    positive = rng.integers(0, 4, size=(7, 5))
    negative = rng.integers(0, 4, size=(6, 5))
    dense_pos = np.zeros((5, 5, 4, 4), dtype=bool)
    dense_neg = np.zeros((5, 5, 4, 4), dtype=bool)
    for rows, dense in ((positive, dense_pos), (negative, dense_neg)):
        for row in rows:
            for u, v in itertools.combinations(range(5), 2):
                dense[u, v, row[u], row[v]] = True
    expected = (dense_pos & ~dense_neg).sum(axis=(2, 3))
    np.testing.assert_array_equal(sae.unique_pair_counts(positive, negative, 4), expected)


def test_edge_node_scores_count_top_pairs():
    counts = np.zeros((4, 4), dtype=np.int64)
    counts[0, 1], counts[1, 2], counts[2, 3], counts[0, 3] = 5, 4, 1, 0
    assert sae.edge_node_scores(counts, 2).tolist() == [1, 2, 1, 0]
    assert sae.edge_node_scores(counts, 10).tolist() == [1, 2, 2, 1]  # zero pairs never count
    assert sae.top_pairs(counts, 2) == [(0, 1, 5.0), (1, 2, 4.0)]


def test_sae_training_is_seeded_and_learns():
    generator = torch.Generator().manual_seed(0)
    centres = 3 * torch.randn(4, 8, generator=generator)
    samples = centres[torch.arange(60) % 4] + 0.1 * torch.randn(60, 8, generator=generator)
    first = sae.train_sae(samples, n_units=16, lr=1e-2, steps=200, seed=4)
    again = sae.train_sae(samples, n_units=16, lr=1e-2, steps=200, seed=4)
    assert first.losses == again.losses
    assert first.losses[-1] < 0.1 * first.losses[0]
    codes = sae.codes(first.sae, samples.view(6, 10, 8))
    assert codes.shape == (6, 10) and codes.max() < 16
    flat = codes.reshape(-1)
    assert all(flat[i] == flat[i % 4] for i in range(60))  # one code per cluster
    f, _ = first.sae(samples)
    assert np.array_equal(codes.reshape(-1), f.argmax(-1).numpy())


def test_sae_units_are_unit_norm():
    model = sae.DiscreteSAE(8, 5, torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.enc_weight.mul_(7.0)
    x = torch.randn(3, 8)
    manual = torch.relu(
        (x - model.bias) @ (model.enc_weight / model.enc_weight.norm(dim=1, keepdim=True)).T
        + model.enc_bias
    )
    torch.testing.assert_close(model.encode(x), manual)


def test_evaluate_ranking_against_hand_computed_values():
    scores = np.array([[4.0, 3.0], [2.0, 1.0], [0.0, 5.0]])  # 3 layers x 2 heads
    reference = {(0, 0), (2, 1)}
    result = evaluate_ranking(scores, reference)
    # both reference heads outrank all four others
    assert result["roc_auc"] == 1.0
    assert result["top_k_precision"] == 1.0 and result["top_k_recall"] == 1.0
    assert result["balanced_precision"] == 1.0 and result["balanced_size"] == 2
    result = evaluate_ranking(scores, {(0, 1), (1, 1)})
    # (positive, negative) pairs won: 3 > 2, 3 > 0, 1 > 0 of 2 x 4
    assert result["roc_auc"] == pytest.approx(3 / 8)
    with pytest.raises(ValueError):
        evaluate_ranking(scores, set())


def test_ordered_pairs_run_from_earlier_to_later_layers():
    u, v = sae.ordered_pairs(6, heads_per_layer=2)  # 3 layers x 2 heads
    pairs = set(zip(u.tolist(), v.tolist(), strict=True))
    expected = {(a, b) for a in range(6) for b in range(6) if a // 2 < b // 2}
    assert pairs == expected and len(pairs) == 12
    # with one head per layer every u < v is ordered (the flat case above)
    assert len(sae.ordered_pairs(4)[0]) == 6


def test_same_layer_pairs_never_count_as_edges():
    positive = np.array([[0, 0, 1, 1], [2, 2, 3, 3]])  # 2 layers x 2 heads
    negative = np.array([[4, 4, 4, 4]])
    counts = sae.unique_pair_counts(positive, negative, 5, heads_per_layer=2)
    assert counts[0, 1] == 0 and counts[2, 3] == 0  # same layer
    assert counts[0, 2] == 2 and counts[1, 3] == 2  # across layers: one pair per row


def test_edge_variant_k_is_a_quarter_of_heads_squared():
    assert sae.default_edge_pairs(270) == 18225  # 270^2 / 4
    assert sae.default_edge_pairs(12) == 36
    assert sae.default_edge_pairs(1) == 1


def test_global_scale_keeps_relative_norms():
    samples = torch.tensor([[3.0, 4.0], [0.3, 0.4]])  # norms 5 and 0.5
    scale = sae.global_scale(samples, rms=2.0)
    scaled = samples * scale
    assert float(scaled.pow(2).mean().sqrt()) == pytest.approx(2.0)
    norms = scaled.norm(dim=-1)
    assert float(norms[0] / norms[1]) == pytest.approx(10.0)
    assert sae.global_scale(torch.zeros(2, 2)) == 1.0


def test_threshold_rules_pick_the_balanced_cut():
    # 2 layers x 4 heads; reference heads (0, 0), (0, 1), (1, 0)
    scores = np.array([[9.0, 2.0, 1.0, 1.0], [8.0, 7.0, 1.0, 1.0]])
    reference = {(0, 0), (0, 1), (1, 0)}
    # cuts: >= 8 -> TPR 2/3, TNR 1; >= 7 -> 2/3, 4/5; >= 2 -> 1, 4/5; >= 1 -> 1, 0
    harmonic = evaluate_ranking(scores, reference, "harmonic")
    assert harmonic["balanced_threshold"] == 2.0 and harmonic["balanced_size"] == 4
    youden = evaluate_ranking(scores, reference, "youden")
    # TPR - FPR: 2/3 at >= 8, 0.8 at >= 2: the same cut here
    assert youden["balanced_threshold"] == 2.0
    # where they differ: ranked N N P N N N N P N N N N (2 reference heads, 10 others)
    scores = np.arange(12.0, 0.0, -1.0).reshape(3, 4)
    reference = {(0, 2), (1, 3)}
    # cut >= 10: TPR 1/2, TNR 8/10 (harmonic 0.615, TPR - FPR 0.3);
    # cut >= 5: TPR 1, TNR 4/10 (harmonic 0.571, TPR - FPR 0.4)
    harmonic = evaluate_ranking(scores, reference)  # the default rule
    assert harmonic["balanced_threshold"] == 10.0 and harmonic["balanced_size"] == 3
    youden = evaluate_ranking(scores, reference, "youden")
    assert youden["balanced_threshold"] == 5.0 and youden["balanced_size"] == 8
