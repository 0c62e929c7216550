"""Choosing k without labels: an elbow curve (inertia over k) and a silhouette sweep on a sample."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from gpu_ops.errors import InputError
from gpu_ops.registry import create_estimator


@dataclass
class KSelection:
    """Curves over ``ks`` and the k chosen (the silhouette maximum)."""

    ks: list[int]
    inertia: list[float]
    silhouette: list[float]
    elbow_k: int
    chosen_k: int
    backend: str

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
             sample_size: int = 5000, n_init: int = 3) -> KSelection:
    """Sweep k in [k_min, k_max] with k-means on ``X`` (n, d): inertia on all rows, silhouette on a
    sample of at most ``sample_size`` rows; choose the k with the highest silhouette."""
    from sklearn.metrics import silhouette_score

    n = X.shape[0]
    k_max = min(k_max, n - 1)
    if k_min < 2 or k_max < k_min:
        raise InputError(f"k range must satisfy 2 <= k_min <= k_max < n_samples; got ({k_min}, {k_max}) with n={n}")
    rng = np.random.default_rng(seed)
    sample = rng.choice(n, size=min(sample_size, n), replace=False)
    ks, inertia, sil, used = [], [], [], ""
    for k in range(k_min, k_max + 1):
        est, res = create_estimator("kmeans", backend, n_clusters=k, n_init=n_init, max_iter=100, seed=seed)
        est.fit(X)
        used = res.backend
        ks.append(k)
        inertia.append(float(est.inertia_))
        labels = est.labels_[sample]
        sil.append(float(silhouette_score(X[sample], labels)) if len(np.unique(labels)) > 1 else -1.0)
    return KSelection(ks, inertia, sil, elbow_point(ks, inertia), ks[int(np.argmax(sil))], used)
