"""PCA backends: cuML and scikit-learn."""

from __future__ import annotations

import numpy as np

from gpu_ops._validation import as_float32_matrix
from gpu_ops.device import to_host
from gpu_ops.errors import InputError
from gpu_ops.backend_table import register_backend, requires


def check_components(n_components: int, X: np.ndarray) -> None:
    """n_components must be in [1, min(n, d)]."""
    limit = min(X.shape)
    if not 1 <= int(n_components) <= limit:
        raise InputError(f"n_components={n_components} must be between 1 and min(n_samples, n_features)={limit}")


class CumlPCA:
    """cuML PCA on the GPU (eigendecomposition of the covariance matrix).

    Parameters
    ----------
    n_components : int
    seed : int
        Accepted for a common interface; cuML's PCA has no random_state parameter.
    whiten : bool
        Scale the projections to unit variance.

    Attributes
    ----------
    embedding_ : np.ndarray of shape (n, n_components), float32
    explained_variance_ratio_ : np.ndarray of shape (n_components,)
        Fraction of the total variance carried by each component.
    """

    def __init__(self, n_components: int = 2, seed: int = 0, whiten: bool = False) -> None:
        self.n_components = n_components
        self.seed = seed
        self.whiten = whiten

    def fit(self, X: np.ndarray) -> "CumlPCA":
        """Fit on ``X`` of shape (n, d) and project it."""
        X = as_float32_matrix(X)
        check_components(self.n_components, X)
        if min(X.shape) < 2:
            raise InputError(f"cuML PCA needs at least 2 samples and 2 features; got shape {X.shape}")
        from cuml.decomposition import PCA

        self._pca = PCA(n_components=int(self.n_components), whiten=bool(self.whiten), output_type="numpy")
        self.embedding_ = to_host(self._pca.fit_transform(X)).astype(np.float32)
        self.explained_variance_ratio_ = to_host(self._pca.explained_variance_ratio_).astype(np.float64)
        return self

    def transform(self, X: np.ndarray) -> np.ndarray:
        """Project ``X`` (m, d) -> (m, n_components) with the fitted components."""
        return to_host(self._pca.transform(as_float32_matrix(X))).astype(np.float32)

    def fit_transform(self, X: np.ndarray) -> np.ndarray:
        return self.fit(X).embedding_


class SklearnPCA:
    """scikit-learn PCA; ``embedding_`` (n, n_components)."""

    def __init__(self, n_components: int = 2, seed: int = 0, whiten: bool = False) -> None:
        self.n_components = n_components
        self.seed = seed
        self.whiten = whiten

    def fit(self, X: np.ndarray) -> "SklearnPCA":
        from sklearn.decomposition import PCA

        X = as_float32_matrix(X)
        check_components(self.n_components, X)
        self._pca = PCA(n_components=int(self.n_components), whiten=self.whiten, random_state=int(self.seed))
        self.embedding_ = self._pca.fit_transform(X).astype(np.float32)
        self.explained_variance_ratio_ = self._pca.explained_variance_ratio_
        return self

    def transform(self, X: np.ndarray) -> np.ndarray:
        return self._pca.transform(as_float32_matrix(X)).astype(np.float32)

    def fit_transform(self, X: np.ndarray) -> np.ndarray:
        return self.fit(X).embedding_


@register_backend("pca", "cuml", kind="gpu", priority=0, availability=requires("cuml", gpu=True),
                  description="cuML PCA on the GPU")
def _cuml(**params: object) -> CumlPCA:
    return CumlPCA(**params)


@register_backend("pca", "sklearn", kind="cpu", priority=0, availability=requires("sklearn"),
                  description="scikit-learn PCA")
def _sklearn(**params: object) -> SklearnPCA:
    return SklearnPCA(**params)
