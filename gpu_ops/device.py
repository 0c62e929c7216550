"""What this machine can run: CUDA and the optional GPU packages. Where each stage runs is
decided in :mod:`gpu_ops.placement` from these probes (or from a described :class:`Machine`)."""

from __future__ import annotations

import functools
import importlib
import importlib.metadata as md
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal

import numpy as np

#: The backend settings every stage accepts (ops also accept a backend's own name).
BACKEND_CHOICES = ("auto", "gpu", "cpu")

Precision = Literal["bf16", "fp16", "fp32"]
#: The first compute capability with bfloat16 tensor cores (Ampere, sm_80).
BF16_MIN_CAPABILITY = (8, 0)


def cuda_driver_present() -> bool:
    """False when this Linux machine has no CUDA driver library (``libcuda.so.1``), so no CUDA
    device can be usable; True otherwise (other systems: unknown, assume present). Loading the
    library initialises nothing; it spares a CPU machine importing torch just to learn that."""
    if not sys.platform.startswith("linux"):
        return True
    import ctypes

    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def cuda_available() -> bool:
    """True when torch sees at least one usable CUDA device (torch is not imported on a machine
    without a CUDA driver)."""
    if not cuda_driver_present():
        return False
    try:
        import torch
    except ImportError:
        return False
    try:
        return bool(torch.cuda.is_available() and torch.cuda.device_count() > 0)
    except Exception:  # a broken driver must not take the CPU path down with it
        return False


@dataclass(frozen=True)
class Machine:
    """A machine described instead of probed: whether CUDA is visible and which GPU backends
    (registry names such as ``cuml`` or ``faiss-gpu``) work on it. CPU backends are still
    checked for real. Placement decisions take one to show what they would do elsewhere."""

    cuda: bool
    gpu_backends: Iterable[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        object.__setattr__(self, "gpu_backends", frozenset(self.gpu_backends))

    def gpu_backend_status(self, name: str) -> tuple[bool, str]:
        """(usable, why) of GPU backend ``name`` on this described machine."""
        if not self.cuda:
            return False, "no CUDA device visible"
        if name in self.gpu_backends:
            return True, f"CUDA device and {name} available"
        return False, f"{name} not available"


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


def to_host(a: Any) -> np.ndarray:
    """A numpy copy of ``a``; device arrays (CuPy, anything with ``__cuda_array_interface__``) are copied back."""
    if hasattr(a, "__cuda_array_interface__"):
        import cupy

        return cupy.asnumpy(a)
    if hasattr(a, "to_numpy"):  # cuDF / pandas, should output_type ever be ignored
        return np.asarray(a.to_numpy())
    return np.asarray(a)


def precision_for(capability: tuple[int, int] | None) -> Precision:
    """The mixed precision torch work runs in on a device of compute capability ``capability``
    ((major, minor); None for the CPU): ``"bf16"`` from sm_80 (Ampere) on, ``"fp16"`` on older
    GPUs, ``"fp32"`` on the CPU.

    ``torch.cuda.is_bf16_supported()`` also answers True on pre-Ampere cards, where bfloat16 is
    emulated (slowly), so it is not asked. Training in ``"fp16"`` needs loss scaling
    (:class:`torch.amp.GradScaler`); bf16 has fp32's range and needs none.
    """
    if capability is None:
        return "fp32"
    major, minor = (int(v) for v in capability)
    return "bf16" if (major, minor) >= BF16_MIN_CAPABILITY else "fp16"


def device_capability(device: Any) -> tuple[int, int] | None:
    """(major, minor) compute capability of a CUDA ``device`` (``"cuda"``, ``"cuda:1"``, a
    ``torch.device``); None for any other device."""
    if str(getattr(device, "type", device)).split(":")[0] != "cuda":
        return None
    import torch

    index = getattr(device, "index", None) if not isinstance(device, str) else (
        int(device.split(":")[1]) if ":" in device else None)
    major, minor = torch.cuda.get_device_capability(index)
    return int(major), int(minor)


def precision_for_device(device: Any) -> Precision:
    """:func:`precision_for` the capability of ``device`` (fp32 on the CPU)."""
    return precision_for(device_capability(device))


def autocast_dtype(precision: str) -> Any:
    """The ``torch.autocast`` dtype of a precision name; None for ``"fp32"`` (no autocast)."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]
