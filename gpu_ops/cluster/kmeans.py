"""k-means backends: cuML, FAISS (GPU and CPU), scikit-learn, all behind the estimator protocol.

Every backend takes ``n_clusters, max_iter, n_init, seed`` and after ``fit(X)`` exposes
``labels_`` (n,), ``cluster_centers_`` (k, d), ``inertia_`` (sum of squared distances to the
nearest centre, float) and ``n_iter_``. Results are always host (numpy) arrays, whichever
device computed them. GPU packages are imported inside ``fit``, so a CPU install imports cleanly.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gpu_ops._validation import as_float32_matrix, check_n_clusters
from gpu_ops.device import faiss_has_gpu
from gpu_ops.errors import InputError
from gpu_ops.registry import register_backend, requires


def to_host(a: Any) -> np.ndarray:
    """A numpy copy of ``a``; device arrays (CuPy, anything with ``__cuda_array_interface__``) are copied back."""
    if hasattr(a, "__cuda_array_interface__"):
        import cupy

        return cupy.asnumpy(a)
    if hasattr(a, "to_numpy"):  # cuDF / pandas, should output_type ever be ignored
        return np.asarray(a.to_numpy())
    return np.asarray(a)


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"{name} must be a positive integer; got {value!r}")


class CumlKMeans:
    """cuML ``KMeans`` on the GPU (scalable k-means++ / k-means|| init, Lloyd iterations).

    Parameters
    ----------
    n_clusters : int
    max_iter : int
        Lloyd iterations per restart.
    n_init : int
        Restarts with different seeds; the run with the lowest inertia is kept. One is
        usually enough with k-means|| initialisation (cuML's own ``"auto"`` picks 1).
    seed : int
        cuML ``random_state``.

    Attributes
    ----------
    labels_ : np.ndarray of shape (n,), int64
    cluster_centers_ : np.ndarray of shape (k, d), float32
    inertia_ : float
        Sum of squared distances to the nearest centre (cuML accumulates it in float32).
    n_iter_ : int
    """

    def __init__(self, n_clusters: int = 8, max_iter: int = 300, n_init: int = 1, seed: int = 0, **_: object) -> None:
        self.n_clusters = n_clusters
        self.max_iter = max_iter
        self.n_init = n_init
        self.seed = seed

    def fit(self, X: np.ndarray) -> "CumlKMeans":
        """Fit on ``X`` of shape (n, d); the data is copied to the GPU once."""
        X = as_float32_matrix(X)
        check_n_clusters(self.n_clusters, X.shape[0])
        _check_positive_int("max_iter", self.max_iter)
        _check_positive_int("n_init", self.n_init)
        from cuml.cluster import KMeans

        self._km = KMeans(
            n_clusters=int(self.n_clusters),
            max_iter=int(self.max_iter),
            n_init=int(self.n_init),
            random_state=int(self.seed),
            init="scalable-k-means++",
            output_type="numpy",
        ).fit(X)
        self.labels_ = to_host(self._km.labels_).astype(np.int64)
        self.cluster_centers_ = to_host(self._km.cluster_centers_).astype(np.float32)
        self.inertia_ = float(self._km.inertia_)
        self.n_iter_ = int(self._km.n_iter_)
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Nearest centre for each row of ``X`` (n, d) -> (n,)."""
        return to_host(self._km.predict(as_float32_matrix(X))).astype(np.int64)


class FaissKMeans:
    """FAISS k-means as a scikit-learn style estimator.

    Parameters
    ----------
    n_clusters : int
    max_iter : int
        Lloyd iterations per restart (FAISS ``niter``).
    n_init : int
        Restarts; the run with the lowest objective is kept (FAISS ``nredo``).
    seed : int
    max_points_per_centroid : int or None
        FAISS trains on at most ``k * max_points_per_centroid`` sampled points. None trains on
        every point (FAISS's own default, 256, would silently subsample).
    gpu : bool
        Train on the GPU (needs a GPU build of faiss).
    """

    def __init__(
        self,
        n_clusters: int = 8,
        max_iter: int = 25,
        n_init: int = 1,
        seed: int = 0,
        max_points_per_centroid: int | None = None,
        gpu: bool = False,
    ) -> None:
        self.n_clusters = n_clusters
        self.max_iter = max_iter
        self.n_init = n_init
        self.seed = seed
        self.max_points_per_centroid = max_points_per_centroid
        self.gpu = gpu

    def fit(self, X: np.ndarray) -> "FaissKMeans":
        """Fit on ``X`` of shape (n, d)."""
        import faiss

        X = as_float32_matrix(X)
        n, d = X.shape
        check_n_clusters(self.n_clusters, n)
        mppc = self.max_points_per_centroid or int(np.ceil(n / self.n_clusters)) + 1
        km = faiss.Kmeans(
            d,
            int(self.n_clusters),
            niter=int(self.max_iter),
            nredo=int(self.n_init),
            seed=int(self.seed),
            max_points_per_centroid=int(mppc),
            min_points_per_centroid=1,
            gpu=bool(self.gpu),
            verbose=False,
        )
        km.train(X)
        self._index = km.index
        self.cluster_centers_ = np.asarray(km.centroids, dtype=np.float32)
        dist, idx = km.index.search(X, 1)
        self.labels_ = idx[:, 0].astype(np.int64)
        self.inertia_ = float(dist[:, 0].astype(np.float64).sum())
        self.n_iter_ = int(self.max_iter)
        self.objective_history_ = [float(v) for v in km.obj]
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Nearest centre for each row of ``X`` (n, d) -> (n,)."""
        _, idx = self._index.search(as_float32_matrix(X), 1)
        return idx[:, 0].astype(np.int64)


class SklearnKMeans:
    """scikit-learn ``KMeans`` (Lloyd, k-means++ init) with the common parameter names."""

    def __init__(self, n_clusters: int = 8, max_iter: int = 300, n_init: int = 10, seed: int = 0, **_: object) -> None:
        self.n_clusters = n_clusters
        self.max_iter = max_iter
        self.n_init = n_init
        self.seed = seed

    def fit(self, X: np.ndarray) -> "SklearnKMeans":
        """Fit on ``X`` of shape (n, d)."""
        from sklearn.cluster import KMeans

        X = as_float32_matrix(X)
        check_n_clusters(self.n_clusters, X.shape[0])
        self._km = KMeans(
            n_clusters=int(self.n_clusters),
            max_iter=int(self.max_iter),
            n_init=int(self.n_init),
            random_state=int(self.seed),
            algorithm="lloyd",
        ).fit(X)
        self.labels_ = self._km.labels_.astype(np.int64)
        self.cluster_centers_ = self._km.cluster_centers_.astype(np.float32)
        self.inertia_ = float(self._km.inertia_)
        self.n_iter_ = int(self._km.n_iter_)
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self._km.predict(as_float32_matrix(X)).astype(np.int64)


@register_backend(
    "kmeans", "cuml", kind="gpu", priority=0, availability=requires("cuml", gpu=True),
    description="cuML KMeans on the GPU (k-means|| init)",
)
def _cuml(**params: object) -> CumlKMeans:
    return CumlKMeans(**params)


@register_backend(
    "kmeans", "faiss-gpu", kind="gpu", priority=1,
    availability=lambda: (True, "faiss GPU build sees a GPU") if faiss_has_gpu() else (False, "faiss GPU build or GPU not available"),
    description="FAISS k-means on the GPU",
)
def _faiss_gpu(**params: object) -> FaissKMeans:
    return FaissKMeans(**params, gpu=True)


@register_backend(
    "kmeans", "faiss-cpu", kind="cpu", priority=0, availability=requires("faiss"),
    description="FAISS k-means on the CPU (BLAS distance kernels, multi-threaded)",
)
def _faiss_cpu(**params: object) -> FaissKMeans:
    return FaissKMeans(**params, gpu=False)


@register_backend(
    "kmeans", "sklearn", kind="cpu", priority=1, availability=requires("sklearn"),
    description="scikit-learn KMeans (Lloyd, k-means++)",
)
def _sklearn(**params: object) -> SklearnKMeans:
    return SklearnKMeans(**params)
