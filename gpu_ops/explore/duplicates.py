"""Exact and near duplicates, grouped, with one representative per group.

Three kinds of evidence make a pair, strongest first:

``exact``
    The same content hash (:mod:`gpu_ops.explore.scan`: sha256 of a file's bytes, or of an
    in-memory item's array).
``phash``
    Perceptual hashes (imagehash's DCT ``phash``, 64 bits) at most ``phash_max_bits`` apart, the
    distance taken as the smallest between one image and the other or one of its views
    (:data:`gpu_ops.explore.scan.VIEWS`: the mirror image and centre crops), so a flipped or
    cropped copy matches too. Re-encoding, resizing and brightness changes move few bits; on
    2,000 CIFAR-10 test JPEGs the nearest distinct image is 10 bits or more away for all but one
    (a mirrored near copy already in the data), while re-encoded (quality 50), resized (x0.8),
    brightened (+15 %) and flipped copies stay within 6 bits, and 10 % border crops within 2
    bits of the original's centre view (bench/duplicates.py measures precision and recall).
``embedding``
    Cosine similarity of the run's embeddings, centred on their mean, at least ``min_cosine``
    (centring removes what every embedding shares, e.g. raw pixels that are all positive, which
    otherwise makes every pair look alike). This is what finds crops and other changes that move
    a perceptual hash, as far as the extractor's features are invariant to them. The default 0.97
    lies above every distinct pair measured on 2,000 CIFAR-10 test JPEGs: each image's most
    similar other image reached at most 0.964 with raw pixels (0.959 at the 99.9th percentile)
    and 0.794 with EfficientNet-Lite0 features; below it, raw pixels start pairing different
    photographs with similar layouts (8 such pairs at 0.95).

Both near kinds come from the exact ``knn`` op (``gpu_ops.cluster.neighbors``; GPU when present):
each item's ``neighbours`` nearest are the candidates, so a pair is missed only when an item has
more than that many closer items, and groups still join through their members' own lists.
Perceptual hashes are searched as 0/1 vectors, whose squared Euclidean distance is the Hamming
distance. Pairs form groups (connected components); each group's representative is its largest
image (most pixels), the first in dataset order on a tie.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa

from gpu_ops.explore.scan import HASH_BITS, ItemScan

log = logging.getLogger("gpu_ops.explore")

#: The defaults; :class:`DuplicateSettings` carries the values a run used into metrics.json.
PHASH_MAX_BITS = 8
MIN_COSINE = 0.97
NEIGHBOURS = 10
KINDS = ("exact", "phash", "embedding")
#: Perceptual hashes are not used where the median image's own hash is within ``phash_max_bits`` of
#: at least this many other images (identical files aside) and of at least
#: :data:`PHASH_CHANCE_SHARE` of them: matches that grow with the collection are chance, not copies.
#: MNIST digits: 2 of 1,999 others, 12.5 of 9,999 (92,000 "duplicate" pairs among 10,000 digits);
#: CIFAR-10 photos: 0. Real duplicates do not reach it unless most images have near copies.
PHASH_CHANCE_MATCHES = 2
PHASH_CHANCE_SHARE = 1e-4
#: Images whose matches are counted (a seeded sample).
PHASH_SAMPLE_IMAGES = 100


@dataclass(frozen=True)
class DuplicateSettings:
    """Thresholds of the near kinds and how many neighbours each item's search returns."""

    phash_max_bits: int = PHASH_MAX_BITS
    min_cosine: float = MIN_COSINE
    neighbours: int = NEIGHBOURS


@dataclass(frozen=True)
class Neighbours:
    """A kNN result over n items: ``distances`` and ``indices`` (n, k), nearest first, self excluded;
    ``backend``: the ``knn`` backend that ran."""

    distances: np.ndarray
    indices: np.ndarray
    backend: str


def centred(X: np.ndarray) -> np.ndarray:
    """Rows of ``X`` minus their mean (float32)."""
    X = np.asarray(X, dtype=np.float32)
    return X - X.mean(axis=0, keepdims=True)


