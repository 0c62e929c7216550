"""N2D (McConville et al., 2020): autoencoder embedding -> UMAP manifold -> Gaussian mixture.

UMAP runs through the backend registry (cuML on a GPU, umap-learn on the CPU); the mixture is
scikit-learn's ``GaussianMixture`` with full covariances, or k-means through the registry.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from gpu_ops.deep._common import quick_kmeans, torch_threads_kept

log = logging.getLogger("gpu_ops.deep")

N2D_CLUSTERERS = ("gmm", "kmeans")


def manifold_cluster(z: np.ndarray, n_clusters: int, *, seed: int = 0, n_components: int = 10,
                     n_neighbors: int = 20, min_dist: float = 0.0, clusterer: str = "gmm",
                     backend: str = "auto", gmm_n_init: int = 1) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """UMAP ``z`` (n, d) to ``n_components`` dims, then cluster it.

    Returns (labels (n,) int64, manifold (n, n_components) float32, info with the backends used).
    torch's CPU thread count is left as it was (see :func:`torch_threads_kept`).
    """
    with torch_threads_kept():
        return _umap_then_cluster(z, n_clusters, seed=seed, n_components=n_components, n_neighbors=n_neighbors,
                                  min_dist=min_dist, clusterer=clusterer, backend=backend, gmm_n_init=gmm_n_init)


def _umap_then_cluster(z: np.ndarray, n_clusters: int, *, seed: int, n_components: int, n_neighbors: int,
                       min_dist: float, clusterer: str, backend: str,
                       gmm_n_init: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    from gpu_ops.registry import create_estimator

    if clusterer not in N2D_CLUSTERERS:
        from gpu_ops.errors import choice_error

        raise choice_error("N2D clusterer", clusterer, N2D_CLUSTERERS)
    n_neighbors = int(min(n_neighbors, max(2, len(z) - 1)))
    est, res = create_estimator("umap", backend, n_components=int(n_components), n_neighbors=n_neighbors,
                                min_dist=float(min_dist), seed=int(seed))
    manifold = np.asarray(est.fit(np.ascontiguousarray(z, dtype=np.float32)).embedding_, dtype=np.float32)
    info: dict[str, Any] = {"umap_backend": res.as_dict()}
    if clusterer == "gmm":
        from sklearn.mixture import GaussianMixture

        gmm = GaussianMixture(n_components=int(n_clusters), covariance_type="full", random_state=int(seed),
                              n_init=int(gmm_n_init))
        labels = gmm.fit(manifold).predict(manifold).astype(np.int64)
        info["clusterer"] = "sklearn GaussianMixture(full)"
    else:
        labels, _ = quick_kmeans(manifold, n_clusters, seed, n_init=10, max_iter=100, backend=backend)
        info["clusterer"] = "kmeans"
    return labels, manifold, info
