"""Neighbours of a store larger than the memory budget, searched cell by cell.

When the store's embeddings need more than :data:`EMBEDDINGS_SHARE` of the run's ``memory_mb``
(the rule that also decides whether a run keeps its similar-image index), the explore stage does
not load them. Instead (:func:`cell_neighbours`):

1. k-means cells are fitted on a uniform sample of the rows (as the sampled 2-D map's
   :class:`~gpu_ops.reduce.sampled.CellIndex` does), enough cells for the average one to fill
   ``1 / CELL_FILL`` of the rows a cell may hold: what :data:`CELL_FRACTION` of the budget holds
   (:func:`cell_rows_for`), at most :data:`CELL_ROWS_MAX` (time: the searches grow with the
   cells' size);
2. one streaming pass over the store sends every row to its nearest centre's scratch file
   (its vector and its row number), and sums the rows for their mean (the centring of the
   cosine search) and per cluster of the run's first algorithm (the cluster ratio's centres);
3. cells with fewer rows than a search needs (an isolated point often gets a centre of its own)
   join the nearest cell large enough;
4. each cell is searched on its own with the exact ``knn`` op: by cosine of the centred rows for
   near duplicates, by Euclidean distance for the outlier scores. A cell holding more rows than
   the budget allows (k-means cells are uneven) is searched exactly, in blocks: each block of
   its rows is indexed in turn and every block of queries searched against it, the best
   neighbours kept (quadratic in the cell's size, but within the budget, and nothing dropped).

So each row's neighbours are its exact nearest *within its cell*. A near duplicate pair is missed
only when its two rows fall into different cells; a row's k-nearest distance can only come out
larger than the exact one (more so at a cell's border), so isolated points keep high outlier
scores. Memory: the sample, one cell (or two blocks of it), and O(n) small per-row values (a
cell number, distances, the neighbour lists on disk); scratch disk: one copy of the embeddings.

Exact copies (content digests) are found among all items whatever the budget. Perceptual hashes
of image datasets are still searched among all images at once (256 bytes an image).
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from gpu_ops.cluster.neighbors import drop_self
from gpu_ops.explore.duplicates import knn

#: Exact search while the embeddings take at most this share of ``memory_mb``.
EMBEDDINGS_SHARE = 0.25
#: Share of ``memory_mb`` one cell's search may take.
CELL_FRACTION = 0.25
#: Cells are made so that the average one holds ``1 / CELL_FILL`` of the rows a cell may hold.
CELL_FILL = 2
#: The most rows a cell is made for, whatever the budget: the searches cost about
#: ``n * CELL_ROWS_MAX / CELL_FILL * d`` multiply-adds each, not ``n^2 d``.
CELL_ROWS_MAX = 8192
#: Sample rows per cell the cells' k-means is fitted on (when the budget holds them).
SAMPLE_PER_CELL = 40


def fits_in_memory(n: int, d: int, memory_mb: int | None) -> bool:
    """True when ``n`` embeddings of ``d`` float32 values take at most :data:`EMBEDDINGS_SHARE` of
    ``memory_mb`` (always without a budget): the explore stage then searches all rows at once."""
    return memory_mb is None or 4 * n * d <= EMBEDDINGS_SHARE * memory_mb * 2**20


def cell_rows_for(d: int, k: int, memory_mb: int) -> int:
    """Rows one cell's search may hold: :data:`CELL_FRACTION` of ``memory_mb`` over each row's
    share (its vector, the centred copy, the search's normalised copy and the index's copy, ``16 d``
    bytes, plus both searches' ``k + 1`` distances and indices), and at least ``4 (k + 1)``."""
    per_row = 16 * d + 2 * 12 * (k + 1) + 64
    return max(4 * (k + 1), int(CELL_FRACTION * memory_mb * 2**20 // per_row))


@dataclass
class CellNeighbours:
    """What the cell-by-cell search found, per row of the store (n rows)."""

    near_pairs: np.ndarray  #: (m, 2) int64 pairs of rows whose centred cosine reached the threshold
    knn_distance: np.ndarray  #: (n,) mean Euclidean distance to the k nearest within the cell
    lof: np.ndarray  #: (n,) knn_distance over the mean of its neighbours'
    ratio: np.ndarray  #: (n,) cluster ratio (NaN: noise, clusters of one)
    mean: np.ndarray  #: (d,) float64 mean of the rows (the cosine search's centring)
    cells: int  #: cells searched (after small ones joined others)
    largest: int  #: rows of the largest cell
    blocked: int  #: cells searched in blocks (more rows than ``cell_rows``)
    cell_rows: int  #: the most rows a cell's search holds at once
    backend: str  #: the knn backend that ran

    def description(self) -> str:
        """metrics.json's ``neighbours``: how the neighbours were searched."""
        return f"within {self.cells} cells"

    def summary(self) -> dict[str, int]:
        return {"count": self.cells, "largest": self.largest, "searched_in_blocks": self.blocked,
                "cell_rows": self.cell_rows}


class _CellFiles:
    """Per-cell scratch files: ``cell-NNNNN.f32`` (the rows' float32 vectors) and ``.rows`` (their
    int64 row numbers), appended batch by batch."""

    def __init__(self, directory: Path, d: int) -> None:
        self.directory, self.d = directory, d
        directory.mkdir(parents=True, exist_ok=True)

    def path(self, cell: int, suffix: str) -> Path:
        return self.directory / f"cell-{cell:05d}.{suffix}"

    def append(self, cell: int, X: np.ndarray, rows: np.ndarray) -> None:
        with open(self.path(cell, "f32"), "ab") as f:
            f.write(np.ascontiguousarray(X, dtype=np.float32).tobytes())
        with open(self.path(cell, "rows"), "ab") as f:
            f.write(np.ascontiguousarray(rows, dtype=np.int64).tobytes())

    def move_into(self, cell: int, target: int) -> None:
        """Append ``cell``'s rows to ``target``'s files and delete ``cell``'s."""
        for suffix in ("f32", "rows"):
            with open(self.path(target, suffix), "ab") as out, open(self.path(cell, suffix), "rb") as src:
                shutil.copyfileobj(src, out)
            self.path(cell, suffix).unlink()

    def rows(self, cell: int) -> np.ndarray:
        return np.fromfile(self.path(cell, "rows"), dtype=np.int64)

    def vectors(self, cell: int, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of the cell, float32 (stop - start, d)."""
        count = (stop - start) * self.d
        return np.fromfile(self.path(cell, "f32"), dtype=np.float32, count=count,
                           offset=4 * start * self.d).reshape(-1, self.d)


def fit_cells(source: Any, n_cells: int, sample_rows: int, seed: int, backend: str) -> np.ndarray:
    """(n_cells, d) float32 centres of k-means cells fitted on a uniform sample of the source's rows."""
    from gpu_ops.cluster.sources import subset_rows
    from gpu_ops.registry import create_estimator

    sample = source.take(subset_rows(source.count(), sample_rows, seed))
    if n_cells <= 1:
        return sample.mean(axis=0, keepdims=True).astype(np.float32)
    est, _ = create_estimator("kmeans", backend, n_clusters=n_cells, n_init=1, max_iter=10, seed=seed)
    est.fit(sample)
    return np.asarray(est.cluster_centers_, dtype=np.float32)


def blocked_knn(read: Callable[[int, int], np.ndarray], m: int, k: int, metric: str, block: int,
                backend: str) -> tuple[np.ndarray, np.ndarray, str]:
    """Exact ``k`` nearest (self excluded) of ``m`` rows read ``block`` at a time by ``read(start, stop)``:
    ``(distances (m, k), local indices (m, k), backend)``. Each index block is fitted once and
    searched by every query block; the best ``k + 1`` per query are kept, then the query itself dropped."""
    best_d = np.full((m, k + 1), np.inf, np.float32)
    best_i = np.full((m, k + 1), -1, np.int64)
    from gpu_ops.registry import create_estimator

    used = backend
    for lo in range(0, m, block):
        index = read(lo, min(m, lo + block))
        est, res = create_estimator("knn", backend, metric=metric)
        est.fit(index)
        used = res.backend
        kk = min(k + 1, len(index))
        for qlo in range(0, m, block):
            q = read(qlo, min(m, qlo + block)) if qlo != lo else index
            dist, idx = est.kneighbors(queries=q, n_neighbors=kk)
            d = np.concatenate([best_d[qlo:qlo + len(q)], dist], axis=1)
            i = np.concatenate([best_i[qlo:qlo + len(q)], idx + lo], axis=1)
            keep = np.argsort(d, axis=1, kind="stable")[:, :k + 1]
            best_d[qlo:qlo + len(q)] = np.take_along_axis(d, keep, axis=1)
            best_i[qlo:qlo + len(q)] = np.take_along_axis(i, keep, axis=1)
    dist, idx = drop_self(best_d, best_i, np.arange(m))
    return dist, idx, used


def _search(read: Callable[[int, int], np.ndarray], m: int, k: int, metric: str, cap: int,
            backend: str) -> tuple[np.ndarray, np.ndarray, str]:
    """The cell's ``k`` nearest by ``metric``: one ``knn`` search when its ``m`` rows fit ``cap``, else
    :func:`blocked_knn` over blocks of ``cap / 2`` rows (an index block and a query block at a time)."""
    if m <= cap:
        dist, idx, res = knn(read(0, m), k, metric, backend)
        return dist, idx, res.backend
    return blocked_knn(read, m, k, metric, max(k + 1, cap // 2), backend)


def _spill(source: Any, centres: np.ndarray, files: _CellFiles, labels: np.ndarray | None,
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One pass over the store: every row into its nearest centre's files. Returns the rows per
    cell, the rows' float64 mean, and the float64 centres and sizes of the clusters ``labels``."""
    from gpu_ops.cluster.sources import NearestCentre, cluster_sums

    nearest = NearestCentre(centres, source.gpu)
    n_clusters = int(labels.max()) + 1 if labels is not None and labels.size and labels.max() >= 0 else 0
    counts = np.zeros(len(centres), np.int64)
    total = np.zeros(source.dim(), np.float64)
    sums = np.zeros((n_clusters, source.dim()), np.float64)
    sizes = np.zeros(n_clusters, np.int64)
    start = 0
    for X in source.batches():
        rows = np.arange(start, start + len(X))
        cell, _ = nearest(X)
        order = np.argsort(cell, kind="stable")
        bounds = np.concatenate([[0], np.cumsum(np.bincount(cell, minlength=len(centres)))])
        for c in np.flatnonzero(np.diff(bounds)):
            sel = order[bounds[c]:bounds[c + 1]]
            files.append(int(c), X[sel], rows[sel])
        counts += np.diff(bounds)
        total += X.sum(axis=0, dtype=np.float64)
        if n_clusters:
            lab = labels[start:start + len(X)]  # type: ignore[index]
            ok = lab >= 0
            s, c = cluster_sums(X[ok], lab[ok], n_clusters)
            sums += s
            sizes += c
        start += len(X)
    centre_of = sums / np.maximum(sizes, 1)[:, None]
    return counts, total / max(start, 1), centre_of, sizes


def _join_small_cells(files: _CellFiles, centres: np.ndarray, counts: np.ndarray, need: int) -> list[int]:
    """Move the rows of every cell with fewer than ``need`` rows into the nearest cell that has at
    least ``need`` (into the largest cell when none has); return the cells left, with rows."""
    big = np.flatnonzero(counts >= need)
    if big.size == 0:
        big = np.array([int(np.argmax(counts))])
    for c in np.flatnonzero((counts > 0) & (counts < need)):
        if c in big:
            continue
        target = int(big[np.argmin(((centres[big] - centres[c]) ** 2).sum(axis=1))])
        files.move_into(int(c), target)
        counts[target] += counts[c]
        counts[c] = 0
    return [int(c) for c in np.flatnonzero(counts)]


def cell_neighbours(source: Any, k: int, min_cosine: float, labels: np.ndarray | None, memory_mb: int,
                    scratch: Path, *, seed: int = 0, backend: str = "auto",
                    kmeans_backend: str = "auto") -> CellNeighbours:
    """Near-duplicate pairs, outlier scores' neighbour measures and cluster ratios of the rows of
    ``source`` (a :class:`~gpu_ops.cluster.sources.StoreSource`, n >= 2), searched cell by cell
    within ``memory_mb`` (see the module docstring). ``labels``: (n,) clusters for the ratio, or
    None. ``scratch``: a folder for the per-cell files (removed afterwards)."""
    n, d = source.count(), source.dim()
    k = min(int(k), n - 1)
    budget_rows = cell_rows_for(d, k, memory_mb)
    cap = min(budget_rows, max(CELL_ROWS_MAX, 4 * (k + 1)))
    sample_rows = min(n, max(cap, min(budget_rows, SAMPLE_PER_CELL * math.ceil(CELL_FILL * n / cap))))
    n_cells = max(1, min(math.ceil(CELL_FILL * n / cap), sample_rows // 2))
    centres = fit_cells(source, n_cells, sample_rows, seed, kmeans_backend)
    files = _CellFiles(Path(scratch), d)
    try:
        counts, mean, cluster_centres, sizes = _spill(source, centres, files, labels)
        kept = _join_small_cells(files, centres, counts, k + 1)
        knn_distance = np.full(n, np.nan, np.float64)
        to_centre = np.full(n, np.nan, np.float64)
        pairs, used, blocked = [], backend, 0
        block = max(k + 1, cap // 2)
        for c in kept:
            rows = files.rows(c)
            m = len(rows)
            blocked += m > cap

            def raw(lo: int, hi: int, c: int = c) -> np.ndarray:
                return files.vectors(c, lo, hi)

            def centred(lo: int, hi: int, c: int = c) -> np.ndarray:
                return (files.vectors(c, lo, hi) - mean).astype(np.float32)

            dist, idx, used = _search(centred, m, k, "cosine", cap, backend)
            near = (1.0 - dist) >= min_cosine
            if near.any():
                pairs.append(np.stack([np.repeat(rows, k)[near.reshape(-1)], rows[idx[near]]], axis=1))
            dist, idx, used = _search(raw, m, k, "euclidean", cap, backend)
            knn_distance[rows] = dist.mean(axis=1)
            rows[idx].astype(np.int64).tofile(files.path(c, "nbr"))
            if labels is not None and len(sizes):
                lab = labels[rows]
                for lo in range(0, m, block):
                    part = slice(lo, min(m, lo + block))
                    ok = lab[part] >= 0
                    X = raw(part.start, part.stop)
                    dc = np.full(len(X), np.nan)
                    dc[ok] = np.linalg.norm(X[ok] - cluster_centres[lab[part][ok]], axis=1)
                    to_centre[rows[part]] = dc
        lof = np.full(n, np.nan, np.float64)
        for c in kept:
            rows = files.rows(c)
            nbr = np.fromfile(files.path(c, "nbr"), dtype=np.int64).reshape(len(rows), k)
            lof[rows] = knn_distance[nbr].mean(axis=1)
        from gpu_ops.explore.outliers import local_factor

        lof = local_factor(knn_distance, lof)
        ratio = ratio_from_distances(to_centre, labels, sizes) if labels is not None else np.full(n, np.nan)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    found = np.concatenate(pairs) if pairs else np.zeros((0, 2), np.int64)
    largest = int(max(counts[c] for c in kept))
    return CellNeighbours(found.astype(np.int64), knn_distance, lof, ratio, mean, len(kept), largest, int(blocked),
                          cap, used)


def ratio_from_distances(to_centre: np.ndarray, labels: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """:func:`~gpu_ops.explore.outliers.cluster_ratio` from each row's distance to its cluster's
    centre: that distance over the cluster's median one; NaN for noise and clusters of one."""
    out = np.full(len(labels), np.nan, np.float64)
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    for c in np.flatnonzero(sizes >= 2):
        lo, hi = np.searchsorted(sorted_labels, [c, c + 1])
        rows = order[lo:hi]
        spread = float(np.median(to_centre[rows]))
        if spread > 0:
            out[rows] = to_centre[rows] / spread
    return out


def store_pair_cosine(source: Any, pairs: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Centred cosine similarity of each pair of store rows, the rows gathered in one pass."""
    rows = np.unique(pairs)
    Z = (source.take(rows) - mean).astype(np.float32)
    Z /= np.maximum(np.linalg.norm(Z, axis=1, keepdims=True), 1e-12)
    a, b = np.searchsorted(rows, pairs[:, 0]), np.searchsorted(rows, pairs[:, 1])
    return (Z[a] * Z[b]).sum(axis=1).astype(np.float32)
