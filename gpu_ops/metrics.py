"""Clustering quality: Hungarian accuracy, NMI, ARI, confusion after mapping; k selection curves."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class HungarianResult:
    """Best one-to-one cluster -> class mapping and the accuracy it gives.

    ``mapping`` maps a cluster id to a class id (clusters left unmatched when k > n_classes are absent).
    """

    accuracy: float
    mapping: dict[int, int]


def contingency(labels_true: np.ndarray, labels_pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Counts table of shape (n_clusters, n_classes) and the sorted cluster and class ids."""
    labels_true = np.asarray(labels_true)
    labels_pred = np.asarray(labels_pred)
    if labels_true.shape != labels_pred.shape or labels_true.ndim != 1:
        raise ValueError(f"labels must be 1-D and of equal length; got {labels_true.shape} and {labels_pred.shape}")
    classes, true_idx = np.unique(labels_true, return_inverse=True)
    clusters, pred_idx = np.unique(labels_pred, return_inverse=True)
    table = np.zeros((clusters.size, classes.size), dtype=np.int64)
    np.add.at(table, (pred_idx, true_idx), 1)
    return table, clusters, classes


def hungarian_accuracy(labels_true: np.ndarray, labels_pred: np.ndarray) -> HungarianResult:
    """Accuracy under the best one-to-one matching of clusters to classes.

    The confusion matrix need not be square: with more clusters than classes the extra
    clusters stay unmatched and count as errors (the standard definition).
    """
    from scipy.optimize import linear_sum_assignment

    table, clusters, classes = contingency(labels_true, labels_pred)
    rows, cols = linear_sum_assignment(table, maximize=True)
    matched = int(table[rows, cols].sum())
    mapping = {int(clusters[r]): int(classes[c]) for r, c in zip(rows, cols)}
    return HungarianResult(matched / max(1, len(np.asarray(labels_true))), mapping)


def mapped_confusion(labels_true: np.ndarray, labels_pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Confusion matrix (n_classes, n_clusters) with clusters ordered by their Hungarian class.

    Returns (matrix, class ids, cluster ids in column order). Matched clusters come first in
    class order, so a perfect clustering is diagonal; the matrix sums to n.
    """
    table, clusters, classes = contingency(labels_true, labels_pred)
    mapping = hungarian_accuracy(labels_true, labels_pred).mapping
    class_pos = {c: i for i, c in enumerate(classes)}
    order = sorted(range(clusters.size), key=lambda i: (class_pos.get(mapping.get(int(clusters[i]), -1), classes.size), i))
    return table[order].T.copy(), classes, clusters[order]


def evaluate(labels_true: np.ndarray, labels_pred: np.ndarray) -> dict[str, float]:
    """ACC (Hungarian), NMI (arithmetic normalisation) and ARI."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    acc = hungarian_accuracy(labels_true, labels_pred).accuracy
    return {
        "acc": float(acc),
        "nmi": float(normalized_mutual_info_score(labels_true, labels_pred)),
        "ari": float(adjusted_rand_score(labels_true, labels_pred)),
    }
