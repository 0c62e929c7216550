"""Exact k-nearest-neighbour search: the ``knn`` op (FAISS GPU/CPU, cuML, scikit-learn).

Every backend speaks one protocol: ``fit(X)`` indexes the rows of ``X`` (n, d);
``kneighbors(queries=None, n_neighbors=10)`` returns ``(distances, indices)``, both (m, n_neighbors),
nearest first. Without ``queries`` the indexed rows are the queries and each row's own entry is left
out (the usual "neighbours of every point" graph that SCAN, TEMI, duplicates and outliers mine).
Distances are Euclidean, or ``1 - cosine similarity`` with ``metric="cosine"``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gpu_ops.backend_table import register_backend, requires
from gpu_ops.errors import InputError

METRICS = ("euclidean", "cosine")

#: Queries are searched this many rows at a time, so the (rows, k) results of a huge store and
#: FAISS's distance blocks stay small.
QUERY_BATCH_ROWS = 16_384


def _checked_metric(metric: str) -> str:
    if metric not in METRICS:
        raise InputError(f"unknown knn metric {metric!r}; expected one of: {', '.join(METRICS)}")
    return metric


def _prepared(X: np.ndarray, metric: str) -> np.ndarray:
    """float32, C-contiguous, rows L2-normalised for the cosine metric."""
    X = np.ascontiguousarray(X, dtype=np.float32)
    if metric == "cosine":
        X = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    return X


def drop_self(dist: np.ndarray, idx: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Remove each query row's own entry from a (m, k+1) result; (m, k) remains.

    The query itself is usually first, but with exact duplicates a twin may come first: the
    column holding the row's own index is removed, or the last column when it is not there.
    """
    is_self = idx == rows[:, None]
    is_self[~is_self.any(axis=1), -1] = True
    is_self &= np.cumsum(is_self, axis=1) == 1  # only the first match per row
    keep = ~is_self
    m, k1 = idx.shape
    return dist[keep].reshape(m, k1 - 1), idx[keep].reshape(m, k1 - 1)


class _FlatKnn:
    """Shared search loop: subclasses provide ``_search(Q, k) -> (dist, idx)`` on prepared rows."""

    def __init__(self, metric: str = "euclidean") -> None:
        self.metric = metric

    def fit(self, X: np.ndarray) -> "_FlatKnn":
        self.metric = _checked_metric(self.metric)
        self._X = _prepared(X, self.metric)
        self.n_ = self._X.shape[0]
        self._build(self._X)
        return self

    def _build(self, X: np.ndarray) -> None:
        raise NotImplementedError

    def _search(self, Q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def kneighbors(self, queries: np.ndarray | None = None,
                   n_neighbors: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """(distances float32 (m, n_neighbors), indices int64 (m, n_neighbors)), nearest first."""
        own = queries is None
        available = self.n_ - 1 if own else self.n_
        if not 1 <= n_neighbors <= available:
            raise InputError(f"n_neighbors={n_neighbors} must be between 1 and {available} "
                             f"(the {self.n_} indexed rows{' minus the query itself' if own else ''})")
        Q = self._X if own else _prepared(queries, self.metric)  # type: ignore[arg-type]
        k = n_neighbors + 1 if own else n_neighbors
        dists, idxs = [], []
        for start in range(0, Q.shape[0], QUERY_BATCH_ROWS):
            dist, idx = self._search(Q[start:start + QUERY_BATCH_ROWS], k)
            if own:
                dist, idx = drop_self(dist, idx, np.arange(start, start + dist.shape[0]))
            dists.append(dist)
            idxs.append(idx)
        dist = np.concatenate(dists).astype(np.float32)
        idx = np.concatenate(idxs).astype(np.int64)
        return self._distance(dist), idx

    def _distance(self, raw: np.ndarray) -> np.ndarray:
        return raw


class FaissKnn(_FlatKnn):
    """Exact search with a FAISS flat index (L2, or inner product on normalised rows), CPU or GPU."""

    def __init__(self, metric: str = "euclidean", gpu: bool = False) -> None:
        super().__init__(metric)
        self.gpu = gpu

    def _build(self, X: np.ndarray) -> None:
        from gpu_ops.cluster.kmeans import import_faiss

        faiss = import_faiss()
        index: Any = faiss.IndexFlatIP(X.shape[1]) if self.metric == "cosine" else faiss.IndexFlatL2(X.shape[1])
        if self.gpu:
            self._resources = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._resources, 0, index)
        index.add(X)
        self._index = index

    def _search(self, Q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self._index.search(Q, k)

    def _distance(self, raw: np.ndarray) -> np.ndarray:
        if self.metric == "cosine":
            return np.clip(1.0 - raw, 0.0, 2.0)
        return np.sqrt(np.maximum(raw, 0.0))


class CumlKnn(_FlatKnn):
    """cuML ``NearestNeighbors(algorithm="brute")`` on the GPU (distances already Euclidean/cosine)."""

    def _build(self, X: np.ndarray) -> None:
        from cuml.neighbors import NearestNeighbors

        self._model = NearestNeighbors(algorithm="brute", metric=self.metric, output_type="numpy").fit(X)

    def _search(self, Q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self._model.kneighbors(Q, n_neighbors=k)


class SklearnKnn(_FlatKnn):
    """scikit-learn brute-force ``NearestNeighbors``."""

    def _build(self, X: np.ndarray) -> None:
        from sklearn.neighbors import NearestNeighbors

        self._model = NearestNeighbors(algorithm="brute", metric=self.metric).fit(X)

    def _search(self, Q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self._model.kneighbors(Q, n_neighbors=k)


def _faiss_gpu_check() -> tuple[bool, str]:
    from gpu_ops.cluster.sources import faiss_gpu_usable

    return (True, "faiss GPU build sees a GPU") if faiss_gpu_usable() else (False, "faiss GPU build or GPU not available")


@register_backend("knn", "faiss-gpu", kind="gpu", priority=0, availability=_faiss_gpu_check,
                  description="FAISS exact (flat) search on the GPU")
def _faiss_gpu(**params: Any) -> FaissKnn:
    return FaissKnn(**params, gpu=True)


@register_backend("knn", "cuml", kind="gpu", priority=1, availability=requires("cuml", gpu=True),
                  description="cuML brute-force NearestNeighbors on the GPU")
def _cuml(**params: Any) -> CumlKnn:
    return CumlKnn(**params)


@register_backend("knn", "faiss-cpu", kind="cpu", priority=0, availability=requires("faiss"),
                  description="FAISS exact (flat) search on the CPU")
def _faiss_cpu(**params: Any) -> FaissKnn:
    return FaissKnn(**params, gpu=False)


@register_backend("knn", "sklearn", kind="cpu", priority=1, availability=requires("sklearn"),
                  description="scikit-learn brute-force NearestNeighbors")
def _sklearn(**params: Any) -> SklearnKnn:
    return SklearnKnn(**params)
