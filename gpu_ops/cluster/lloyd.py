"""The Lloyd driver: the one k-means loop of this package, over any :mod:`~gpu_ops.cluster.sources` source.

Modelled on FAISS ``contrib/clustering.py``'s ``kmeans()``: the driver holds the centroids, asks
the source for an assignment (nearest centroids, per-cluster sums and counts) once per iteration
and moves every centroid to the mean of its rows. Where the rows live (an array, a Parquet store
streamed within a memory budget, Dask workers) is the source's business. The streaming k-means
(:class:`~gpu_ops.cluster.kmeans_ooc.StreamingKMeans`) and the Dask k-means
(:func:`gpu_ops.distributed.dask_kmeans`) both refine an initial fit with it; the library
estimators (FAISS's ``Kmeans``, cuML's and scikit-learn's ``KMeans``) run their own loops and are
backends, not users, of this one.
"""

from __future__ import annotations

import logging
import math
import numbers
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from gpu_ops._validation import check_int
from gpu_ops.cluster.kmeans import INITS, best_kmeans_plusplus, seeding_rows
from gpu_ops.cluster.sources import KMeansSource
from gpu_ops.errors import InputError

log = logging.getLogger(__name__)


@dataclass
class IterationStats:
    """One Lloyd iteration: the objective of the centroids it started from, and what it moved."""

    iteration: int
    #: Sum of squared distances of every row to its nearest centroid, before this update.
    objective: float
    #: Centroids no row was assigned to; they keep their position.
    empty: int
    seconds: float


@dataclass
class LloydResult:
    """The driver's answer. ``labels``, ``counts`` and ``inertia`` belong to the final centroids
    (one more assignment after the last update); ``labels`` is None when not asked for."""

    centroids: np.ndarray
    labels: np.ndarray | None
    counts: np.ndarray
    inertia: float
    n_iter: int
    converged: bool
    init: str
    history: list[IterationStats] = field(default_factory=list)
    #: Seconds of the seeding (0 for given centroids) and of the final assignment.
    seed_seconds: float = 0.0
    assign_seconds: float = 0.0


def seed_centroids(source: KMeansSource, k: int, *, seeding: str = "k-means++", seed: int = 0,
                   n_seedings: int = 1, seed_rows: int | None = None, max_iter: int = 25) -> tuple[np.ndarray, str]:
    """Initial centroids drawn from ``source.subset``: ``(centroids (k, d) float32, seeding used)``.

    ``k-means++``: the best of ``n_seedings`` greedy k-means++ seedings
    (:func:`~gpu_ops.cluster.kmeans.best_kmeans_plusplus`) of a subset sized by
    :func:`~gpu_ops.cluster.kmeans.seeding_rows` (at most ``seed_rows``); when k-means++ would
    cost more than Lloyd's iterations allow, ``random``. ``random``: ``k`` distinct rows.
    """
    if seeding not in INITS:
        raise InputError(f"unknown seeding {seeding!r}; expected one of: {', '.join(INITS)}")
    n, d = source.count(), source.dim()
    if seeding == "k-means++" and k > 1:
        rows, tries = seeding_rows(n, k, d, n_seedings, seed_rows, max(1, max_iter))
        if rows:
            sample = source.subset(rows, seed)
            return best_kmeans_plusplus(sample, k, tries, np.random.default_rng(seed)), "k-means++"
        log.info("lloyd: k-means++ seeding of k=%d in %d-d on %d rows would cost more than the iterations allow; "
                 "random rows instead", k, d, n)
    return np.ascontiguousarray(source.subset(k, seed), dtype=np.float32), "random"


def lloyd(source: KMeansSource, k: int, *, init_centroids: np.ndarray | None = None, seeding: str = "k-means++",
          max_iter: int = 25, tol: float = 1e-4, seed: int = 0, n_seedings: int = 1, seed_rows: int | None = None,
          with_labels: bool = True, labels_out: np.ndarray | None = None,
          on_iteration: Callable[[IterationStats], None] | None = None) -> LloydResult:
    """Lloyd's k-means over ``source``, from ``init_centroids`` or a ``seeding`` of its rows.

    Each iteration assigns every row and moves each centroid to the mean of its rows (float64
    sums); a centroid that gets no row keeps its position (counted in ``empty``). It stops after
    ``max_iter`` iterations, or once the objective improves by no more than ``tol`` times itself
    (``tol=0``: once it stops decreasing). A final assignment gives the labels, counts and inertia
    of the final centroids; ``max_iter=0`` only assigns. ``labels_out`` (n,) int64 (e.g. a
    ``np.memmap``) receives the labels instead of a new array. ``on_iteration`` sees each
    iteration's :class:`IterationStats` as it ends.
    """
    n, d = source.count(), source.dim()
    k = check_int("n_clusters", k)
    max_iter = check_int("max_iter", max_iter, minimum=0)
    if k > n:
        raise InputError(f"k={k} is larger than the number of rows ({n})")
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not math.isfinite(tol) or tol < 0:
        raise InputError(f"tol must be a non-negative number; got {tol!r}")
    t0 = time.perf_counter()
    if init_centroids is None:
        centroids, init = seed_centroids(source, k, seeding=seeding, seed=seed, n_seedings=n_seedings,
                                         seed_rows=seed_rows, max_iter=max_iter)
    else:
        centroids, init = np.asarray(init_centroids), "given"
        if centroids.shape != (k, d):
            raise InputError(f"init_centroids must have shape ({k}, {d}); got {centroids.shape}")
    centroids = np.array(centroids, dtype=np.float32)  # a copy: the caller's array is left alone
    seed_seconds = time.perf_counter() - t0

    history: list[IterationStats] = []
    previous, converged = math.inf, False
    for it in range(1, max_iter + 1):
        t0 = time.perf_counter()
        a = source.assign_to(centroids, with_labels=False)
        filled = a.counts > 0
        centroids[filled] = (a.sums[filled] / a.counts[filled, None]).astype(np.float32)
        stats = IterationStats(it, a.inertia, int(k - filled.sum()), time.perf_counter() - t0)
        history.append(stats)
        if on_iteration is not None:
            on_iteration(stats)
        if previous - a.inertia <= tol * max(a.inertia, 1e-12):
            converged = True
            break
        previous = a.inertia

    t0 = time.perf_counter()
    final = source.assign_to(centroids, with_labels=with_labels, labels_out=labels_out)
    return LloydResult(centroids=centroids, labels=final.labels, counts=final.counts, inertia=final.inertia,
                       n_iter=len(history), converged=converged, init=init, history=history,
                       seed_seconds=seed_seconds, assign_seconds=time.perf_counter() - t0)
