"""Gaussian mixture backends: scikit-learn ``GaussianMixture`` (EM), CPU only.

cuML has no Gaussian mixture (feature request rapidsai/cuml#2034 is open; NVIDIA's cuVS gained a
C++ GMM in 2026, not exposed through cuML), so ``auto`` and ``gpu`` resolve to the CPU backend.

After ``fit(X)``: ``labels_`` (n,) (the most probable component), ``cluster_centers_`` (k, d)
(the component means), ``probabilities_`` (n,) (posterior of the chosen component), ``bic_``,
``converged_``, ``n_iter_``, ``mixture_`` (the fitted scikit-learn model: weights, means, covariances).
"""

from __future__ import annotations

import numpy as np

from gpu_ops._validation import as_float32_matrix, check_n_clusters
from gpu_ops.errors import InputError
from gpu_ops.backend_table import register_backend, requires

COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")


INITS = ("kmeans", "k-means++", "random")


class SklearnGMM:
    """scikit-learn ``GaussianMixture``, its means started from k-means.

    Parameters
    ----------
    n_clusters : int
        Mixture components.
    covariance_type : {"full", "tied", "diag", "spherical"}
        "diag" (default) scales to hundreds of dimensions; "full" costs O(k d^2) memory and
        O(n k d^2) time per iteration.
    max_iter, n_init, seed : int
        ``n_init`` restarts the k-means that starts EM (or EM itself for the other inits).
    reg_covar : float
        Added to the covariance diagonals (keeps constant pixels from collapsing a component).
    init : {"kmeans", "k-means++", "random"}
        "kmeans" (default): the means start at the centres of the registry's k-means (k-means++
        seeded FAISS on a CPU, cuML on a GPU). scikit-learn's own "k-means++" init (seeds, no
        Lloyd) left two of 7 well-separated blobs in one component (ACC 0.835 on
        ``make_blobs(5000, 32, centers=7, cluster_std=2)``); started from k-means, 1.0.
    kmeans_backend : str
    """

    def __init__(self, n_clusters: int = 8, covariance_type: str = "diag", max_iter: int = 100, n_init: int = 1,
                 seed: int = 0, reg_covar: float = 1e-4, init: str = "kmeans", kmeans_backend: str = "auto") -> None:
        self.n_clusters = n_clusters
        self.covariance_type = covariance_type
        self.max_iter = max_iter
        self.n_init = n_init
        self.seed = seed
        self.reg_covar = reg_covar
        self.init = init
        self.kmeans_backend = kmeans_backend

    def fit(self, X: np.ndarray) -> "SklearnGMM":
        """Fit on ``X`` of shape (n, d)."""
        from sklearn.mixture import GaussianMixture

        if self.covariance_type not in COVARIANCE_TYPES:
            raise InputError(f"unknown covariance_type {self.covariance_type!r}; expected one of: "
                             f"{', '.join(COVARIANCE_TYPES)}")
        for name in ("max_iter", "n_init"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise InputError(f"{name} must be a positive integer; got {v!r}")
        if not self.reg_covar >= 0:
            raise InputError(f"reg_covar must be >= 0; got {self.reg_covar!r}")
        if self.init not in INITS:
            raise InputError(f"unknown init {self.init!r}; expected one of: {', '.join(INITS)}")
        X = as_float32_matrix(X)
        check_n_clusters(self.n_clusters, X.shape[0])
        common = dict(n_components=int(self.n_clusters), covariance_type=self.covariance_type,
                      max_iter=int(self.max_iter), random_state=int(self.seed), reg_covar=float(self.reg_covar))
        if self.init == "kmeans":
            from gpu_ops.registry import create_estimator

            km, res = create_estimator("kmeans", self.kmeans_backend, n_clusters=int(self.n_clusters),
                                       n_init=int(self.n_init), max_iter=100, seed=int(self.seed))
            km.fit(X)
            self.kmeans_resolution_ = res.as_dict()
            model = GaussianMixture(means_init=np.asarray(km.cluster_centers_, dtype=np.float64), n_init=1, **common)
        else:
            model = GaussianMixture(init_params=self.init, n_init=int(self.n_init), **common)
        model.fit(X)
        proba = model.predict_proba(X)
        self._gmm = model
        self.mixture_ = model
        self.labels_ = proba.argmax(axis=1).astype(np.int64)
        self.probabilities_ = proba.max(axis=1).astype(np.float32)
        self.cluster_centers_ = model.means_.astype(np.float32)
        self.bic_ = float(model.bic(X))
        self.converged_ = bool(model.converged_)
        self.n_iter_ = int(model.n_iter_)
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self._gmm.predict(as_float32_matrix(X)).astype(np.int64)


@register_backend("gmm", "sklearn", kind="cpu", priority=0, availability=requires("sklearn"),
                  description="scikit-learn GaussianMixture (EM, k-means++ init); cuML has no GMM")
def _sklearn(**params: object) -> SklearnGMM:
    return SklearnGMM(**params)
