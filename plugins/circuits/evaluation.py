"""How well a head ranking recovers a reference head set (e.g. patching's top heads).

ROC AUC scores the whole ranking. A circuit is a set, so precision and recall are
also given for two cuts: the ranking's top k (k = the reference's size) and the
threshold that maximises TPR + TNR (balanced accuracy), the cut the SAE-circuit
paper reports. That threshold is chosen with the reference labels, so it is an
upper bound on what a label-free cut achieves.
"""

from __future__ import annotations

from typing import Any

import numpy as np

Head = tuple[int, int]


def labels_for(reference: set[Head], n_layers: int, n_heads: int) -> np.ndarray:
    """[layers * heads] bool, layer-major: True for reference heads."""
    labels = np.zeros(n_layers * n_heads, dtype=bool)
    for layer, head in reference:
        labels[layer * n_heads + head] = True
    return labels


def precision_recall(selected: set[Head], reference: set[Head]) -> tuple[float, float]:
    hits = len(selected & reference)
    precision = hits / len(selected) if selected else 0.0
    recall = hits / len(reference) if reference else 0.0
    return precision, recall


def evaluate_ranking(scores: np.ndarray, reference: set[Head]) -> dict[str, Any]:
    """scores [layers, heads] (higher = more in the circuit) against reference heads."""
    n_layers, n_heads = scores.shape
    labels = labels_for(reference, n_layers, n_heads)
    flat = scores.reshape(-1).astype(float)
    if labels.all() or not labels.any():
        raise ValueError("the reference must contain some heads but not all of them")
    heads = [(i // n_heads, i % n_heads) for i in range(flat.size)]
    order = sorted(range(flat.size), key=lambda i: (-flat[i], heads[i]))
    top = {heads[i] for i in order[: len(reference)]}
    top_precision, top_recall = precision_recall(top, reference)
    from sklearn.metrics import roc_auc_score, roc_curve

    fpr, tpr, thresholds = roc_curve(labels, flat)
    best = int(np.argmax(tpr - fpr))
    cut = float(thresholds[best])
    chosen = {heads[i] for i in range(flat.size) if flat[i] >= cut}
    precision, recall = precision_recall(chosen, reference)
    return {
        "roc_auc": float(roc_auc_score(labels, flat)),
        "top_k": len(reference),
        "top_k_precision": top_precision,
        "top_k_recall": top_recall,
        "balanced_threshold": cut,
        "balanced_size": len(chosen),
        "balanced_precision": precision,
        "balanced_recall": recall,
    }
