"""Hierarchical clustering of more points than an O(n^2) distance matrix allows: micro-clusters.

k-means first summarises the n points by ``m`` micro-clusters (default 1 000): a centroid and a
count each. The hierarchy is then built on the ``m`` centroids with the counts as weights, with
the Lance-Williams recurrence started from clusters of those sizes:

- **ward**: Ward's merge cost between clusters A and B depends only on their sizes and centroids,
  ``Δ(A, B) = |A||B| / (|A| + |B|) * |c_A - c_B|^2``, so starting the recurrence from the
  micro-clusters (initial squared distance ``2 n_i n_j / (n_i + n_j) |c_i - c_j|^2``, scipy's
  convention that makes singleton heights Euclidean) and updating with the sizes

      d(k, i+j)^2 = ((n_i + n_k) d(k, i)^2 + (n_j + n_k) d(k, j)^2 - n_k d(i, j)^2) / (n_i + n_j + n_k)

  gives *exactly* the tree that Ward on the full data would give above the micro-clusters, had
  the full data been merged into those micro-clusters first (the only approximation is the
  k-means partition itself). With unit weights it is scipy's ``linkage(X, "ward")``.
  ``scipy.cluster.hierarchy.linkage`` and scikit-learn cannot do this: both start every
  observation at size 1.
- **average**: weighted UPGMA on centroid distances,
  ``d(k, i+j) = (n_i d(k, i) + n_j d(k, j)) / (n_i + n_j)``.
- **complete** / **single**: max / min of centroid distances (weights do not enter).

For average/complete/single the micro-cluster tree is an approximation (distances between
centroids, not between the points); ward is the linkage that micro-clusters preserve.

The merge loop keeps each row's nearest neighbour (the "generic" algorithm of Müllner, 2011):
O(m^2) memory and, for these reducible linkages, close to O(m^2) time; m = 1 000 takes well under
a second.
"""

from __future__ import annotations

import logging

import numpy as np

from gpu_ops._validation import as_float32_matrix, check_n_clusters
from gpu_ops.errors import InputError
from gpu_ops.registry import register_backend, requires

log = logging.getLogger(__name__)

LINKAGES = ("ward", "average", "complete", "single")
#: Default number of k-means micro-clusters.
N_MICRO = 1000


def weighted_linkage(centers: np.ndarray, weights: np.ndarray | None = None, method: str = "ward") -> np.ndarray:
    """Agglomerative tree of ``centers`` (m, d) whose rows stand for ``weights`` (m,) points each.

    Returns a scipy linkage matrix (m-1, 4): merged node ids (leaves are 0..m-1, merge i creates
    node m+i), merge height, and the number of *leaves* under the new node (scipy's convention;
    point counts come from summing ``weights`` over a node's leaves). With unit weights the
    heights equal ``scipy.cluster.hierarchy.linkage(centers, method)``.
    """
    if method not in LINKAGES:
        raise InputError(f"unknown linkage {method!r}; expected one of: {', '.join(LINKAGES)}")
    C = np.asarray(centers, dtype=np.float64)
    if C.ndim != 2 or C.shape[0] < 2:
        raise InputError(f"weighted linkage needs at least 2 centres in a 2-D array; got shape {C.shape}")
    m = C.shape[0]
    w = np.ones(m) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (m,) or not (w > 0).all():
        raise InputError(f"weights must be {m} positive numbers; got shape {w.shape}")

    sq = np.einsum("ij,ij->i", C, C)
    D = np.maximum(sq[:, None] - 2.0 * (C @ C.T) + sq[None, :], 0.0)  # squared Euclidean
    if method == "ward":
        D *= 2.0 * np.outer(w, w) / (w[:, None] + w[None, :])  # squared Ward distance
    else:
        np.sqrt(D, out=D)
    np.fill_diagonal(D, np.inf)

    size = w.copy()
    leaves = np.ones(m)
    node = np.arange(m, dtype=np.float64)
    active = np.ones(m, dtype=bool)
    nn = np.argmin(D, axis=1)
    nnd = D[np.arange(m), nn]
    Z = np.empty((m - 1, 4), dtype=np.float64)
    for step in range(m - 1):
        i = int(np.argmin(nnd))
        j = int(nn[i])
        dij = D[i, j]
        ni, nj = size[i], size[j]
        if method == "ward":
            new = ((ni + size) * D[i] + (nj + size) * D[j] - size * dij) / (ni + nj + size)
            height = np.sqrt(max(dij, 0.0))
        elif method == "average":
            new = (ni * D[i] + nj * D[j]) / (ni + nj)
            height = dij
        elif method == "complete":
            new = np.maximum(D[i], D[j])
            height = dij
        else:
            new = np.minimum(D[i], D[j])
            height = dij
        a, b = sorted((node[i], node[j]))
        Z[step] = (a, b, height, leaves[i] + leaves[j])
        # slot i becomes the merged cluster, slot j is retired
        active[j] = False
        new[~active] = np.inf
        new[i] = np.inf
        D[i, :] = new
        D[:, i] = new
        D[j, :] = np.inf
        D[:, j] = np.inf
        size[i] = ni + nj
        leaves[i] += leaves[j]
        node[i] = m + step
        nnd[j] = np.inf
        # rows whose neighbour was i or j must look again; rows now closer to i point at it
        stale = np.flatnonzero(active & ((nn == i) | (nn == j)))
        closer = active & (new < nnd)
        nn[closer] = i
        nnd[closer] = new[closer]
        for r in np.union1d(stale, [i]):
            if active[r]:
                nn[r] = int(np.argmin(D[r]))
                nnd[r] = D[r, nn[r]]
    return Z


