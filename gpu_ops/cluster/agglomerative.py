"""Agglomerative (hierarchical) clustering backends.

After ``fit(X)``: ``labels_`` (n,), ``children_`` (n-1, 2) and ``distances_`` (n-1,) when the
full tree was built, and ``linkage_matrix_`` (n-1, 4) in scipy's format for dendrograms.
The cuML backend (single linkage only) may leave ``distances_`` and ``linkage_matrix_`` as None:
see :class:`CumlAgglomerative`.

Above ``max_exact_n`` points (10 000) the scikit-learn backend builds the tree on k-means
micro-clusters instead (logged; :mod:`gpu_ops.cluster.microcluster`), so a dendrogram of 100 000
embeddings takes seconds, not an O(n^2) distance matrix. Both CPU backends cut the tree at
``n_clusters`` or at ``distance_threshold``.
"""

from __future__ import annotations

import logging

import numpy as np

from gpu_ops._validation import as_float32_matrix, check_n_clusters
from gpu_ops.device import to_host
from gpu_ops.errors import InputError
from gpu_ops.backend_table import register_backend, requires
from gpu_ops.cluster.microcluster import LINKAGES

log = logging.getLogger(__name__)



def linkage_matrix(children: np.ndarray, distances: np.ndarray, n_samples: int) -> np.ndarray:
    """scipy linkage matrix (n-1, 4) from scikit-learn's ``children_`` and ``distances_``.

    Columns: the two merged nodes, their merge distance, and the size of the new node.
    """
    counts = np.zeros(children.shape[0])
    for i, (a, b) in enumerate(children):
        size_a = 1 if a < n_samples else counts[a - n_samples]
        size_b = 1 if b < n_samples else counts[b - n_samples]
        counts[i] = size_a + size_b
    return np.column_stack([children, distances, counts]).astype(np.float64)


#: Above this many points the scikit-learn backend switches to micro-clusters (logged): the exact
#: tree needs n*(n-1)/2 float64 distances (400 MB and ~13 s on 2 cores at 10 000 points).
EXACT_MAX_N = 10_000


def cut_merge_tree(children: np.ndarray, n_samples: int, n_clusters: int) -> np.ndarray:
    """Flat labels (n_samples,) int64 after the first ``n_samples - n_clusters`` merges of a merge
    tree given as ``children`` (n-1, 2) in scikit-learn's convention (row i makes node n + i),
    rows in merge order. Needs no merge heights: cuts a GPU tree that came without them.
    Labels are numbered by first appearance."""
    children = np.asarray(children, dtype=np.int64)
    if children.shape != (n_samples - 1, 2):
        raise InputError(f"children must have shape ({n_samples - 1}, 2) for {n_samples} samples; got {children.shape}")
    check_n_clusters(n_clusters, n_samples)
    parent = np.arange(2 * n_samples - 1)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = int(parent[i])
        return i

    for row in range(n_samples - n_clusters):
        a, b = children[row]
        node = n_samples + row
        parent[root(int(a))] = node
        parent[root(int(b))] = node
    roots = np.array([root(i) for i in range(n_samples)])
    _, labels = np.unique(roots, return_inverse=True)
    first = {}
    for lab in labels:
        first.setdefault(int(lab), len(first))
    return np.array([first[int(lab)] for lab in labels], dtype=np.int64)


