"""2-D maps of more rows than a reducer can fit: fit on a sample, place the rest.

UMAP and t-SNE cost far more than linear time and memory in the rows they fit, so a map of a large
store is fitted on a uniform sample of ``m`` rows (:func:`map_fit_rows`: at most
:data:`MAP_FIT_ROWS`, fewer when ``memory_mb`` is small) and every other row is *placed*
(:func:`place_rows`): at the distance-weighted mean of the 2-D positions of its
:data:`PLACE_NEIGHBORS` nearest fitted rows, found in a FAISS IVF-Flat index over the fitted rows.
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
#: Inverted lists probed per query of the placement index.
PLACE_NPROBE = 8
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
            f"fitted points (FAISS IVF-Flat search), as {reducer} transform initialises new points")


def _placement_index(fitted: np.ndarray, seed: int) -> Any:
    from gpu_ops.explore.search import build_ivf

    nlist = int(max(1, min(math.sqrt(len(fitted)), len(fitted) // 39)))
    index = build_ivf(fitted, nlist, seed, gpu=False)
    index.nprobe = min(PLACE_NPROBE, nlist)
    return index


def neighbour_positions(dist: np.ndarray, idx: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Distance-weighted mean (weights ``1 / (distance + eps)``) of the 2-D positions ``xy[idx]``;
    ``dist`` squared L2 distances (b, k), ``idx`` (b, k) with -1 for a missing neighbour."""
    valid = idx >= 0
    w = np.where(valid, 1.0 / (np.sqrt(np.maximum(dist, 0)) + 1e-6), 0.0)
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
    index = None if transform is not None else _placement_index(fitted, seed)
    start = 0
    for X in batches:
        stop = start + len(X)
        if transform is not None:
            out[start:stop] = transform(X)
        else:
            k = min(PLACE_NEIGHBORS, len(fitted))
            dist, idx = index.search(np.ascontiguousarray(X, dtype=np.float32), k)
            out[start:stop] = neighbour_positions(dist, idx, fitted_xy)
        start = stop
    if start != n:  # pragma: no cover - the footers promised other row counts
        raise RuntimeError(f"expected {n} rows, read {start}")
    out[fitted_rows] = fitted_xy
    return out
