"""Label-free quality scores for a clustering: what ``k=auto`` and the choice among candidate
clusterings rank by.

Every score here is higher-is-better and needs no labels:

- :func:`modularity`: Newman's modularity of the partition on the symmetric k-nearest-neighbour
  graph of the points, ``sum_c [ e_c / m - (d_c / 2m)^2 ]`` (``e_c`` edges inside cluster ``c``,
  ``d_c`` the degrees in it, ``m`` edges in all). A cluster scores when its points' neighbours
  are in it (it is an island of the graph), and the expected-edges term charges every merge, so
  merging two islands or cutting one both lower it. The graph is one fixed object, so partitions
  of different k, or found in different spaces (several UMAP embeddings), are compared fairly.
- :func:`silhouette`: the mean silhouette on a sample, the classic k sweep's score.

:func:`merge_path` merges k-means micro-clusters pair by pair on the graph and scores every k on
the way; ``k=auto`` (:mod:`gpu_ops.cluster.choose_k`) and the ``umap-graph`` algorithm use it.
Which score tracks accuracy on the labelled sets, measured with ``bench/quality.py``:
BENCHMARKS.md ("Choosing k without labels").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from gpu_ops.errors import InputError
from gpu_ops.registry import Resolution, create_estimator

#: Neighbours per point of the graph :func:`modularity` is computed on.
GRAPH_NEIGHBORS = 10


@dataclass(frozen=True)
class KnnGraph:
    """A symmetric, unweighted k-nearest-neighbour graph (CSR adjacency, no self loops)."""

    adjacency: sp.csr_matrix
    n_neighbors: int
    resolution: Resolution | None = None  #: the ``knn`` backend that found the neighbours

    @property
    def n(self) -> int:
        return int(self.adjacency.shape[0])


def knn_graph(X: np.ndarray, n_neighbors: int = GRAPH_NEIGHBORS, *, backend: str = "auto") -> KnnGraph:
    """The symmetrised ``n_neighbors``-nearest-neighbour graph of the rows of ``X`` (n, d).

    Neighbours come from the project's exact ``knn`` op (FAISS / cuML / scikit-learn); an edge
    joins i and j when either is among the other's neighbours.
    """
    X = np.ascontiguousarray(X, dtype=np.float32)
    n = X.shape[0]
    if n < 3:
        raise InputError(f"a neighbour graph needs at least 3 points; got {n}")
    k = min(int(n_neighbors), n - 1)
    est, resolution = create_estimator("knn", backend)
    _, idx = est.fit(X).kneighbors(n_neighbors=k)
    rows = np.repeat(np.arange(n), k)
    A = sp.csr_matrix((np.ones(n * k, dtype=np.float32), (rows, np.asarray(idx).ravel())), shape=(n, n))
    A = A.maximum(A.T).tocsr()
    A.setdiag(0)
    A.eliminate_zeros()
    return KnnGraph(A, k, resolution)


def modularity(graph: KnnGraph, labels: np.ndarray) -> float:
    """Newman's modularity of ``labels`` (n,) on ``graph``; -1 labels (noise) form no cluster.

    1 would be every edge inside a cluster with no expected share; a single cluster scores 0.
    """
    labels = np.asarray(labels)
    if labels.shape != (graph.n,):
        raise InputError(f"labels have shape {labels.shape}; the graph has {graph.n} points")
    A = graph.adjacency.tocoo()
    two_m = float(A.data.sum())
    if two_m == 0:
        return 0.0
    keep = labels >= 0
    codes = np.where(keep, labels, -1)
    k = int(codes.max()) + 1 if keep.any() else 0
    same = (codes[A.row] == codes[A.col]) & (codes[A.row] >= 0)
    inside = np.bincount(codes[A.row][same], weights=A.data[same], minlength=k)
    degree = np.asarray(graph.adjacency.sum(axis=1)).ravel()
    totals = np.bincount(codes[keep], weights=degree[keep], minlength=k)
    return float(inside.sum() / two_m - np.square(totals / two_m).sum())


def silhouette(X: np.ndarray, labels: np.ndarray, *, sample_size: int = 5000, seed: int = 0) -> float:
    """The mean silhouette of ``labels`` on at most ``sample_size`` rows of ``X`` (-1 when undefined)."""
    from sklearn.metrics import silhouette_score

    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    rows = np.arange(len(labels)) if len(labels) <= sample_size else rng.choice(len(labels), sample_size, replace=False)
    found = len(np.unique(labels[rows]))
    if not 1 < found < len(rows):
        return -1.0
    return float(silhouette_score(np.asarray(X, dtype=np.float32)[rows], labels[rows]))


@dataclass(frozen=True)
class MergePath:
    """Micro-clusters merged greedily by modularity gain on a graph, one pair at a time.

    ``partitions[k]`` maps each micro-cluster to its cluster (0..k-1) when k clusters remain, and
    ``modularity[k]`` is that partition's modularity, for every k from ``k_min`` up to the
    number of micro-clusters.
    """

    partitions: dict[int, np.ndarray]
    modularity: dict[int, float]

    def labels(self, micro_labels: np.ndarray, k: int) -> np.ndarray:
        """Per point: its cluster when ``k`` clusters remain (``micro_labels`` as given to :func:`merge_path`)."""
        if k not in self.partitions:
            raise InputError(f"k={k} is outside the merge path (k from {min(self.partitions)} "
                             f"to {max(self.partitions)})")
        return self.partitions[k][np.asarray(micro_labels)]


def merge_path(graph: KnnGraph, micro_labels: np.ndarray, k_min: int) -> MergePath:
    """Merge the micro-clusters ``micro_labels`` (n,) (0..c-1) down to ``k_min`` clusters.

    Each step joins the two clusters whose merge raises the graph's modularity most (or lowers
    it least), as the agglomerative phase of Clauset, Newman and Moore (2004) does, but stopping
    at a given number of clusters. Micro-clusters (k-means with a few times k centres) are pure
    even where k-means with k centres joins two islands or cuts one; the graph then decides
    which of them belong together.
    """
    micro = np.asarray(micro_labels)
    c = int(micro.max()) + 1
    if k_min < 1 or k_min > c:
        raise InputError(f"cannot merge {c} micro-clusters down to k={k_min}")
    member = sp.csr_matrix((np.ones(len(micro)), (np.arange(len(micro)), micro)), shape=(len(micro), c))
    W = np.asarray((member.T @ graph.adjacency @ member).todense(), dtype=np.float64)
    total = W.sum()
    if total == 0:
        raise InputError("the neighbour graph has no edges; cannot merge micro-clusters")
    degree = W.sum(axis=1)
    alive = np.ones(c, dtype=bool)
    owner = np.arange(c)
    partitions: dict[int, np.ndarray] = {}
    scores: dict[int, float] = {}
    for remaining in range(c, k_min - 1, -1):
        _, partitions[remaining] = np.unique(owner, return_inverse=True)
        scores[remaining] = float((np.diag(W)[alive] / total - np.square(degree[alive] / total)).sum())
        if remaining == k_min:
            break
        gain = 2 * W / total - 2 * np.outer(degree, degree) / total**2
        gain[~alive] = -np.inf
        gain[:, ~alive] = -np.inf
        np.fill_diagonal(gain, -np.inf)
        a, b = np.unravel_index(int(np.argmax(gain)), gain.shape)
        W[a] += W[b]
        W[:, a] += W[:, b]
        W[b] = 0
        W[:, b] = 0
        degree[a] += degree[b]
        degree[b] = 0
        alive[b] = False
        owner[owner == b] = a
    return MergePath(partitions, scores)


def micro_clusters(k: int, n: int) -> int:
    """How many k-means micro-clusters to merge down to ``k`` clusters of ``n`` points."""
    return max(2, min(max(3 * k, 30), n // 3))
