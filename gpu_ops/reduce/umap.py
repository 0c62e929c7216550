"""UMAP backends: cuML and umap-learn.

umap-learn compiles its numba kernels on first use; :func:`enable_numba_cache` points numba's
on-disk cache at a persistent directory so the cost is paid once, not on every run.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from gpu_ops._validation import as_float32_matrix
from gpu_ops.errors import InputError
from gpu_ops.registry import register_backend, requires


def enable_numba_cache() -> None:
    """Use a persistent numba cache unless the user chose one (must run before numba imports)."""
    if "NUMBA_CACHE_DIR" not in os.environ:
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gpuclust" / "numba"
        cache.mkdir(parents=True, exist_ok=True)
        os.environ["NUMBA_CACHE_DIR"] = str(cache)


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
        if X.shape[0] <= int(self.n_neighbors):
            raise InputError(f"UMAP with n_neighbors={self.n_neighbors} needs more than {self.n_neighbors} samples; got {X.shape[0]}")
        model = umap.UMAP(
            n_components=int(self.n_components),
            n_neighbors=int(self.n_neighbors),
            min_dist=float(self.min_dist),
            metric=self.metric,
            random_state=int(self.seed),
        )
        self.embedding_ = np.asarray(model.fit_transform(X), dtype=np.float32)
        return self

    def fit_transform(self, X: np.ndarray) -> np.ndarray:
        return self.fit(X).embedding_


@register_backend("umap", "umap-learn", kind="cpu", priority=0, availability=requires("umap"),
                  description="umap-learn (numba)")
def _umap_learn(**params: object) -> UmapLearn:
    return UmapLearn(**params)
