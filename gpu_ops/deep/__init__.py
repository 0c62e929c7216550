"""Deep clustering in torch: autoencoders (dense d-500-500-2000-z and convolutional), Deep
K-Means, DEC, IDEC and N2D (AE -> UMAP -> GMM), behind one entry point :func:`fit_deep`.

Runs on CUDA when present (bf16/fp16 autocast for the network forward passes only), on the CPU
otherwise. Never imports Prefect.

>>> from gpu_ops.deep import fit_deep
>>> res = fit_deep("n2d", images, n_clusters=10, seed=0, labels=y)   # doctest: +SKIP
>>> res.labels, res.metrics, res.timings                               # doctest: +SKIP

:func:`train_autoencoder` / :func:`encode` are also the building blocks of the
``autoencoder`` feature extractor.
"""

from gpu_ops.deep.api import METHODS, DeepConfig, DeepResult, fit_deep
from gpu_ops.deep.autoencoder import (
    ARCHS,
    AEHistory,
    AutoencoderConfig,
    ConvAutoencoder,
    DenseAutoencoder,
    build_autoencoder,
    checkpoint_key,
    encode,
    encode_with_error,
    load_autoencoder,
    train_autoencoder,
)
from gpu_ops.deep.dec import student_t_assign, target_distribution
from gpu_ops.deep.dkm import alpha_schedule, dkm_assignments, dkm_cluster_loss

__all__ = [
    "METHODS", "DeepConfig", "DeepResult", "fit_deep",
    "ARCHS", "AEHistory", "AutoencoderConfig", "ConvAutoencoder", "DenseAutoencoder", "build_autoencoder",
    "checkpoint_key", "encode", "encode_with_error", "load_autoencoder", "train_autoencoder",
    "student_t_assign", "target_distribution", "alpha_schedule", "dkm_assignments", "dkm_cluster_loss",
]