def cut_n_clusters(Z: np.ndarray, n_clusters: int) -> np.ndarray:
    """Leaf labels (m,) in 0..n_clusters-1 after applying the first ``m - n_clusters`` merges."""
    m = Z.shape[0] + 1
    if not 1 <= int(n_clusters) <= m:
        raise InputError(f"n_clusters={n_clusters} must be between 1 and the number of leaves ({m})")
    return _apply_merges(Z, m - int(n_clusters))


def cut_distance(Z: np.ndarray, threshold: float) -> np.ndarray:
    """Leaf labels (m,) keeping only merges with height < ``threshold`` (scikit-learn's
    ``distance_threshold`` semantics: clusters at or above it are not merged)."""
    if not np.isfinite(threshold) or threshold < 0:
        raise InputError(f"distance_threshold must be a non-negative number; got {threshold!r}")
    heights = Z[:, 2]
    # heights are monotone for these linkages, so the merges below the threshold are a prefix
    n_merges = int(np.searchsorted(np.maximum.accumulate(heights), threshold, side="left"))
    return _apply_merges(Z, n_merges)


def _apply_merges(Z: np.ndarray, n_merges: int) -> np.ndarray:
    m = Z.shape[0] + 1
    parent = np.arange(2 * m - 1)

    def find(x: int) -> int:
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:
            parent[x], x = root, parent[x]
        return root

    for step in range(n_merges):
        a, b = int(Z[step, 0]), int(Z[step, 1])
        parent[find(a)] = m + step
        parent[find(b)] = m + step
    roots = np.array([find(i) for i in range(m)])
    _, labels = np.unique(roots, return_inverse=True)
    # number clusters by first appearance, so labels do not depend on node ids
    order = np.unique(labels, return_index=True)[1]
    remap = np.empty(len(order), dtype=np.int64)
    remap[np.argsort(order)] = np.arange(len(order))
    return remap[labels]


def point_counts(Z: np.ndarray, leaf_sizes: np.ndarray) -> np.ndarray:
    """Number of original points under each merged node (m-1,), from the leaves' sizes."""
    m = Z.shape[0] + 1
    counts = np.concatenate([np.asarray(leaf_sizes, dtype=np.float64), np.zeros(m - 1)])
    for step in range(m - 1):
        counts[m + step] = counts[int(Z[step, 0])] + counts[int(Z[step, 1])]
    return counts[m:]


