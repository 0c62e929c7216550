"""UMAP backends: cuML and umap-learn.

umap-learn compiles its numba kernels on first use; :func:`enable_numba_cache` points numba's
on-disk cache at a persistent directory so the cost is paid once, not on every run.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from gpu_ops._validation import as_float32_matrix
from gpu_ops.errors import InputError
from gpu_ops.reduce.pca import to_host
from gpu_ops.registry import register_backend, requires


def enable_numba_cache() -> None:
    """Use a persistent numba cache unless the user chose one (must run before numba imports)."""
    if "NUMBA_CACHE_DIR" not in os.environ:
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gpuclust" / "numba"
        cache.mkdir(parents=True, exist_ok=True)
        os.environ["NUMBA_CACHE_DIR"] = str(cache)


def check_n_neighbors(n_neighbors: int, n_samples: int) -> None:
    """UMAP needs more samples than neighbours."""
    if isinstance(n_neighbors, bool) or not isinstance(n_neighbors, (int, np.integer)) or n_neighbors < 2:
        raise InputError(f"n_neighbors must be an integer >= 2; got {n_neighbors!r}")
    if n_samples <= int(n_neighbors):
        raise InputError(f"UMAP with n_neighbors={n_neighbors} needs more than {n_neighbors} samples; got {n_samples}")


class CumlUMAP:
    """cuML UMAP on the GPU; ``embedding_`` (n, n_components).

    Parameters
    ----------
    n_components : int
    n_neighbors : int
    min_dist : float
    seed : int
        cuML ``random_state``: reproducible maps, at some cost in speed (cuML serialises the
        floating-point additions of the optimiser to get them).
    metric : str
        Any metric cuML UMAP accepts for dense input ("euclidean", "cosine", ...).

    Attributes
    ----------
    embedding_ : np.ndarray of shape (n, n_components), float32
    """

    def __init__(self, n_components: int = 2, n_neighbors: int = 15, min_dist: float = 0.1, seed: int = 0,
                 metric: str = "euclidean", **_: object) -> None:
        self.n_components = n_components
        self.n_neighbors = n_neighbors
        self.min_dist = min_dist
        self.seed = seed
        self.metric = metric

    def fit(self, X: np.ndarray) -> "CumlUMAP":
        """Embed ``X`` of shape (n, d)."""
        X = as_float32_matrix(X)
        check_n_neighbors(self.n_neighbors, X.shape[0])
        if isinstance(self.n_components, bool) or not isinstance(self.n_components, (int, np.integer)) or self.n_components < 1:
            raise InputError(f"n_components must be a positive integer; got {self.n_components!r}")
        if float(self.min_dist) < 0:
            raise InputError(f"min_dist must be >= 0; got {self.min_dist!r}")
        from cuml.manifold import UMAP

        model = UMAP(
            n_components=int(self.n_components),
            n_neighbors=int(self.n_neighbors),
            min_dist=float(self.min_dist),
            metric=self.metric,
            random_state=int(self.seed),
            output_type="numpy",
        )
        self.embedding_ = to_host(model.fit_transform(X)).astype(np.float32)
        return self

    def fit_transform(self, X: np.ndarray) -> np.ndarray:
        return self.fit(X).embedding_


class UmapLearn:
    """umap-learn UMAP; ``embedding_`` (n, n_components)."""

    def __init__(self, n_components: int = 2, n_neighbors: int = 15, min_dist: float = 0.1, seed: int = 0,
                 metric: str = "euclidean", **_: object) -> None:
        self.n_components = n_components
        self.n_neighbors = n_neighbors
        self.min_dist = min_dist
        self.seed = seed
        self.metric = metric

    def fit(self, X: np.ndarray) -> "UmapLearn":
        enable_numba_cache()
        import umap

        X = as_float32_matrix(X)
        check_n_neighbors(self.n_neighbors, X.shape[0])
        model = umap.UMAP(
            n_components=int(self.n_components),
            n_neighbors=int(self.n_neighbors),
            min_dist=float(self.min_dist),
            metric=self.metric,
            random_state=int(self.seed),
        )
        with warnings.catch_warnings():
            # umap-learn warns that a fixed random_state disables its parallelism: that is the intent.
            warnings.filterwarnings("ignore", message="n_jobs value", category=UserWarning)
            self.embedding_ = np.asarray(model.fit_transform(X), dtype=np.float32)
        return self

    def fit_transform(self, X: np.ndarray) -> np.ndarray:
        return self.fit(X).embedding_


@register_backend("umap", "cuml", kind="gpu", priority=0, availability=requires("cuml", gpu=True),
                  description="cuML UMAP on the GPU")
def _cuml(**params: object) -> CumlUMAP:
    return CumlUMAP(**params)


@register_backend("umap", "umap-learn", kind="cpu", priority=0, availability=requires("umap"),
                  description="umap-learn (numba)")
def _umap_learn(**params: object) -> UmapLearn:
    return UmapLearn(**params)
