"""Agglomerative (hierarchical) clustering backends.

After ``fit(X)``: ``labels_`` (n,), ``children_`` (n-1, 2) and ``distances_`` (n-1,) when the
full tree was built, and ``linkage_matrix_`` (n-1, 4) in scipy's format for dendrograms.
"""

from __future__ import annotations

import numpy as np

from gpu_ops._validation import as_float32_matrix, check_n_clusters
from gpu_ops.errors import InputError
from gpu_ops.registry import register_backend, requires

LINKAGES = ("ward", "average", "complete", "single")


def linkage_matrix(children: np.ndarray, distances: np.ndarray, n_samples: int) -> np.ndarray:
    """scipy linkage matrix (n-1, 4) from scikit-learn's ``children_`` and ``distances_``.

    Columns: the two merged nodes, their merge distance, and the size of the new node.
    """
    counts = np.zeros(children.shape[0])
    for i, (a, b) in enumerate(children):
        size_a = 1 if a < n_samples else counts[a - n_samples]
        size_b = 1 if b < n_samples else counts[b - n_samples]
        counts[i] = size_a + size_b
    return np.column_stack([children, distances, counts]).astype(np.float64)


class SklearnAgglomerative:
    """scikit-learn ``AgglomerativeClustering`` keeping the whole tree for dendrograms.

    Parameters
    ----------
    n_clusters : int
    linkage : {"ward", "average", "complete", "single"}
    """

    def __init__(self, n_clusters: int = 8, linkage: str = "ward", **_: object) -> None:
        self.n_clusters = n_clusters
        self.linkage = linkage

    def fit(self, X: np.ndarray) -> "SklearnAgglomerative":
        """Fit on ``X`` of shape (n, d)."""
        from sklearn.cluster import AgglomerativeClustering

        if self.linkage not in LINKAGES:
            raise InputError(f"unknown linkage {self.linkage!r}; expected one of: {', '.join(LINKAGES)}")
        X = as_float32_matrix(X)
        n = X.shape[0]
        check_n_clusters(self.n_clusters, n)
        model = AgglomerativeClustering(
            n_clusters=int(self.n_clusters), linkage=self.linkage, compute_distances=True
        ).fit(X)
        self.labels_ = model.labels_.astype(np.int64)
        self.children_ = model.children_
        self.distances_ = model.distances_
        self.linkage_matrix_ = linkage_matrix(model.children_, model.distances_, n)
        return self


def _cuml_linkage_unsupported(params: dict[str, object]) -> str | None:
    linkage = params.get("linkage", "ward")
    if linkage != "single":
        return f"cuML AgglomerativeClustering supports single linkage only; {linkage!r} was requested"
    return None


@register_backend(
    "agglomerative", "sklearn", kind="cpu", priority=0, availability=requires("sklearn"),
    description="scikit-learn AgglomerativeClustering (ward/average/complete/single, full tree kept)",
)
def _sklearn(**params: object) -> SklearnAgglomerative:
    return SklearnAgglomerative(**params)
