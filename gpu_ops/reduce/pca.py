"""PCA backends: cuML and scikit-learn."""

from __future__ import annotations

import numpy as np

from gpu_ops._validation import as_float32_matrix
from gpu_ops.errors import InputError
from gpu_ops.registry import register_backend, requires


def check_components(n_components: int, X: np.ndarray) -> None:
    """n_components must be in [1, min(n, d)]."""
    limit = min(X.shape)
    if not 1 <= int(n_components) <= limit:
        raise InputError(f"n_components={n_components} must be between 1 and min(n_samples, n_features)={limit}")


class SklearnPCA:
    """scikit-learn PCA; ``embedding_`` (n, n_components)."""

    def __init__(self, n_components: int = 2, seed: int = 0, whiten: bool = False, **_: object) -> None:
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


@register_backend("pca", "sklearn", kind="cpu", priority=0, availability=requires("sklearn"),
                  description="scikit-learn PCA")
def _sklearn(**params: object) -> SklearnPCA:
    return SklearnPCA(**params)
