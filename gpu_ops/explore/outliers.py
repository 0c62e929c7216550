"""How unusual each image is, and simple quality flags.

Scores, from Euclidean distances between the run's embeddings (the space the clusters were
made in; cosine distance, which the near duplicates use, ignores length and so calls a black
image, whose centred pixels point like any dark image's, typical):

``knn_distance``
    Mean distance to the item's k nearest neighbours: high in sparse regions.
``lof``
    ``knn_distance`` over the mean ``knn_distance`` of those neighbours (a local outlier factor
    in its simplest form): about 1 inside a cluster of any density, well above 1 for an item
    that sits apart from its neighbourhood.
``cluster_ratio``
    Distance to the centre of its cluster (the first algorithm's) over the median distance of
    that cluster's members to it: about 1 for a typical member; null for noise (-1) and
    single-member clusters.
``score``
    The mean of the item's percentile (0..1) among all items by ``knn_distance`` and by
    ``cluster_ratio`` (by ``knn_distance`` alone where there is no ratio); ``rank`` 1 is the
    most unusual item.

Quality flags, from :mod:`gpu_ops.explore.scan`'s measurements (grey levels 0..255, on a copy
at most 256 px on its longer side). Thresholds were set on 2,000 CIFAR-10 test JPEGs, where
none of them fires: mean grey levels run 26..237, the variance of the Laplacian from 75 up
(0.1 % below 128), while the same images blurred with a Gaussian of radius 2 stay below 57.

``dark`` / ``bright``
    Mean grey level below :data:`DARK_BELOW` / above :data:`BRIGHT_ABOVE`.
``blurry``
    Variance of the Laplacian below :data:`BLURRY_BELOW`, for images with some contrast (grey
    level standard deviation at least :data:`FLAT_STD`: a uniform image has no edges to blur).
``tiny``
    Shorter side below :data:`TINY_PX` pixels or below half the collection's median shorter
    side, whichever is smaller (so a collection of 28-px digits is not all tiny).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pyarrow as pa

from gpu_ops.explore.duplicates import Neighbours, knn
from gpu_ops.explore.scan import ItemScan

DARK_BELOW = 20.0
BRIGHT_ABOVE = 240.0
BLURRY_BELOW = 60.0
FLAT_STD = 5.0
TINY_PX = 64
TINY_FRACTION = 0.5
FLAGS = ("dark", "bright", "blurry", "tiny")


@dataclass
class OutlierScores:
    """``table``: the rows of ``outliers.parquet`` (store order); ``flagged``: items per flag."""

    table: pa.Table
    flagged: dict[str, int] = field(default_factory=dict)
    tiny_below_px: int | None = None


def percentile(values: np.ndarray) -> np.ndarray:
    """Each value's rank among the finite ``values`` scaled to 0..1 (ties share their mean rank);
    NaN stays NaN."""
    from scipy.stats import rankdata

    out = np.full(values.shape, np.nan, np.float64)
    ok = np.isfinite(values)
    if ok.sum() == 1:
        out[ok] = 1.0
    elif ok.any():
        out[ok] = (rankdata(values[ok]) - 1) / (ok.sum() - 1)
    return out


def euclidean_neighbours(embeddings: np.ndarray, k: int, backend: str = "auto") -> Neighbours | None:
    """Each item's ``k`` nearest by Euclidean distance (the ``knn`` op; None for n < 2)."""
    n = embeddings.shape[0]
    if n < 2:
        return None
    dist, idx, res = knn(embeddings, min(k, n - 1), "euclidean", backend)
    return Neighbours(dist, idx, res.backend)