def knn(X: np.ndarray, k: int, metric: str, backend: str = "auto",
        queries: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, Any]:
    """``(distances, indices, resolution)`` of the ``knn`` op over rows of ``X``: the ``k`` nearest of
    each query (of each row, itself excluded, when ``queries`` is None)."""
    from gpu_ops.registry import create_estimator

    est, resolution = create_estimator("knn", backend, metric=metric)
    dist, idx = est.fit(X).kneighbors(queries=queries, n_neighbors=k)
    return dist, idx, resolution


def embedding_neighbours(embeddings: np.ndarray, k: int, backend: str = "auto") -> Neighbours | None:
    """Each item's ``k`` nearest by cosine distance of the centred embeddings (None for n < 2)."""
    n = embeddings.shape[0]
    if n < 2:
        return None
    dist, idx, res = knn(centred(embeddings), min(k, n - 1), "cosine", backend)
    return Neighbours(dist, idx, res.backend)


def _pairs(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Unique unordered pairs (i < j) as an (m, 2) int64 array, self pairs dropped."""
    a, b = np.minimum(rows, cols), np.maximum(rows, cols)
    keep = a != b
    if not keep.any():
        return np.zeros((0, 2), np.int64)
    return np.unique(np.stack([a[keep], b[keep]], axis=1).astype(np.int64), axis=0)


def exact_pairs(content: np.ndarray) -> np.ndarray:
    """Pairs of items with the same content digest: each to the first item holding it."""
    content = np.asarray(content)
    if content.size == 0:
        return np.zeros((0, 2), np.int64)
    _, first, inverse = np.unique(content, return_index=True, return_inverse=True)
    first = first[inverse.reshape(-1)]
    later = np.flatnonzero(first != np.arange(content.size))
    return _pairs(first[later].astype(np.int64), later.astype(np.int64))


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bitwise distances between rows of two (m, 64) uint8 0/1 arrays."""
    return (a != b).sum(axis=1).astype(np.int16)


def phash_distance(scan: ItemScan, pairs: np.ndarray) -> np.ndarray:
    """View-aware perceptual-hash distance (bits) of each pair: the smallest between one image's
    hash and the other's hash or the hash of one of its views."""
    assert scan.phash is not None and scan.phash_views is not None
    i, j = pairs[:, 0], pairs[:, 1]
    best = hamming(scan.phash[i], scan.phash[j])
    for v in range(scan.phash_views.shape[1]):
        best = np.minimum(best, hamming(scan.phash[i], scan.phash_views[j, v]))
        best = np.minimum(best, hamming(scan.phash[j], scan.phash_views[i, v]))
    return best


def phash_pairs(scan: ItemScan, max_bits: int, k: int, backend: str = "auto") -> tuple[np.ndarray, str | None]:
    """Pairs within ``max_bits`` (view-aware) among the readable images, and the knn backend.

    The images' own hashes are indexed; each image's hash and each of its views' hashes query it.
    """
    assert scan.phash is not None and scan.phash_views is not None and scan.readable is not None
    rows = np.flatnonzero(scan.readable)
    if rows.size < 2:
        return np.zeros((0, 2), np.int64), None
    bits = scan.phash[rows].astype(np.float32)
    k = min(k, rows.size - 1)
    found = []
    dist, idx, res = knn(bits, k, "euclidean", backend)
    found.append((np.repeat(np.arange(rows.size), k), idx.reshape(-1), dist.reshape(-1)))
    for v in range(scan.phash_views.shape[1]):
        vdist, vidx, _ = knn(bits, k, "euclidean", backend, queries=scan.phash_views[rows, v].astype(np.float32))
        found.append((np.repeat(np.arange(rows.size), k), vidx.reshape(-1), vdist.reshape(-1)))
    r = np.concatenate([f[0] for f in found])
    c = np.concatenate([f[1] for f in found])
    d2 = np.concatenate([f[2] for f in found]) ** 2  # squared distance of 0/1 vectors = differing bits
    near = np.rint(d2) <= max_bits
    return _pairs(rows[r[near]], rows[c[near]]), res.backend


def phash_chance_matches(scan: ItemScan, max_bits: int, sample: int = PHASH_SAMPLE_IMAGES, seed: int = 0) -> float:
    """The median, over a seeded sample of readable images, of how many other readable images
    (not identical files) have their own perceptual hash within ``max_bits``; 0.0 below 2 images."""
    assert scan.phash is not None and scan.readable is not None
    rows = np.flatnonzero(scan.readable)
    if rows.size < 2:
        return 0.0
    hashes, content = scan.phash[rows], scan.content[rows]
    counts = [int(np.count_nonzero((hamming(hashes, hashes[i][None]) <= max_bits) & (content != content[i])))
              for i in np.random.default_rng(seed).choice(rows.size, min(sample, rows.size), replace=False)]
    return float(np.median(counts))  # identical files (itself among them) are not counted


def embedding_pairs(neighbours: Neighbours, min_cosine: float) -> np.ndarray:
    """Pairs whose centred cosine similarity (1 - distance) is at least ``min_cosine``."""
    n, k = neighbours.indices.shape
    near = (1.0 - neighbours.distances) >= min_cosine
    return _pairs(np.repeat(np.arange(n), k)[near.reshape(-1)], neighbours.indices[near])


def pair_cosine(embeddings: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Centred cosine similarity of each pair."""
    Z = centred(embeddings)
    Z /= np.maximum(np.linalg.norm(Z, axis=1, keepdims=True), 1e-12)
    return (Z[pairs[:, 0]] * Z[pairs[:, 1]]).sum(axis=1).astype(np.float32)


@dataclass
class DuplicateGroups:
    """What :func:`find_duplicates` found: ``table`` (the rows of ``duplicates.parquet``) and counts."""

    table: pa.Table
    pairs_by_kind: dict[str, int] = field(default_factory=dict)
    groups: int = 0
    images_in_groups: int = 0
    redundant: int = 0  #: images a user could drop keeping one per group
    backends: list[str] = field(default_factory=list)
    phash_chance_matches: float | None = None  #: median other images within the phash threshold (images only)
    phash_off: str | None = None  #: why perceptual hashes were not used, when they were not


SCHEMA = pa.schema([
    ("group", pa.int32()), ("representative", pa.string()), ("image_id_a", pa.string()), ("image_id_b", pa.string()),
    ("kind", pa.string()), ("similarity", pa.float32()), ("phash_bits", pa.int16()), ("cosine", pa.float32()),
])


def find_duplicates(image_ids: Sequence[str], scan: ItemScan, embeddings: np.ndarray,
                    neighbours: Neighbours | None, settings: DuplicateSettings = DuplicateSettings(),
                    backend: str = "auto") -> DuplicateGroups:
    """Exact and near duplicate pairs of the items ``image_ids``, grouped.

    Parameters
    ----------
    image_ids : sequence of str
        The items, in store order (n).
    scan : ItemScan
        :func:`~gpu_ops.explore.scan.scan_items` of the same items.
    embeddings : ndarray (n, d)
        The run's embeddings of the same items.
    neighbours : Neighbours or None
        :func:`embedding_neighbours` of ``embeddings`` (None when n < 2).

    Returns
    -------
    DuplicateGroups
        One row per pair (``image_id_a`` before ``image_id_b`` in store order): its group, the
        group's representative, the strongest kind of evidence, ``similarity`` in that kind's
        terms (1 for exact, 1 - bits/64 for phash, the cosine for embedding), and both
        measurements (``phash_bits`` null without images).
    """
    near = (embedding_pairs(neighbours, settings.min_cosine) if neighbours is not None
            else np.zeros((0, 2), np.int64))
    return group_duplicates(image_ids, scan, near, lambda pairs: pair_cosine(embeddings, pairs), settings, backend,
                            [neighbours.backend] if neighbours is not None else [])


def group_duplicates(image_ids: Sequence[str], scan: ItemScan, near: np.ndarray,
                     cosine_of: Callable[[np.ndarray], np.ndarray], settings: DuplicateSettings = DuplicateSettings(),
                     backend: str = "auto", backends: Sequence[str] = ()) -> DuplicateGroups:
    """:func:`find_duplicates` from the embedding pairs already found: ``near`` (m, 2) pairs whose
    centred cosine reached ``settings.min_cosine``, ``cosine_of(pairs)`` the centred cosine of any
    pairs, ``backends`` the knn backends that found ``near``. Only the ids of paired items are read
    from ``image_ids``."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(image_ids)
    found = {"exact": exact_pairs(scan.content)}
    used_backends = list(backends)
    chance = phash_chance_matches(scan, settings.phash_max_bits) if scan.has_images else None
    phash_off = None
    if chance is not None and chance >= PHASH_CHANCE_MATCHES and chance >= PHASH_CHANCE_SHARE * (len(image_ids) - 1):
        phash_off = (f"perceptual hashes not used: the median image's hash is within {settings.phash_max_bits} "
                     f"bits of {chance:g} others, so a match would be chance")
        log.warning("duplicates: %s", phash_off)
    if scan.has_images and phash_off is None:
        found["phash"], used = phash_pairs(scan, settings.phash_max_bits, settings.neighbours, backend)
        used_backends += [used] if used else []
    else:
        found["phash"] = np.zeros((0, 2), np.int64)
    found["embedding"] = near
    pairs = _pairs(*np.concatenate([p for p in found.values()]).T) if n else np.zeros((0, 2), np.int64)
    if pairs.size == 0:
        return DuplicateGroups(SCHEMA.empty_table(), {k: 0 for k in KINDS}, backends=sorted(set(used_backends)),
                               phash_chance_matches=chance, phash_off=phash_off)
    same = scan.content[pairs[:, 0]] == scan.content[pairs[:, 1]]
    bits = phash_distance(scan, pairs) if scan.has_images else None
    if bits is not None and scan.readable is not None:
        bits = np.where(scan.readable[pairs[:, 0]] & scan.readable[pairs[:, 1]], bits, HASH_BITS).astype(np.int16)
    cosine = cosine_of(pairs)
    by_phash = bits is not None and phash_off is None and bits <= settings.phash_max_bits
    kind = np.where(same, "exact", np.where(by_phash, "phash", "embedding"))
    similarity = np.where(same, 1.0, np.where(by_phash, 1.0 - (bits if bits is not None else 0) / HASH_BITS, cosine))

    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    members = np.unique(pairs)
    ids = dict(zip(members.tolist(), (str(image_ids[int(i)]) for i in members)))
    pixels = (scan.width.astype(np.int64) * scan.height if scan.width is not None and scan.height is not None
              else np.zeros(n, np.int64))
    # Groups are numbered by their first member; each one's representative is its largest image.
    group_of: dict[int, int] = {}
    representative: dict[int, int] = {}
    for i in members:  # ascending: the first member of each component comes first
        c = int(component[i])
        if c not in group_of:
            group_of[c] = len(group_of)
            representative[c] = int(i)
        elif pixels[i] > pixels[representative[c]]:
            representative[c] = int(i)
    comp = component[pairs[:, 0]]
    group = np.array([group_of[int(c)] for c in comp], np.int32)
    rep = [ids[representative[int(c)]] for c in comp]
    order = np.lexsort((pairs[:, 1], pairs[:, 0], group))
    table = pa.table({
        "group": pa.array(group[order], pa.int32()),
        "representative": pa.array([rep[i] for i in order], pa.string()),
        "image_id_a": pa.array([ids[int(i)] for i in pairs[order, 0]], pa.string()),
        "image_id_b": pa.array([ids[int(i)] for i in pairs[order, 1]], pa.string()),
        "kind": pa.array(kind[order].tolist(), pa.string()),
        "similarity": pa.array(similarity[order].astype(np.float32), pa.float32()),
        "phash_bits": pa.nulls(len(pairs), pa.int16()) if bits is None else pa.array(bits[order], pa.int16()),
        "cosine": pa.array(cosine[order], pa.float32()),
    }, schema=SCHEMA)
    counts = {k: int((kind == k).sum()) for k in KINDS}
    return DuplicateGroups(table, counts, groups=len(group_of), images_in_groups=int(members.size),
                           redundant=int(members.size) - len(group_of), backends=sorted(set(used_backends)),
                           phash_chance_matches=chance, phash_off=phash_off)
