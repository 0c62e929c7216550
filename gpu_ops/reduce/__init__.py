"""Dimensionality reduction ops (2-D maps and pre-clustering projections).

Every backend takes ``n_components, seed`` (+ op-specific parameters) and after ``fit(X)``
exposes ``embedding_`` of shape (n, n_components), float32. t-SNE with 3 components runs on
openTSNE (cuML is 2-D only; the registry logs the fallback); :func:`gpu_ops.reduce.tsne.perplexity_sweep`
maps several perplexities (the report draws them side by side); umap-learn's numba kernels are cached on disk across
processes (:func:`gpu_ops.reduce.umap.import_umap`).
"""

from gpu_ops.reduce import pca, tsne, umap  # noqa: F401