def cluster_ratio(embeddings: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Euclidean distance to the own cluster's centre over the cluster's median member distance;
    NaN for noise (-1) and clusters of one."""
    Z = np.asarray(embeddings, dtype=np.float32)
    out = np.full(len(labels), np.nan, np.float64)
    for c in np.unique(labels[labels >= 0]):
        rows = np.flatnonzero(labels == c)
        if rows.size < 2:
            continue
        d = np.linalg.norm(Z[rows] - Z[rows].mean(axis=0), axis=1)
        spread = float(np.median(d))
        if spread > 0:
            out[rows] = d / spread
    return out


def quality_flags(scan: ItemScan) -> tuple[dict[str, np.ndarray], int | None]:
    """``{flag: (n,) bool}`` and the tiny threshold in pixels (None without images)."""
    n = len(scan.content)
    if not scan.has_images:
        return {f: np.zeros(n, bool) for f in FLAGS}, None
    assert scan.luma_mean is not None and scan.luma_std is not None and scan.laplacian_var is not None
    assert scan.width is not None and scan.height is not None and scan.readable is not None
    short = np.minimum(scan.width, scan.height)
    tiny_px = int(min(TINY_PX, TINY_FRACTION * float(np.median(short)))) if n else TINY_PX
    ok = scan.readable
    return {
        "dark": ok & (scan.luma_mean < DARK_BELOW),
        "bright": ok & (scan.luma_mean > BRIGHT_ABOVE),
        "blurry": ok & (scan.luma_std >= FLAT_STD) & (scan.laplacian_var < BLURRY_BELOW),
        "tiny": ok & (short < tiny_px),
    }, tiny_px


def neighbour_scores(neighbours: Neighbours | None, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``(knn_distance, lof)`` (n,) float64 of the items from their Euclidean ``neighbours`` (NaN without)."""
    if neighbours is None:
        return np.full(n, np.nan), np.full(n, np.nan)
    knn_distance = neighbours.distances.mean(axis=1).astype(np.float64)
    around = knn_distance[neighbours.indices].mean(axis=1)
    return knn_distance, local_factor(knn_distance, around)


def local_factor(knn_distance: np.ndarray, around: np.ndarray) -> np.ndarray:
    """``lof``: each item's ``knn_distance`` over ``around``, the mean ``knn_distance`` of its neighbours
    (1 where that is 0)."""
    return np.where(around > 0, knn_distance / np.maximum(around, 1e-12), 1.0)


def outlier_scores(image_ids: Sequence[str], scan: ItemScan, embeddings: np.ndarray,
                   neighbours: Neighbours | None, labels: np.ndarray | None) -> OutlierScores:
    """Scores and flags of the items ``image_ids`` (store order); ``neighbours``:
    :func:`euclidean_neighbours` of ``embeddings``; ``labels`` are the first algorithm's clusters
    of the same items (None: no cluster ratio)."""
    n = len(image_ids)
    knn_distance, lof = neighbour_scores(neighbours, n)
    labels = np.full(n, -1, np.int64) if labels is None else np.asarray(labels, np.int64)
    ratio = cluster_ratio(embeddings, labels) if n else np.zeros(0)
    columns = score_columns(scan, knn_distance, lof, labels, ratio)
    ids = pa.array([str(i) for i in image_ids], pa.string())
    return OutlierScores(outlier_table(ids, columns, 0, n), columns.flagged, columns.tiny_below_px)


@dataclass
class ScoreColumns:
    """The columns of ``outliers.parquet`` but ``image_id`` (n values each, store order), the
    images per flag and the tiny threshold; :func:`outlier_table` makes table rows of a slice."""

    arrays: dict[str, np.ndarray]
    flagged: dict[str, int]
    tiny_below_px: int | None


def score_columns(scan: ItemScan, knn_distance: np.ndarray, lof: np.ndarray, labels: np.ndarray,
                  ratio: np.ndarray) -> ScoreColumns:
    """Score, rank, flags and measurements of n items from their ``knn_distance``, ``lof``, cluster
    ``labels`` (-1: none) and :func:`cluster_ratio` ``ratio``."""
    n = len(labels)
    by_knn, by_ratio = percentile(knn_distance), percentile(ratio)
    score = np.where(np.isfinite(by_ratio), (by_knn + by_ratio) / 2, by_knn)
    score = np.nan_to_num(score, nan=0.0)
    rank = np.empty(n, np.int32)
    rank[np.lexsort((np.arange(n), -score))] = np.arange(1, n + 1)  # ties: dataset order
    flags, tiny_px = quality_flags(scan)
    arrays = {
        "score": score.astype(np.float32),
        "rank": rank,
        "knn_distance": knn_distance.astype(np.float32),
        "lof": lof.astype(np.float32),
        "cluster": labels.astype(np.int32),
        "cluster_ratio": ratio.astype(np.float32),
        **{name: flags[name] for name in FLAGS},
    }
    if scan.has_images:
        assert scan.width is not None and scan.height is not None
        arrays.update(width=scan.width, height=scan.height, brightness=scan.luma_mean, sharpness=scan.laplacian_var)
    return ScoreColumns(arrays, {f: int(v.sum()) for f, v in flags.items()}, tiny_px)


def outlier_table(image_ids: pa.Array, columns: ScoreColumns, start: int, stop: int) -> pa.Table:
    """Rows ``start:stop`` of ``outliers.parquet``; ``image_ids``: those rows' ids."""
    cols: dict[str, pa.Array] = {"image_id": image_ids}
    for name, values in columns.arrays.items():
        part = values[start:stop]
        cols[name] = pa.array(part, from_pandas=True) if name == "cluster_ratio" else pa.array(part)
    return pa.table(cols)
