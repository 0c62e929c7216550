"""2-D maps of more rows than a reducer can fit: fit on a sample, place the rest.

UMAP and t-SNE cost far more than linear time and memory in the rows they fit, so a map of a large
store is fitted on a uniform sample of ``m`` rows (:func:`map_fit_rows`: at most
:data:`MAP_FIT_ROWS`, fewer when ``memory_mb`` is small) and every other row is *placed*
(:func:`place_rows`): at the distance-weighted mean of the 2-D positions of its
:data:`PLACE_NEIGHBORS` nearest fitted rows within its nearest cell (:class:`CellIndex`: k-means
cells of the fitted rows, an IVF-Flat search with one probe).
That is how umap-learn's ``UMAP.transform`` starts new points (``init_graph_transform``: a weighted
average of the neighbours' embedding positions) and how openTSNE's ``prepare_partial`` starts them
(the median of the neighbours' positions); the placement skips their optimisation epochs, which on
two CPU cores cost far more than the fit itself at millions of rows, so the map stays linear in n.
PCA needs no sample at all: it is fitted on the sample and ``transform`` maps every row exactly.

The rows stream from the store in batches (``batch_rows``), so memory is bounded by the sample,
the index and one batch, plus the (n, 2) float32 map itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

#: The most rows a UMAP / t-SNE map is fitted on; larger stores are sampled (time: a UMAP fit of
#: 20 000 x 256 rows takes ~30-60 s on two CPU cores).
MAP_FIT_ROWS = 20_000
#: Fitted rows whose 2-D positions place each other row.
PLACE_NEIGHBORS = 10
#: Bytes per fitted row a UMAP / t-SNE fit needs besides the row itself (neighbour graph, trees,
#: gradients), for :func:`map_fit_rows`.
FIT_OVERHEAD_BYTES = 2048
#: Share of ``memory_mb`` the fitted sample (and its fit) may take.
FIT_FRACTION = 0.25


@dataclass(frozen=True)
class MapPlan:
    """How a map of ``n`` rows was made: fitted on ``fitted_rows`` of them, the rest placed by ``placement``."""

    n: int
    fitted_rows: int
    placement: str | None  #: None: every row was fitted

    def as_dict(self) -> dict[str, Any]:
        return {"n": self.n, "fitted_rows": self.fitted_rows, "placement": self.placement}


def map_fit_rows(n: int, d: int, memory_mb: int | None, requested: int | None = None) -> int:
    """Rows to fit a map on: ``requested`` (else :data:`MAP_FIT_ROWS`), no more than ``n`` and no
    more than :data:`FIT_FRACTION` of ``memory_mb`` holds (each row: ``4 d`` bytes plus
    :data:`FIT_OVERHEAD_BYTES`), and at least 2."""
    rows = int(requested) if requested is not None else MAP_FIT_ROWS
    if memory_mb is not None:
        rows = min(rows, int(FIT_FRACTION * memory_mb * 2**20 // (4 * d + FIT_OVERHEAD_BYTES)))
    return max(2, min(n, rows))


def placement_text(reducer: str) -> str:
    """How rows outside the fitted sample get their position, in words (metrics.json, the report)."""
    if reducer == "pca":
        return "projected with the PCA fitted on the sample (exact)"
    return (f"placed at the distance-weighted mean of the 2-D positions of their {PLACE_NEIGHBORS} nearest "
            f"fitted points within their nearest cell (k-means cells of the fitted points), as {reducer} "
            "transform initialises new points")


class CellIndex:
    """Nearest fitted rows of a query, searched in its nearest cell only (FAISS's IVF-Flat with one
    probe), each cell's search one BLAS product for all its queries of a batch.

    FAISS's own IVF search scans list by list per query: on two busy CPU cores (load 15) it placed
    23 000 rows of 256-d among 20 000 fitted rows in 30 s (8 probes) or 2.5 s (one probe); the
    grouped products on one BLAS thread take 0.9 s (3-4 s on two: small products spend their time
    waiting for the other thread).
    """

    def __init__(self, fitted: np.ndarray, seed: int = 0, backend: str = "auto") -> None:
        from gpu_ops.registry import create_estimator

        self.fitted = np.ascontiguousarray(fitted, dtype=np.float32)
        n_cells = int(max(1, min(math.sqrt(len(fitted)), len(fitted) // 39)))
        est, _ = create_estimator("kmeans", backend, n_clusters=n_cells, n_init=1, max_iter=10, seed=seed)
        est.fit(self.fitted)
        self.centres = np.asarray(est.cluster_centers_, dtype=np.float32)
        cells = np.asarray(est.labels_, dtype=np.int64)
        self.members = [np.flatnonzero(cells == c) for c in range(n_cells)]
        self.sq = np.einsum("ij,ij->i", self.fitted, self.fitted)

    def search(self, X: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(squared distances (b, k) float32, fitted row numbers (b, k) int64, -1 where a cell has fewer)."""
        from threadpoolctl import threadpool_limits

        from gpu_ops.cluster.sources import NearestCentre

        X = np.ascontiguousarray(X, dtype=np.float32)
        cell, _ = NearestCentre(self.centres)(X)
        with threadpool_limits(1, user_api="blas"):  # many small products: threads only wait on each other
            return self._search_cells(X, cell, k)

    def _search_cells(self, X: np.ndarray, cell: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        dist = np.full((len(X), k), np.inf, dtype=np.float32)
        idx = np.full((len(X), k), -1, dtype=np.int64)
        xsq = np.einsum("ij,ij->i", X, X)
        for c in np.unique(cell):
            q = np.flatnonzero(cell == c)
            m = self.members[c]
            if not len(m):
                continue
            D = X[q] @ self.fitted[m].T
            D *= -2.0
            D += self.sq[m][None, :]
            D += xsq[q][:, None]
            kk = min(k, len(m))
            part = np.argpartition(D, kk - 1, axis=1)[:, :kk] if kk < len(m) else np.tile(np.arange(len(m)), (len(q), 1))
            dist[q, :kk] = np.take_along_axis(D, part, axis=1)
            idx[q, :kk] = m[part]
        return np.maximum(dist, 0), idx


def neighbour_positions(dist: np.ndarray, idx: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Distance-weighted mean (weights ``1 / (distance + eps)``) of the 2-D positions ``xy[idx]``;
    ``dist`` squared L2 distances (b, k), ``idx`` (b, k) with -1 for a missing neighbour."""
    valid = idx >= 0
    w = np.where(valid, 1.0 / (np.sqrt(np.where(valid, dist, 0)) + 1e-6), 0.0)
    w_sum = w.sum(axis=1, keepdims=True)
    w = np.divide(w, w_sum, out=np.full_like(w, 1.0 / w.shape[1]), where=w_sum > 0)
    pos = xy[np.where(valid, idx, 0)]
    return np.einsum("bk,bkd->bd", w, pos).astype(np.float32)


def place_rows(batches: Iterator[np.ndarray], n: int, fitted_rows: np.ndarray, fitted: np.ndarray,
               fitted_xy: np.ndarray, *, seed: int = 0,
               transform: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """The (n, 2) float32 map of every row: the fitted rows (sorted row numbers ``fitted_rows``,
    their vectors ``fitted`` and positions ``fitted_xy``) keep their positions, the others are
    placed batch by batch (``transform``: map a batch exactly, e.g. PCA; else the neighbour placement)."""
    out = np.empty((n, 2), dtype=np.float32)
    index = None if transform is not None else CellIndex(fitted, seed)
    start = 0
    for X in batches:
        stop = start + len(X)
        if transform is not None:
            out[start:stop] = transform(X)
        else:
            k = min(PLACE_NEIGHBORS, len(fitted))
            dist, idx = index.search(X, k)  # type: ignore[union-attr]
            out[start:stop] = neighbour_positions(dist, idx, fitted_xy)
        start = stop
    if start != n:  # pragma: no cover - the footers promised other row counts
        raise RuntimeError(f"expected {n} rows, read {start}")
    out[fitted_rows] = fitted_xy
    return out