class SklearnAgglomerative:
    """scikit-learn ``AgglomerativeClustering`` keeping the whole tree for dendrograms.

    Up to ``max_exact_n`` points the tree is exact (scikit-learn / scipy, O(n^2) memory). Above it
    the fit switches to :class:`~gpu_ops.cluster.microcluster.MicroClusterAgglomerative`
    (``n_micro`` k-means micro-clusters, then weighted linkage on their centroids), logs the
    switch, and sets ``method_`` to ``"microcluster"``; the tree's leaves are then the
    micro-clusters, not the points.

    Parameters
    ----------
    n_clusters : int or None
        None when ``distance_threshold`` is given.
    linkage : {"ward", "average", "complete", "single"}
    distance_threshold : float or None
        Cut the tree where merge heights reach this value (scikit-learn's semantics).
    max_exact_n : int
        Largest n for the exact tree.
    n_micro : int
        Micro-clusters above ``max_exact_n``.
    kmeans_backend : str
        ``kmeans`` backend for the micro-clusters.
    seed : int

    Attributes
    ----------
    labels_ : np.ndarray of shape (n,), int64
    n_clusters_ : int
    children_, distances_ : np.ndarray
    linkage_matrix_ : np.ndarray of shape (leaves-1, 4)
    method_ : {"exact", "microcluster"}
    """

    def __init__(self, n_clusters: int | None = 8, linkage: str = "ward", distance_threshold: float | None = None,
                 max_exact_n: int = EXACT_MAX_N, n_micro: int = 1000, kmeans_backend: str = "auto",
                 seed: int = 0) -> None:
        self.n_clusters = n_clusters
        self.linkage = linkage
        self.distance_threshold = distance_threshold
        self.max_exact_n = max_exact_n
        self.n_micro = n_micro
        self.kmeans_backend = kmeans_backend
        self.seed = seed

    def fit(self, X: np.ndarray) -> "SklearnAgglomerative":
        """Fit on ``X`` of shape (n, d)."""
        from sklearn.cluster import AgglomerativeClustering

        from gpu_ops.cluster.microcluster import MicroClusterAgglomerative, check_cut

        if self.linkage not in LINKAGES:
            raise InputError(f"unknown linkage {self.linkage!r}; expected one of: {', '.join(LINKAGES)}")
        check_cut(self.n_clusters, self.distance_threshold)
        X = as_float32_matrix(X)
        n = X.shape[0]
        if self.n_clusters is not None:
            check_n_clusters(self.n_clusters, n)
        if n > int(self.max_exact_n):
            log.warning("agglomerative: n=%d > max_exact_n=%d: building the %s tree on %d k-means micro-clusters "
                        "(weighted Lance-Williams) instead of the exact O(n^2) tree", n, self.max_exact_n,
                        self.linkage, min(int(self.n_micro), n))
            micro = MicroClusterAgglomerative(n_clusters=self.n_clusters, linkage=self.linkage,
                                              distance_threshold=self.distance_threshold, n_micro=self.n_micro,
                                              kmeans_backend=self.kmeans_backend, seed=self.seed).fit(X)
            self.__dict__.update({k: v for k, v in vars(micro).items() if k.endswith("_")})
            self.method_ = "microcluster"
            return self
        if n < 2:
            raise InputError(f"agglomerative clustering needs at least 2 points; got {n}")
        model = AgglomerativeClustering(
            n_clusters=None if self.n_clusters is None else int(self.n_clusters), linkage=self.linkage,
            distance_threshold=None if self.distance_threshold is None else float(self.distance_threshold),
            compute_full_tree=True, compute_distances=True,
        ).fit(X)
        self.labels_ = model.labels_.astype(np.int64)
        self.n_clusters_ = int(model.n_clusters_)
        self.children_ = model.children_
        self.distances_ = model.distances_
        self.linkage_matrix_ = linkage_matrix(model.children_, model.distances_, n)
        self.method_ = "exact"
        return self


#: Above this many points the CPU linkage matrix for the cuML backend is skipped: scipy's
#: single linkage needs the condensed distance matrix, n*(n-1)/2 float64 (1.6 GB at 20 000).
CPU_LINKAGE_MAX_N = 20_000
#: ``connectivity="auto"`` builds the exact pairwise graph up to this many points (n*n float32 on
#: the GPU: 1.6 GB at 20 000), and cuML's kNN graph beyond.
PAIRWISE_MAX_N = 20_000
CONNECTIVITIES = ("auto", "pairwise", "knn")


