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
   (its vector and its row number; rows near the border with the second nearest cell to that
   cell's visitors' file too), and sums the rows for their mean (the centring of the
   cosine search) and per cluster of the run's first algorithm (the cluster ratio's centres);
3. cells with fewer rows than a search needs (an isolated point often gets a centre of its own)
   join the nearest cell large enough;
4. each cell is searched on its own with the exact ``knn`` op: by cosine of the centred rows for
   near duplicates, by Euclidean distance for the outlier scores. A cell holding more rows than
   the budget allows (k-means cells are uneven) is searched exactly, in blocks: each block of
   its rows is indexed in turn and every block of queries searched against it, the best
   neighbours kept (quadratic in the cell's size, but within the budget, and nothing dropped).

So each row's neighbours are its exact nearest *within its cell*; a row's k-nearest distance can
only come out larger than the exact one (more so at a cell's border), so isolated points keep
high outlier scores. Near duplicates are also searched across the border: a row that lies closer
to the border with its second nearest cell than a near duplicate could lie from it
(:func:`border_reach`) is a *visitor* of that cell too, and is searched against its rows (by cosine
only). A near duplicate pair is then missed only when its rows lie in two cells neither of which
is the other's second nearest, or their lengths differ by more than :data:`BORDER_SLACK` allows.
In high dimensions most rows lie near some border, so this can nearly double the cosine search
(20,000 x 128 rows in 12 overlapping blobs, 23 cells: 84 % of the rows visit; the one-cell search
missed 11 of 500 planted near copies, with visitors none). Memory: the sample, one cell (or two blocks of it), and O(n) small per-row values (a
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
from gpu_ops.explore.outliers import local_factor

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
#: :func:`border_reach`'s slack: a near duplicate pair whose centred lengths differ by up to ~25 %
#: lies within it of each other.
BORDER_SLACK = 1.5


def fits_in_memory(n: int, d: int, memory_mb: int | None) -> bool:
    """True when ``n`` embeddings of ``d`` float32 values take at most :data:`EMBEDDINGS_SHARE` of
    ``memory_mb`` (always without a budget): the explore stage then searches all rows at once."""
    return memory_mb is None or 4 * n * d <= EMBEDDINGS_SHARE * memory_mb * 2**20


def border_reach(min_cosine: float) -> float:
    """How near (relative to its distance from the rows' mean) a row must lie to the border of its
    cell to be searched in the next cell too for near duplicates: ``BORDER_SLACK * sqrt(2 (1 - min_cosine))``,
    the farthest two unit vectors of that cosine lie apart, with room for lengths that differ."""
    return BORDER_SLACK * math.sqrt(2 * (1 - min_cosine))


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
    border_rows: int = 0  #: rows also searched in their second nearest cell for near duplicates

    def description(self) -> str:
        """metrics.json's ``neighbours``: how the neighbours were searched."""
        return f"within {self.cells} cells"

    def summary(self) -> dict[str, int]:
        return {"count": self.cells, "largest": self.largest, "searched_in_blocks": self.blocked,
                "cell_rows": self.cell_rows, "border_rows": self.border_rows}


class _CellFiles:
    """Per-cell scratch files: ``cell-NNNNN.f32`` (the rows' float32 vectors) and ``.rows`` (their
    int64 row numbers), appended batch by batch; ``kind`` ``"v"``: the cell's visitors (rows of
    other cells near its border, searched against it for near duplicates only)."""

    def __init__(self, directory: Path, d: int) -> None:
        self.directory, self.d = directory, d
        directory.mkdir(parents=True, exist_ok=True)

    def path(self, cell: int, suffix: str, kind: str = "") -> Path:
        return self.directory / f"cell-{cell:05d}{'.' + kind if kind else ''}.{suffix}"

    def append(self, cell: int, X: np.ndarray, rows: np.ndarray, kind: str = "") -> None:
        with open(self.path(cell, "f32", kind), "ab") as f:
            f.write(np.ascontiguousarray(X, dtype=np.float32).tobytes())
        with open(self.path(cell, "rows", kind), "ab") as f:
            f.write(np.ascontiguousarray(rows, dtype=np.int64).tobytes())

    def move_into(self, cell: int, target: int) -> None:
        """Append ``cell``'s rows (and visitors) to ``target``'s files and delete ``cell``'s."""
        for kind in ("", "v"):
            for suffix in ("f32", "rows"):
                if not self.path(cell, suffix, kind).exists():
                    continue
                with open(self.path(target, suffix, kind), "ab") as out, open(self.path(cell, suffix, kind), "rb") as src:
                    shutil.copyfileobj(src, out)
                self.path(cell, suffix, kind).unlink()

    def rows(self, cell: int, kind: str = "") -> np.ndarray:
        path = self.path(cell, "rows", kind)
        return np.fromfile(path, dtype=np.int64) if path.exists() else np.zeros(0, np.int64)

    def vectors(self, cell: int, start: int, stop: int, kind: str = "") -> np.ndarray:
        """Rows ``start:stop`` of the cell (or of its visitors), float32 (stop - start, d)."""
        count = (stop - start) * self.d
        return np.fromfile(self.path(cell, "f32", kind), dtype=np.float32, count=count,
                           offset=4 * start * self.d).reshape(-1, self.d)


def fit_cells(source: Any, n_cells: int, sample_rows: int, seed: int, backend: str) -> tuple[np.ndarray, np.ndarray]:
    """(n_cells, d) float32 centres of k-means cells fitted on a uniform sample of the source's rows,
    and the sample's mean (d,)."""
    from gpu_ops.cluster.sources import subset_rows
    from gpu_ops.registry import create_estimator

    sample = source.take(subset_rows(source.count(), sample_rows, seed))
    mean = sample.mean(axis=0, dtype=np.float64)
    if n_cells <= 1:
        return mean[None, :].astype(np.float32), mean
    est, _ = create_estimator("kmeans", backend, n_clusters=n_cells, n_init=1, max_iter=10, seed=seed)
    est.fit(sample)
    return np.asarray(est.cluster_centers_, dtype=np.float32), mean


def two_nearest(X: np.ndarray, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each row's nearest and second nearest centre, and how far it lies from the hyperplane halfway
    between them (``(d2^2 - d1^2) / (2 |c1 - c2|)``); one centre: no second (-1, distance inf)."""
    if len(centres) < 2:
        return np.zeros(len(X), np.int64), np.full(len(X), -1, np.int64), np.full(len(X), np.inf, np.float32)
    csq = np.einsum("ij,ij->i", centres, centres)
    first = np.empty(len(X), np.int64)
    second = np.empty(len(X), np.int64)
    margin = np.empty(len(X), np.float32)
    step = max(256, (8 << 20) // (4 * len(centres)))
    for s in range(0, len(X), step):
        D = X[s:s + step] @ centres.T
        D *= -2.0
        D += csq[None, :]  # squared distances less |x|^2: the same order, the same differences
        two = np.argpartition(D, 1, axis=1)[:, :2]
        d2 = np.take_along_axis(D, two, axis=1)
        swap = d2[:, 1] < d2[:, 0]
        two[swap] = two[swap][:, ::-1]
        d2[swap] = d2[swap][:, ::-1]
        gap = np.linalg.norm(centres[two[:, 0]] - centres[two[:, 1]], axis=1)
        first[s:s + step], second[s:s + step] = two[:, 0], two[:, 1]
        margin[s:s + step] = (d2[:, 1] - d2[:, 0]) / np.maximum(2 * gap, 1e-12)
    return first, second, margin


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


def _spill(source: Any, centres: np.ndarray, files: _CellFiles, labels: np.ndarray | None, reach: float,
           centre_of_all: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """One pass over the store: every row into its nearest centre's files, and into its second
    nearest's visitors when it lies within ``reach * |x - centre_of_all|`` of the border between
    the two. Returns the rows per cell, the rows' float64 mean, the float64 centres and sizes of the
    clusters ``labels``, and the number of visitors."""
    from gpu_ops.cluster.sources import cluster_sums

    n_clusters = int(labels.max()) + 1 if labels is not None and labels.size and labels.max() >= 0 else 0
    counts = np.zeros(len(centres), np.int64)
    total = np.zeros(source.dim(), np.float64)
    sums = np.zeros((n_clusters, source.dim()), np.float64)
    sizes = np.zeros(n_clusters, np.int64)
    start, visitors = 0, 0
    for X in source.batches():
        rows = np.arange(start, start + len(X))
        cell, second, margin = two_nearest(X, centres)
        near = margin <= reach * np.linalg.norm(X - centre_of_all.astype(np.float32), axis=1)
        for kind, sel_rows, sel_cell in (("", np.arange(len(X)), cell), ("v", np.flatnonzero(near), second[near])):
            order = np.argsort(sel_cell, kind="stable")
            bounds = np.concatenate([[0], np.cumsum(np.bincount(sel_cell, minlength=len(centres)))])
            for c in np.flatnonzero(np.diff(bounds)):
                sel = sel_rows[order[bounds[c]:bounds[c + 1]]]
                files.append(int(c), X[sel], rows[sel], kind)
        counts += np.bincount(cell, minlength=len(centres))
        visitors += int(near.sum())
        total += X.sum(axis=0, dtype=np.float64)
        if n_clusters:
            lab = labels[start:start + len(X)]  # type: ignore[index]
            ok = lab >= 0
            s, c = cluster_sums(X[ok], lab[ok], n_clusters)
            sums += s
            sizes += c
        start += len(X)
    centre_of = sums / np.maximum(sizes, 1)[:, None]
    return counts, total / max(start, 1), centre_of, sizes, visitors


def visitor_pairs(files: _CellFiles, cell: int, rows: np.ndarray, mean: np.ndarray, k: int, min_cosine: float,
                  block: int, backend: str) -> np.ndarray:
    """Pairs (global rows) of the cell's visitors with its rows whose centred cosine reaches
    ``min_cosine``: each visitor's ``k`` most similar within each block of ``block`` cell rows."""
    from gpu_ops.registry import create_estimator

    guests = files.rows(cell, "v")
    found = []
    if not len(guests):
        return np.zeros((0, 2), np.int64)
    for lo in range(0, len(rows), block):
        index = (files.vectors(cell, lo, min(len(rows), lo + block)) - mean).astype(np.float32)
        est, _ = create_estimator("knn", backend, metric="cosine")
        est.fit(index)
        kk = min(k, len(index))
        for glo in range(0, len(guests), block):
            q = (files.vectors(cell, glo, min(len(guests), glo + block), "v") - mean).astype(np.float32)
            dist, idx = est.kneighbors(queries=q, n_neighbors=kk)
            near = (1.0 - dist) >= min_cosine
            if near.any():
                who = np.repeat(guests[glo:glo + len(q)], kk)[near.reshape(-1)]
                found.append(np.stack([who, rows[lo + idx[near]]], axis=1))
    return np.concatenate(found) if found else np.zeros((0, 2), np.int64)


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
    centres, sample_mean = fit_cells(source, n_cells, sample_rows, seed, kmeans_backend)
    files = _CellFiles(Path(scratch), d)
    try:
        counts, mean, cluster_centres, sizes, visitors = _spill(source, centres, files, labels,
                                                                border_reach(min_cosine), sample_mean)
        kept = _join_small_cells(files, centres, counts, k + 1)
        knn_distance = np.full(n, np.nan, np.float64)
        to_centre = np.full(n, np.nan, np.float64)
        pairs, used, blocked = [], backend, 0
        block = max(k + 1, cap // 2)
        for c in kept:
            rows = files.rows(c)
            blocked += len(rows) > cap

            def raw(lo: int, hi: int, c: int = c) -> np.ndarray:
                return files.vectors(c, lo, hi)

            def centred(lo: int, hi: int, c: int = c) -> np.ndarray:
                return (files.vectors(c, lo, hi) - mean).astype(np.float32)

            dist, idx, used = _search(centred, len(rows), k, "cosine", cap, backend)
            near = (1.0 - dist) >= min_cosine
            pairs.append(np.stack([np.repeat(rows, k)[near.reshape(-1)], rows[idx[near]]], axis=1))
            pairs.append(visitor_pairs(files, c, rows, mean, k, min_cosine, block, backend))
            dist, idx, used = _search(raw, len(rows), k, "euclidean", cap, backend)
            knn_distance[rows] = dist.mean(axis=1)
            rows[idx].astype(np.int64).tofile(files.path(c, "nbr"))
            if labels is not None and len(sizes):
                to_centre[rows] = _cluster_distances(raw, labels[rows], cluster_centres, block)
        lof = local_factor(knn_distance, _around(files, kept, knn_distance, k))
        ratio = ratio_from_distances(to_centre, labels, sizes) if labels is not None else np.full(n, np.nan)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    largest = int(max(counts[c] for c in kept))
    return CellNeighbours(np.concatenate(pairs).astype(np.int64), knn_distance, lof, ratio, mean, len(kept), largest,
                          int(blocked), cap, used, visitors)


def _cluster_distances(read: Callable[[int, int], np.ndarray], labels: np.ndarray, centres: np.ndarray,
                       block: int) -> np.ndarray:
    """Euclidean distance of each of a cell's rows (``read``, ``block`` at a time) to the centre of its
    cluster ``labels`` (NaN for noise, -1)."""
    out = np.full(len(labels), np.nan, np.float64)
    for lo in range(0, len(labels), block):
        hi = min(len(labels), lo + block)
        lab = labels[lo:hi]
        ok = lab >= 0
        X = read(lo, hi)
        out[lo:hi][ok] = np.linalg.norm(X[ok] - centres[lab[ok]], axis=1)
    return out


def _around(files: _CellFiles, cells: list[int], knn_distance: np.ndarray, k: int) -> np.ndarray:
    """Each row's neighbours' mean ``knn_distance`` (their lists read back from the cells' files)."""
    out = np.full(len(knn_distance), np.nan, np.float64)
    for c in cells:
        rows = files.rows(c)
        nbr = np.fromfile(files.path(c, "nbr"), dtype=np.int64).reshape(len(rows), k)
        out[rows] = knn_distance[nbr].mean(axis=1)
    return out


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
