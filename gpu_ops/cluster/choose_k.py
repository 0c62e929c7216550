"""Choosing k without labels: an elbow curve (inertia over k) and a silhouette sweep on a sample.

For each k in ``[k_min, k_max]``, k-means (the registry's ``kmeans`` backend: k-means++ seeded
FAISS on a CPU, cuML on a GPU) is fitted on at most ``fit_sample_size`` rows; the silhouette is
computed on at most ``sample_size`` of those rows against one precomputed distance matrix (the
O(m^2) distances are computed once, not once per k). The k with the highest silhouette is
chosen; the elbow (kneedle) and the Calinski-Harabasz index are recorded beside it.
:func:`save_k_selection` writes the curves as ``k_selection.json``; the run report draws them.

What it picks (k in 2..20, seed 0, faiss-cpu; ``bench/cluster.py choose-k``, BENCHMARKS.md): 7 on
``make_blobs(5000, 32, centers=7, cluster_std=2)`` (silhouette 0.639 at 7, next best 0.564 at 6);
9 on scikit-learn digits raw pixels (0.189 at 9, 0.184 at 12); 2 on MNIST test pixels (0.089 at 2,
then 0.074 at 8; elbow at 7): raw-pixel k-means clusters of MNIST are not well separated, so
choose k on features (e.g. ``umap-kmeans``) or give it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from gpu_ops.errors import InputError
from gpu_ops.registry import create_estimator

METHODS = ("silhouette", "elbow")


@dataclass
class KSelection:
    """Curves over ``ks`` and the k chosen (the silhouette maximum unless ``method="elbow"``)."""

    ks: list[int]
    inertia: list[float]
    silhouette: list[float]
    elbow_k: int
    chosen_k: int
    backend: str
    calinski_harabasz: list[float] = field(default_factory=list)
    method: str = "silhouette"
    n_fit: int = 0
    n_silhouette: int = 0

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
             method: str = "silhouette") -> KSelection:
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
    method : {"silhouette", "elbow"}
        Which curve picks k. Silhouette is the default: the elbow of an inertia curve is a
        matter of scale and often lands early.
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
    chosen = ks[int(np.argmax(sil))] if method == "silhouette" else elbow
    return KSelection(ks, inertia, sil, elbow, chosen, used, ch, method, m, len(sil_pos))


def save_k_selection(selection: KSelection, directory: Path) -> Path:
    """Write ``k_selection.json`` (the curves; the report draws them) into ``directory``; return its path."""
    from gpu_ops.fsutil import atomic_write_bytes

    json_path = Path(directory) / "k_selection.json"
    atomic_write_bytes(json_path, (json.dumps(selection.as_dict(), indent=2, sort_keys=True) + "\n").encode())
    return json_path
