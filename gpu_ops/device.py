"""What this machine can run: CUDA, optional GPU packages, and the one place where
``backend="auto" | "gpu" | "cpu"`` is resolved."""

from __future__ import annotations

import functools
import importlib
import importlib.metadata as md
import logging
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

BACKEND_CHOICES = ("auto", "gpu", "cpu")


@functools.lru_cache(maxsize=None)
def cuda_available() -> bool:
    """True when torch sees at least one usable CUDA device."""
    try:
        import torch
    except ImportError:
        return False
    try:
        return bool(torch.cuda.is_available() and torch.cuda.device_count() > 0)
    except Exception:  # a broken driver must not take the CPU path down with it
        return False


@functools.lru_cache(maxsize=None)
def package_status(module: str) -> tuple[bool, str]:
    """Try importing ``module``; return (usable, reason) without raising.

    GPU packages can fail at import for reasons beyond "not installed" (no driver, CUDA
    mismatch), so any exception counts as unusable and its text becomes the reason.
    """
    try:
        importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - the reason is reported, not hidden
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return False, f"{module} not importable ({type(exc).__name__}: {first_line})"
    return True, f"{module} importable"


def faiss_has_gpu() -> bool:
    """True when the installed ``faiss`` module was built with GPU support and sees a GPU."""
    ok, _ = package_status("faiss")
    if not ok:
        return False
    import faiss

    get_num_gpus = getattr(faiss, "get_num_gpus", None)
    return bool(get_num_gpus and get_num_gpus() > 0)


def installed_faiss_distributions() -> list[str]:
    """Names of installed distributions that ship the ``faiss`` module.

    faiss-cpu and the faiss-gpu wheels overwrite each other's files; more than one here
    means the import may load either build.
    """
    names = []
    for dist in md.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name.startswith("faiss"):
            names.append(name)
    return sorted(set(names))


def torch_device(backend: str = "auto") -> str:
    """Resolve a torch device string ("cuda" or "cpu") from a backend setting."""
    if backend not in BACKEND_CHOICES:
        from gpu_ops.errors import choice_error

        raise choice_error("backend", backend, BACKEND_CHOICES)
    if backend == "cpu":
        return "cpu"
    if cuda_available():
        return "cuda"
    if backend == "gpu":
        log.warning("backend 'gpu' requested but CUDA is not available: running on CPU")
    return "cpu"


def to_host(a: Any) -> np.ndarray:
    """A numpy copy of ``a``; device arrays (CuPy, anything with ``__cuda_array_interface__``) are copied back."""
    if hasattr(a, "__cuda_array_interface__"):
        import cupy

        return cupy.asnumpy(a)
    if hasattr(a, "to_numpy"):  # cuDF / pandas, should output_type ever be ignored
        return np.asarray(a.to_numpy())
    return np.asarray(a)
