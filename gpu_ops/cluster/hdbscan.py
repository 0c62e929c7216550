"""HDBSCAN backends: cuML (GPU) and scikit-learn (CPU, ``sklearn.cluster.HDBSCAN``, >= 1.3).

Density-based: the number of clusters is found, not given, and points in no dense region are
noise, labelled ``-1`` (the scikit-learn / cuML convention, kept as is). After ``fit(X)``:
``labels_`` (n,) int64 with -1 for noise, ``probabilities_`` (n,) membership strength,
``n_clusters_``. Both backends take ``min_cluster_size``, ``min_samples``,
``cluster_selection_epsilon`` and ``cluster_selection_method``; ``n_clusters`` and ``seed`` are
accepted for the common interface and ignored (HDBSCAN is deterministic and finds k itself).

HDBSCAN suits low-dimensional spaces (a UMAP projection to ~10 dimensions is the usual recipe for
image embeddings): in hundreds of dimensions the CPU backend falls back to brute-force distances.
"""

from __future__ import annotations

import numpy as np

from gpu_ops._validation import as_float32_matrix
from gpu_ops.device import to_host
from gpu_ops.errors import InputError
from gpu_ops.backend_table import register_backend, requires

SELECTION_METHODS = ("eom", "leaf")


class _HDBSCANParams:
    def __init__(self, min_cluster_size: int = 15, min_samples: int | None = None,
                 cluster_selection_epsilon: float = 0.0, cluster_selection_method: str = "eom",
                 n_clusters: int | None = None, seed: int = 0) -> None:
        self.min_cluster_size = min_cluster_size
        self.min_samples = min_samples
        self.cluster_selection_epsilon = cluster_selection_epsilon
        self.cluster_selection_method = cluster_selection_method
        self.n_clusters = n_clusters
        self.seed = seed

    def _validate(self, X: object) -> np.ndarray:
        mcs = self.min_cluster_size
        if isinstance(mcs, bool) or not isinstance(mcs, (int, np.integer)) or mcs < 2:
            raise InputError(f"min_cluster_size must be an integer >= 2; got {mcs!r}")
        ms = self.min_samples
        if ms is not None and (isinstance(ms, bool) or not isinstance(ms, (int, np.integer)) or ms < 1):
            raise InputError(f"min_samples must be a positive integer or None; got {ms!r}")
        eps = self.cluster_selection_epsilon
        if not isinstance(eps, (int, float, np.floating, np.integer)) or eps < 0:
            raise InputError(f"cluster_selection_epsilon must be >= 0; got {eps!r}")
        if self.cluster_selection_method not in SELECTION_METHODS:
            raise InputError(f"unknown cluster_selection_method {self.cluster_selection_method!r}; "
                             f"expected one of: {', '.join(SELECTION_METHODS)}")
        X = as_float32_matrix(X)
        if X.shape[0] < int(mcs):
            raise InputError(f"HDBSCAN with min_cluster_size={mcs} needs at least {mcs} samples; got {X.shape[0]}")
        return X

    def _shared_kwargs(self) -> dict[str, object]:
        """The parameters scikit-learn's and cuML's HDBSCAN take under the same names."""
        return {
            "min_cluster_size": int(self.min_cluster_size),
            "min_samples": None if self.min_samples is None else int(self.min_samples),
            "cluster_selection_epsilon": float(self.cluster_selection_epsilon),
            "cluster_selection_method": self.cluster_selection_method,
        }

    def _finish(self, labels: np.ndarray, probabilities: np.ndarray) -> None:
        self.labels_ = np.asarray(labels).astype(np.int64)
        self.probabilities_ = np.asarray(probabilities, dtype=np.float32)
        self.n_clusters_ = int(self.labels_.max()) + 1 if (self.labels_ >= 0).any() else 0
        self.n_noise_ = int((self.labels_ < 0).sum())


class SklearnHDBSCAN(_HDBSCANParams):
    """scikit-learn ``HDBSCAN``; ``labels_`` (n,) with -1 for noise."""

    def fit(self, X: np.ndarray) -> "SklearnHDBSCAN":
        from sklearn.cluster import HDBSCAN

        X = self._validate(X)
        model = HDBSCAN(
            **self._shared_kwargs(),
            n_jobs=-1,
            copy=True,  # never overwrite the caller's array
        ).fit(X)
        self._finish(model.labels_, model.probabilities_)
        return self


class CumlHDBSCAN(_HDBSCANParams):
    """cuML ``HDBSCAN`` on the GPU (brute-force kNN graph + MST); ``labels_`` (n,) with -1 for noise."""

    def fit(self, X: np.ndarray) -> "CumlHDBSCAN":
        X = self._validate(X)
        from cuml.cluster.hdbscan import HDBSCAN

        model = HDBSCAN(
            **self._shared_kwargs(),
            output_type="numpy",
        ).fit(X)
        self._finish(to_host(model.labels_), to_host(model.probabilities_))
        return self


@register_backend("hdbscan", "cuml", kind="gpu", priority=0, availability=requires("cuml", gpu=True),
                  description="cuML HDBSCAN on the GPU")
def _cuml(**params: object) -> CumlHDBSCAN:
    return CumlHDBSCAN(**params)


@register_backend("hdbscan", "sklearn", kind="cpu", priority=0, availability=requires("sklearn"),
                  description="scikit-learn HDBSCAN")
def _sklearn(**params: object) -> SklearnHDBSCAN:
    return SklearnHDBSCAN(**params)
