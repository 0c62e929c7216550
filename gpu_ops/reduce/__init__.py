"""Dimensionality reduction ops (2-D maps and pre-clustering projections).

Every backend takes ``n_components, seed`` (+ op-specific parameters) and after ``fit(X)``
exposes ``embedding_`` of shape (n, n_components), float32.
"""

from gpu_ops.reduce import pca, tsne, umap  # noqa: F401

REDUCERS = ("tsne", "umap", "pca")
