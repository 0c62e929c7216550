"""Choosing k without labels: the modularity of graph-merged micro-clusters, with the elbow
(inertia over k) and silhouette curves beside it.

The score that picks k (``method="modularity"``, the default) is
:func:`gpu_ops.cluster.quality.modularity` on the rows' 10-nearest-neighbour graph: k-means
micro-clusters (three times the largest k, at least 30) are merged one pair at a time by
modularity gain (:func:`~gpu_ops.cluster.quality.merge_path`), and the fewest clusters in
``[k_min, k_max]`` whose partition's modularity is within :data:`MODULARITY_TOLERANCE` of the
highest is chosen. One pass of merges scores every k. The
silhouette of k-means with k centres, the old choice, is still recorded, with the elbow (kneedle)
and the Calinski-Harabasz index; ``method="silhouette"`` or ``"elbow"`` picks by them instead.
For each k, k-means (the registry's ``kmeans`` backend) is fitted on at most ``fit_sample_size``
rows; the silhouette is computed on at most ``sample_size`` of those rows against one
precomputed distance matrix. :func:`save_k_selection` writes the curves as ``k_selection.json``;
the run report draws them and metrics.json repeats the choice.

Which score tracks accuracy on the labelled sets here (``bench/quality.py``): BENCHMARKS.md,
"Choosing k without labels".
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from gpu_ops.cluster.quality import GRAPH_NEIGHBORS, knn_graph, merge_path, micro_clusters
from gpu_ops.errors import InputError
from gpu_ops.registry import create_estimator

METHODS = ("modularity", "silhouette", "elbow")
#: ``method="modularity"`` takes the fewest clusters whose modularity is within this much of the
#: highest: past the true k the curve is nearly flat (splitting off a small island still gains a
#: little), so its very maximum lands a few k too high (MNIST autoencoder codes: 0.7709 at k=11,
#: 0.7724 at 15). Measured in BENCHMARKS.md.
MODULARITY_TOLERANCE = 0.001


@dataclass
class KSelection:
    """Curves over ``ks`` and the k chosen (by ``method``: the modularity maximum by default)."""

    ks: list[int]
    inertia: list[float]
    silhouette: list[float]
    elbow_k: int
    chosen_k: int
    backend: str
    calinski_harabasz: list[float] = field(default_factory=list)
    method: str = "modularity"
    n_fit: int = 0
    n_silhouette: int = 0
    modularity: list[float] = field(default_factory=list)  #: graph-merged micro-clusters, per k
    n_micro: int = 0  #: the micro-clusters merged
    graph_neighbors: int = 0
    best_k: int = 0  #: where modularity is highest (``chosen_k`` is the fewest within the tolerance)
    tolerance: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def elbow_point(ks: list[int], inertia: list[float]) -> int:
    """The k farthest below the chord joining the curve's ends (the "kneedle" elbow)."""
    x = np.asarray(ks, dtype=float)
    y = np.asarray(inertia, dtype=float)
    x = (x - x[0]) / max(x[-1] - x[0], 1e-12)
    y = (y - y.min()) / max(y.max() - y.min(), 1e-12)
    chord = y[0] + (y[-1] - y[0]) * x
    return int(ks[int(np.argmax(chord - y))])


