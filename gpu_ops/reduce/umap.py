"""UMAP backends: cuML and umap-learn.

umap-learn compiles its numba kernels on first use, in every new process. Pointing numba's
on-disk cache at a persistent directory (:func:`enable_numba_cache`) is not enough by itself:
umap-learn 0.5 asks numba to cache only one of its kernels (pynndescent caches most of its own),
so a second process still recompiled most of UMAP. :func:`import_umap` therefore imports
umap-learn with ``cache=True`` made the default of ``numba.njit`` / ``numba.jit`` for the
duration of the import (numba's decorators are restored afterwards), so every kernel that numba
can cache is written to the cache once and loaded by later processes. Kernels numba cannot cache
(closures over dynamic globals, and pynndescent's NNDescent kernels, which take jitted distance
functions as arguments) are compiled as before; :class:`UmapLearn` therefore builds the kNN graph
exactly with FAISS when that is cheap (``knn="auto"``), so that path never touches NNDescent.
Measured figures: BENCHMARKS.md.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from pathlib import Path

import numpy as np

from gpu_ops._validation import as_float32_matrix
from gpu_ops.errors import InputError
from gpu_ops.reduce.pca import to_host
from gpu_ops.backend_table import register_backend, requires


def enable_numba_cache() -> None:
    """Use a persistent numba cache unless the user chose one.

    Sets ``NUMBA_CACHE_DIR``; when numba is already imported (its config read the environment at
    import time) ``numba.config.CACHE_DIR`` is set too, which numba consults whenever a cached
    function is defined.
    """
    if "NUMBA_CACHE_DIR" not in os.environ:
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gpuclust" / "numba"
        cache.mkdir(parents=True, exist_ok=True)
        os.environ["NUMBA_CACHE_DIR"] = str(cache)
    numba = sys.modules.get("numba")
    if numba is not None and not getattr(numba.config, "CACHE_DIR", ""):
        numba.config.CACHE_DIR = os.environ["NUMBA_CACHE_DIR"]


def import_umap():  # noqa: ANN201 - returns the umap module
    """Import umap-learn with numba's on-disk cache enabled for all of its kernels (see module doc).

    Only the first import in a process does this; the patch of ``numba.njit`` / ``numba.jit`` is
    undone before returning, so other libraries are unaffected.
    """
    if "umap" in sys.modules:
        return sys.modules["umap"]
    enable_numba_cache()
    import numba

    originals = {name: getattr(numba, name) for name in ("njit", "jit")}

    def caching(decorator):  # noqa: ANN001, ANN202
        @functools.wraps(decorator)
        def wrapper(*args, **kwargs):  # noqa: ANN202
            kwargs.setdefault("cache", True)
            return decorator(*args, **kwargs)

        return wrapper

    try:
        for name, decorator in originals.items():
            setattr(numba, name, caching(decorator))
        with warnings.catch_warnings():
            # numba warns (once per kernel) where a kernel cannot be cached; it still compiles it
            warnings.filterwarnings("ignore", message=".*[Cc]annot cache.*")
            import umap
    finally:
        for name, decorator in originals.items():
            setattr(numba, name, decorator)
    return umap


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
                 metric: str = "euclidean") -> None:
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


#: ``knn="auto"`` computes the exact kNN graph with FAISS when ``n * n * d`` is at most this (about
#: 5-20 s on two cores: MNIST 10k x 784 is 7.8e10, 70k x 784 is 3.8e12 and goes to NNDescent).
EXACT_KNN_MAX_WORK = 2.5e11
KNN_METHODS = ("auto", "exact", "nndescent")


def exact_knn(X: np.ndarray, n_neighbors: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact Euclidean kNN of every row of ``X`` (n, d) among the rows of ``X``, itself included
    (umap-learn's convention): (indices int64 (n, k), distances float32 (n, k)), by FAISS."""
    from gpu_ops.cluster.kmeans import import_faiss

    faiss = import_faiss()
    index = faiss.IndexFlatL2(X.shape[1])
    index.add(X)
    dist, idx = index.search(X, int(n_neighbors))
    return idx.astype(np.int64), np.sqrt(np.maximum(dist, 0)).astype(np.float32)


class UmapLearn:
    """umap-learn UMAP; ``embedding_`` (n, n_components).

    Parameters
    ----------
    n_components, n_neighbors, min_dist, seed, metric
        As umap-learn's.
    knn : {"auto", "exact", "nndescent"}
        How the kNN graph is built. "nndescent": umap-learn's own (pynndescent). "exact": FAISS
        brute force, handed to umap-learn as ``precomputed_knn``. "auto" (default): exact for the
        Euclidean metric when FAISS is installed and ``n * n * d <= EXACT_KNN_MAX_WORK``, else
        NNDescent. Why: pynndescent's NNDescent kernels take jitted distance functions as
        arguments, which numba cannot cache on disk, so they cost ~30 s of compilation in *every*
        new process (measured: 26 kernels, 31 s, on MNIST 10k); the exact graph is also the one
        NNDescent approximates. ``knn_`` records what ran.
    """

    def __init__(self, n_components: int = 2, n_neighbors: int = 15, min_dist: float = 0.1, seed: int = 0,
                 metric: str = "euclidean", knn: str = "auto") -> None:
        self.n_components = n_components
        self.n_neighbors = n_neighbors
        self.min_dist = min_dist
        self.seed = seed
        self.metric = metric
        self.knn = knn

    def _knn_method(self, X: np.ndarray) -> str:
        if self.knn not in KNN_METHODS:
            raise InputError(f"unknown knn {self.knn!r}; expected one of: {', '.join(KNN_METHODS)}")
        if self.knn != "auto":
            if self.knn == "exact" and self.metric != "euclidean":
                raise InputError(f"knn='exact' supports the euclidean metric only; metric={self.metric!r}")
            return self.knn
        import importlib.util

        n, d = X.shape
        small = float(n) * n * d <= EXACT_KNN_MAX_WORK
        return "exact" if self.metric == "euclidean" and small and importlib.util.find_spec("faiss") else "nndescent"

    def fit(self, X: np.ndarray) -> "UmapLearn":
        umap = import_umap()

        X = as_float32_matrix(X)
        check_n_neighbors(self.n_neighbors, X.shape[0])
        self.knn_ = self._knn_method(X)
        extra = {}
        if self.knn_ == "exact":
            extra["precomputed_knn"] = exact_knn(X, int(self.n_neighbors))
        model = umap.UMAP(
            n_components=int(self.n_components),
            n_neighbors=int(self.n_neighbors),
            min_dist=float(self.min_dist),
            metric=self.metric,
            random_state=int(self.seed),
            **extra,
        )
        with warnings.catch_warnings():
            # umap-learn warns that a fixed random_state disables its parallelism: that is the intent;
            # and that a precomputed kNN graph has no search index for transform(): not used here.
            warnings.filterwarnings("ignore", message="n_jobs value", category=UserWarning)
            warnings.filterwarnings("ignore", message=".*knn_search_index.*", category=UserWarning)
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
