"""Shared argument checks with messages that quote the bad value."""

from __future__ import annotations

import numpy as np

from gpu_ops.errors import InputError


def as_float32_matrix(X: object, what: str = "X") -> np.ndarray:
    """Return ``X`` as a C-contiguous float32 array of shape (n, d), or raise InputError."""
    arr = np.asarray(X)
    if arr.ndim != 2:
        raise InputError(f"{what} must be a 2-D array (n_samples, n_features); got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InputError(f"{what} is empty: shape {arr.shape}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise InputError(f"{what} contains NaN or infinite values")
    return arr


def check_n_clusters(n_clusters: int, n_samples: int) -> None:
    """k must be an int in [1, n_samples]."""
    if not isinstance(n_clusters, (int, np.integer)) or isinstance(n_clusters, bool) or n_clusters < 1:
        raise InputError(f"n_clusters must be a positive integer; got {n_clusters!r}")
    if n_clusters > n_samples:
        raise InputError(f"k={n_clusters} is larger than the number of images ({n_samples})")


def check_int(name: str, value: object, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum`` (1: positive, 0: non-negative), or raise InputError."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        kind = "a positive integer" if minimum == 1 else "a non-negative integer" if minimum == 0 else f"an integer >= {minimum}"
        raise InputError(f"{name} must be {kind}; got {value!r}")
    return int(value)