class CumlAgglomerative:
    """cuML ``AgglomerativeClustering`` on the GPU: single linkage, Euclidean, built from an MST.

    Parameters
    ----------
    n_clusters : int
    linkage : {"single"}
        cuML implements single linkage only; the registry sends other linkages to the CPU
        backend (and logs why) before this class is ever built.
    connectivity : {"auto", "pairwise", "knn"}
        cuML's graph: "pairwise" is exact single linkage (O(n^2) GPU memory), "knn" sparsifies
        it for large n (cuML connects the kNN graph's components, so the tree can differ slightly
        from the exact one). "auto" is "pairwise" up to ``PAIRWISE_MAX_N`` points, else "knn".
    linkage_matrix_max_n : int
        Largest n for which the CPU linkage matrix is computed (see ``linkage_matrix_``).

    Attributes
    ----------
    labels_ : np.ndarray of shape (n,), int64
    children_ : np.ndarray of shape (n-1, 2), int64
        cuML's merge tree in scikit-learn's convention: row i merges two nodes into node n + i;
        ids below n are points.
    distances_ : np.ndarray of shape (n-1,) or None
        Merge heights. cuML 26.10 does not expose them (its single-linkage MST weights stay
        internal), so this is None unless the installed cuML accepts ``compute_distances``.
    linkage_matrix_ : np.ndarray of shape (n-1, 4) or None
        scipy linkage matrix for dendrograms. Built from ``children_`` and ``distances_`` when cuML
        gives distances; otherwise computed on the CPU with
        ``scipy.cluster.hierarchy.linkage(X, "single")`` when n <= ``linkage_matrix_max_n``
        (the same single-linkage tree, up to the order of tied merges), else None.
    connectivity_ : str
        The graph actually used ("pairwise" or "knn").
    linkage_source_ : {"cuml", "scipy-cpu"} or None
        Where ``linkage_matrix_`` came from: cuML's own merge heights, or the CPU recomputation.
        The GPU tree itself is ``children_`` (:func:`cut_merge_tree` cuts it without heights).
    """

    def __init__(self, n_clusters: int = 8, linkage: str = "single", connectivity: str = "auto",
                 linkage_matrix_max_n: int = CPU_LINKAGE_MAX_N) -> None:
        self.n_clusters = n_clusters
        self.linkage = linkage
        self.connectivity = connectivity
        self.linkage_matrix_max_n = linkage_matrix_max_n

    def fit(self, X: np.ndarray) -> "CumlAgglomerative":
        """Fit on ``X`` of shape (n, d)."""
        problem = _cuml_linkage_unsupported({"linkage": self.linkage})
        if problem is not None:
            raise InputError(problem)
        if self.connectivity not in CONNECTIVITIES:
            raise InputError(f"unknown connectivity {self.connectivity!r}; expected one of: {', '.join(CONNECTIVITIES)}")
        X = as_float32_matrix(X)
        n = X.shape[0]
        check_n_clusters(self.n_clusters, n)
        if n < 2:
            raise InputError(f"agglomerative clustering needs at least 2 points; got {n}")
        connectivity = self.connectivity
        if connectivity == "auto":
            connectivity = "pairwise" if n <= PAIRWISE_MAX_N else "knn"
        from cuml.cluster import AgglomerativeClustering

        # linkage is left at cuML's default ("single"): cuML 25.x tests it with `is not "single"`.
        kwargs: dict[str, object] = {}
        wants_distances = "compute_distances" in AgglomerativeClustering._get_param_names()
        if wants_distances:
            kwargs["compute_distances"] = True
        model = AgglomerativeClustering(
            n_clusters=int(self.n_clusters),
            metric="euclidean",
            connectivity=connectivity,
            output_type="numpy",
            **kwargs,
        ).fit(X)
        self.connectivity_ = connectivity
        self.labels_ = to_host(model.labels_).astype(np.int64)
        self.children_ = _cuml_children(to_host(model.children_), n)
        distances = getattr(model, "distances_", None) if wants_distances else None
        self.distances_ = None
        self.linkage_matrix_ = None
        self.linkage_source_ = None
        if distances is not None and to_host(distances).shape == (n - 1,):
            self.distances_ = to_host(distances).astype(np.float64)
            self.linkage_matrix_ = linkage_matrix(self.children_, self.distances_, n)
            self.linkage_source_ = "cuml"
        elif n <= int(self.linkage_matrix_max_n):
            from scipy.cluster.hierarchy import linkage as scipy_linkage

            self.linkage_matrix_ = scipy_linkage(X, method="single", metric="euclidean")
            self.linkage_source_ = "scipy-cpu"
        return self


def _cuml_children(children: np.ndarray, n: int) -> np.ndarray:
    """cuML's ``children_`` as an (n-1, 2) int64 array.

    cuML 26.x returns (n-1, 2). cuML 25.x returns its raw (2, n) Fortran-ordered buffer, into
    which the C++ code wrote the merges as consecutive pairs: column i is merge i.
    """
    if children.shape == (n - 1, 2):
        return children.astype(np.int64)
    if children.shape == (2, n):
        return np.ascontiguousarray(children[:, : n - 1].T, dtype=np.int64)
    raise RuntimeError(f"unexpected cuML children_ shape {children.shape} for {n} points")


def _cuml_linkage_unsupported(params: dict[str, object]) -> str | None:
    linkage = params.get("linkage", "ward")
    if linkage != "single":
        return f"cuML AgglomerativeClustering supports single linkage only; {linkage!r} was requested"
    if params.get("distance_threshold") is not None:
        return ("cuML AgglomerativeClustering cannot cut at a distance_threshold; "
                f"distance_threshold={params['distance_threshold']!r} was requested")
    return None


@register_backend(
    "agglomerative", "sklearn", kind="cpu", priority=0, availability=requires("sklearn"),
    description="scikit-learn AgglomerativeClustering (ward/average/complete/single, full tree kept)",
)
def _sklearn(**params: object) -> SklearnAgglomerative:
    return SklearnAgglomerative(**params)


@register_backend(
    "agglomerative", "cuml", kind="gpu", priority=0, availability=requires("cuml", gpu=True),
    unsupported=_cuml_linkage_unsupported,
    description="cuML AgglomerativeClustering on the GPU (single linkage only)",
)
def _cuml(**params: object) -> CumlAgglomerative:
    return CumlAgglomerative(**params)