class MicroClusterAgglomerative:
    """Agglomerative clustering of many points through k-means micro-clusters.

    Parameters
    ----------
    n_clusters : int or None
        Clusters in the cut; None when ``distance_threshold`` is given.
    linkage : {"ward", "average", "complete", "single"}
    distance_threshold : float or None
        Cut where merge heights reach this value instead of at ``n_clusters``.
    n_micro : int
        Micro-clusters (tree leaves); capped at n. 1 000 keeps the tree build under a second.
    kmeans_backend : str
        ``kmeans`` backend for the micro-clusters (``auto`` uses the GPU when there is one).
    max_iter, seed : int
        k-means settings for the micro-clusters.

    Attributes
    ----------
    labels_ : np.ndarray of shape (n,), int64
    n_clusters_ : int
    micro_labels_ : np.ndarray of shape (n,), int64
        The micro-cluster (tree leaf) of each point.
    micro_centers_ : np.ndarray of shape (m, d), float32
    micro_sizes_ : np.ndarray of shape (m,), int64
    linkage_matrix_ : np.ndarray of shape (m-1, 4)
        scipy linkage over the m micro-clusters (column 3: leaves under the node).
    node_point_counts_ : np.ndarray of shape (m-1,)
        Points under each merged node.
    children_, distances_ : np.ndarray
        scikit-learn's view of the same tree over the m leaves.
    kmeans_resolution_ : dict
        The k-means backend that made the micro-clusters, and why.
    """

    def __init__(self, n_clusters: int | None = 8, linkage: str = "ward", distance_threshold: float | None = None,
                 n_micro: int = N_MICRO, kmeans_backend: str = "auto", max_iter: int = 20, seed: int = 0) -> None:
        self.n_clusters = n_clusters
        self.linkage = linkage
        self.distance_threshold = distance_threshold
        self.n_micro = n_micro
        self.kmeans_backend = kmeans_backend
        self.max_iter = max_iter
        self.seed = seed

    def fit(self, X: np.ndarray) -> "MicroClusterAgglomerative":
        """Fit on ``X`` of shape (n, d)."""
        from gpu_ops.registry import create_estimator

        if self.linkage not in LINKAGES:
            raise InputError(f"unknown linkage {self.linkage!r}; expected one of: {', '.join(LINKAGES)}")
        check_cut(self.n_clusters, self.distance_threshold)
        X = as_float32_matrix(X)
        n = X.shape[0]
        if n < 2:
            raise InputError(f"agglomerative clustering needs at least 2 points; got {n}")
        if isinstance(self.n_micro, bool) or not isinstance(self.n_micro, (int, np.integer)) or self.n_micro < 2:
            raise InputError(f"n_micro must be an integer >= 2; got {self.n_micro!r}")
        m = min(int(self.n_micro), n)
        if self.n_clusters is not None:
            check_n_clusters(self.n_clusters, n)
            if int(self.n_clusters) > m:
                raise InputError(f"n_clusters={self.n_clusters} exceeds the {m} micro-clusters; raise n_micro")
        km, res = create_estimator("kmeans", self.kmeans_backend, n_clusters=m, max_iter=int(self.max_iter),
                                   n_init=1, seed=int(self.seed))
        km.fit(X)
        self.kmeans_resolution_ = res.as_dict()
        micro = np.asarray(km.labels_, dtype=np.int64)
        sizes = np.bincount(micro, minlength=m)
        centers = np.asarray(km.cluster_centers_, dtype=np.float32)
        if (sizes == 0).any():  # drop empty micro-clusters (FAISS splits them, others may not)
            keep = np.flatnonzero(sizes > 0)
            remap = -np.ones(m, dtype=np.int64)
            remap[keep] = np.arange(len(keep))
            micro, sizes, centers = remap[micro], sizes[keep], centers[keep]
        self.micro_labels_ = micro
        self.micro_sizes_ = sizes.astype(np.int64)
        self.micro_centers_ = centers
        Z = weighted_linkage(centers, sizes, self.linkage)
        self.linkage_matrix_ = Z
        self.node_point_counts_ = point_counts(Z, sizes)
        self.children_ = Z[:, :2].astype(np.int64)
        self.distances_ = Z[:, 2].copy()
        if self.distance_threshold is not None:
            leaf_labels = cut_distance(Z, float(self.distance_threshold))
        else:
            leaf_labels = cut_n_clusters(Z, int(self.n_clusters))
        self.labels_ = leaf_labels[micro]
        self.n_clusters_ = int(leaf_labels.max()) + 1
        self.n_leaves_ = len(sizes)
        return self


def check_cut(n_clusters: object, distance_threshold: object) -> None:
    """InputError unless exactly one of ``n_clusters`` and ``distance_threshold`` is set."""
    if (n_clusters is None) == (distance_threshold is None):
        raise InputError("give exactly one of n_clusters and distance_threshold; "
                         f"got n_clusters={n_clusters!r}, distance_threshold={distance_threshold!r}")
    if distance_threshold is not None:
        if not isinstance(distance_threshold, (int, float, np.floating, np.integer)) or not np.isfinite(distance_threshold) \
                or distance_threshold < 0:
            raise InputError(f"distance_threshold must be a non-negative number; got {distance_threshold!r}")


@register_backend(
    "agglomerative", "microcluster", kind="cpu", priority=1, availability=requires("sklearn"),
    description="k-means micro-clusters, then weighted ward/average/complete/single on their centroids",
)
def _microcluster(**params: object) -> MicroClusterAgglomerative:
    return MicroClusterAgglomerative(**params)