def choose_k(X: np.ndarray, k_min: int = 2, k_max: int = 20, *, backend: str = "auto", seed: int = 0,
             sample_size: int = 5000, n_init: int = 3, max_iter: int = 100, fit_sample_size: int = 50_000,
             method: str = "modularity") -> KSelection:
    """Sweep k in [k_min, k_max] with k-means on ``X`` (n, d) and choose k.

    Parameters
    ----------
    X : np.ndarray of shape (n, d)
    k_min, k_max : int
        ``2 <= k_min <= k_max``; ``k_max`` is clipped to n - 1.
    backend : str
        ``kmeans`` backend (``auto`` / ``gpu`` / ``cpu`` / a name).
    sample_size : int
        Rows for the silhouette (one m x m float32 distance matrix: 100 MB at 5 000).
    fit_sample_size : int
        Rows k-means is fitted on for each k (all rows when n is smaller).
    method : {"modularity", "silhouette", "elbow"}
        Which curve picks k. Modularity is the default (it tracks accuracy best on the labelled
        sets); the elbow of an inertia curve is a matter of scale and often lands early.
    """
    from sklearn.metrics import calinski_harabasz_score, pairwise_distances, silhouette_score

    if method not in METHODS:
        raise InputError(f"unknown k selection method {method!r}; expected one of: {', '.join(METHODS)}")
    X = np.asarray(X, dtype=np.float32)
    n = X.shape[0]
    k_max = min(k_max, n - 1)
    if k_min < 2 or k_max < k_min:
        raise InputError(f"k range must satisfy 2 <= k_min <= k_max < n_samples; got ({k_min}, {k_max}) with n={n}")
    rng = np.random.default_rng(seed)
    fit_rows = np.arange(n) if n <= fit_sample_size else np.sort(rng.choice(n, size=fit_sample_size, replace=False))
    Xfit = X[fit_rows] if len(fit_rows) < n else X
    m = len(fit_rows)
    sil_pos = rng.choice(m, size=min(sample_size, m), replace=False)
    D = pairwise_distances(Xfit[sil_pos]).astype(np.float32, copy=False)
    ks, inertia, sil, ch, used = [], [], [], [], ""
    for k in range(k_min, k_max + 1):
        est, res = create_estimator("kmeans", backend, n_clusters=k, n_init=n_init, max_iter=max_iter, seed=seed)
        est.fit(Xfit)
        used = res.backend
        ks.append(k)
        inertia.append(float(est.inertia_))
        labels = np.asarray(est.labels_)
        sample_labels = labels[sil_pos]
        ok = 1 < len(np.unique(sample_labels)) < len(sil_pos)
        sil.append(float(silhouette_score(D, sample_labels, metric="precomputed")) if ok else -1.0)
        ch.append(float(calinski_harabasz_score(Xfit, labels)) if len(np.unique(labels)) > 1 else 0.0)
    elbow = elbow_point(ks, inertia)
    graph = knn_graph(Xfit, GRAPH_NEIGHBORS, backend=knn_backend(backend))
    n_micro = max(k_max, micro_clusters(k_max, m))
    est, _ = create_estimator("kmeans", backend, n_clusters=n_micro, n_init=n_init, max_iter=max_iter, seed=seed)
    path = merge_path(graph, np.asarray(est.fit(Xfit).labels_), k_min)
    mod = [path.modularity[k] for k in ks]
    best = ks[int(np.argmax(mod))]
    parsimonious = next(k for k, q in zip(ks, mod) if q >= max(mod) - MODULARITY_TOLERANCE)
    chosen = {"modularity": parsimonious, "silhouette": ks[int(np.argmax(sil))], "elbow": elbow}[method]
    return KSelection(ks, inertia, sil, elbow, chosen, used, ch, method, m, len(sil_pos), mod, n_micro,
                      graph.n_neighbors, best, MODULARITY_TOLERANCE)


def knn_backend(kmeans_backend: str) -> str:
    """The ``knn`` setting that goes with a ``kmeans`` one: a device choice carries over, a
    backend name (``faiss-cpu``, ``sklearn``) of the other op does not."""
    return kmeans_backend if kmeans_backend in ("auto", "gpu", "cpu") else "auto"


def save_k_selection(selection: KSelection, directory: Path) -> Path:
    """Write ``k_selection.json`` (the curves; the report draws them) into ``directory``; return its path."""
    from gpu_ops.fsutil import atomic_write_bytes

    json_path = Path(directory) / "k_selection.json"
    atomic_write_bytes(json_path, (json.dumps(selection.as_dict(), indent=2, sort_keys=True) + "\n").encode())
    return json_path
