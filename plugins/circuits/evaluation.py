"""How well a head ranking recovers a reference head set (e.g. patching's top heads).

ROC AUC scores the whole ranking. A circuit is a set, so precision and recall are
also given for two cuts: the ranking's top k (k = the reference's size) and the
threshold that balances TPR and TNR best. `harmonic` (the SAE-circuit paper's
choice) maximises their harmonic mean 2 TPR TNR / (TPR + TNR); `youden`
maximises TPR - FPR (= TPR + TNR - 1). That threshold is chosen with the
reference labels, so it is an upper bound on what a label-free cut achieves.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

Head = tuple[int, int]
ThresholdRule = Literal["harmonic", "youden"]


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


def balance(tpr: np.ndarray, fpr: np.ndarray, rule: ThresholdRule) -> np.ndarray:
    """How well each ROC point balances TPR and TNR under `rule` (higher is better)."""
    if rule == "youden":
        return tpr - fpr
    if rule == "harmonic":
        tnr = 1 - fpr
        total = tpr + tnr
        return np.divide(2 * tpr * tnr, total, out=np.zeros_like(total), where=total > 0)
    raise ValueError(f"unknown threshold rule {rule!r} (harmonic or youden)")


def evaluate_ranking(
    scores: np.ndarray, reference: set[Head], threshold: ThresholdRule = "harmonic"
) -> dict[str, Any]:
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
    best = int(np.argmax(balance(tpr, fpr, threshold)))
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
