"""Shared helpers for the deep clustering package: device, seeding, autocast, image tensors,
per-epoch evaluation, atomic checkpoint writes and the degenerate-result check."""

from __future__ import annotations

import logging
import random
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from gpu_ops.data.base import to_unit_scale
from gpu_ops.device import BACKEND_CHOICES, autocast_dtype, precision_for_device
from gpu_ops.errors import InputError
from gpu_ops.fsutil import atomic_path

log = logging.getLogger("gpu_ops.deep")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA when usable else CPU; ``"cpu"``; ``"cuda"``/``"gpu"``/``"cuda:N"``.

    Decided by :func:`gpu_ops.placement.torch_device`: asking for CUDA on a machine without it
    logs a warning and runs on the CPU.
    """
    if isinstance(device, torch.device):
        return device
    from gpu_ops.placement import torch_device

    name = str(device).lower()
    setting = "gpu" if name == "cuda" or name.startswith("cuda:") else name
    if setting not in BACKEND_CHOICES:
        raise InputError(f"unknown device {device!r}; expected one of: auto, cpu, cuda, cuda:N")
    placed = torch_device(setting)
    return torch.device(name if placed == "cuda" and name.startswith("cuda:") else placed)


def seed_everything(seed: int) -> None:
    """Seed python ``random``, numpy's global RNG and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def autocast(device: torch.device, enabled: bool = True):
    """Autocast in the device's precision (:func:`gpu_ops.device.precision_for_device`: bf16
    from compute capability 8.0 on, fp16 on older GPUs); a no-op on CPU.

    Only wrap the network's forward pass: losses, soft assignments and distances are computed
    in float32 outside of it. Training in fp16 also needs :class:`Amp`'s loss scaling.
    """
    if not enabled or device.type != "cuda":
        return nullcontext()
    return torch.autocast(device_type="cuda", dtype=autocast_dtype(precision_for_device(device)))


class Amp:
    """Mixed precision for a training loop: the forward pass's autocast and the optimiser step.

    In ``"fp16"`` the loss is scaled (:class:`torch.amp.GradScaler`) so that small gradients do
    not underflow to zero, and a step whose gradients overflowed is skipped (the scale backs
    off); ``"bf16"`` and ``"fp32"`` step plainly. ``precision`` defaults to the device's
    (:func:`gpu_ops.device.precision_for_device`).
    """

    def __init__(self, device: torch.device, precision: str | None = None) -> None:
        self.device = device
        self.precision = precision or precision_for_device(device)
        self.dtype = autocast_dtype(self.precision)
        self.scaler = torch.amp.GradScaler(device.type) if self.precision == "fp16" else None

    def autocast(self):
        """The context for the network's forward pass."""
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def step(self, loss: torch.Tensor, optimiser: torch.optim.Optimizer) -> None:
        """Backward pass of ``loss`` and the optimiser step (loss-scaled in fp16)."""
        if self.scaler is None:
            loss.backward()
            optimiser.step()
            return
        self.scaler.scale(loss).backward()
        self.scaler.step(optimiser)
        self.scaler.update()


def images_to_tensor(images: np.ndarray, image_size: int | None = None, max_side: int = 64) -> torch.Tensor:
    """Images (n, h, w[, c]) -> float32 (n, c, s, s) in [0, 1] by the pixel rule
    (:func:`gpu_ops.data.base.to_unit_scale`); float vectors (n, d) pass through.

    Images that are not square, or larger than ``max_side``, are resized (bilinear, antialiased)
    to ``image_size`` (default: ``min(max(h, w), max_side)``). Channels: 1 (grayscale) or 3;
    a 4th (alpha) channel is dropped.
    """
    arr = np.asarray(images)
    if arr.ndim == 2:
        if not np.issubdtype(arr.dtype, np.number):
            raise InputError(f"vectors must be numeric; got dtype {arr.dtype}")
        return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    if arr.ndim not in (3, 4) or len(arr) == 0:
        raise InputError(f"images must be an array (n, h, w) or (n, h, w, c) with n > 0; got shape {arr.shape}")
    if arr.ndim == 4:
        if arr.shape[-1] not in (1, 3, 4):
            raise InputError(f"images (n, h, w, c) need c in 1, 3 or 4; got shape {arr.shape}")
        arr = arr[..., :3] if arr.shape[-1] == 4 else arr
    if arr.dtype == np.uint8:
        x = torch.from_numpy(np.ascontiguousarray(arr)).float().div_(255.0)
    else:  # the pixel rule: uint16 / 65535, floats must already be in [0, 1]
        x = torch.from_numpy(np.ascontiguousarray(to_unit_scale(arr, "images")))
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2).contiguous()
    h, w = x.shape[-2:]
    size = int(image_size) if image_size else min(max(h, w), max_side)
    if (h, w) != (size, size):
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                                            antialias=size < max(h, w)).clamp_(0.0, 1.0)
    return x


def evaluate_labels(y_true: np.ndarray | None, y_pred: np.ndarray) -> dict[str, float]:
    """ACC/NMI/ARI when labels are known, else {}."""
    if y_true is None:
        return {}
    from gpu_ops.metrics import evaluate

    return evaluate(np.asarray(y_true), np.asarray(y_pred))


@contextmanager
def torch_threads_kept() -> Iterator[None]:
    """Restore torch's CPU thread count after the block.

    torch shares its OpenMP runtime with numba (UMAP) and FAISS, and their calls reset the
    runtime's thread count: after a UMAP, a torch pinned to 1 thread ran its convolutions on 2
    (an epoch took 50 s instead of 7 s with two such processes on two cores).
    """
    n = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(n)


def quick_kmeans(z: np.ndarray, k: int, seed: int, n_init: int = 1, max_iter: int = 25,
                 backend: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """k-means through the backend registry (FAISS/cuML/sklearn): (labels (n,), centres (k, d))."""
    from gpu_ops.registry import create_estimator

    est, _ = create_estimator("kmeans", backend, n_clusters=int(k), max_iter=int(max_iter),
                              n_init=int(n_init), seed=int(seed))
    with torch_threads_kept():
        est.fit(np.ascontiguousarray(z, dtype=np.float32))
    return np.asarray(est.labels_, dtype=np.int64), np.asarray(est.cluster_centers_, dtype=np.float32)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` onto ``path`` atomically."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def format_metrics(rec: dict[str, Any]) -> str:
    parts = []
    for key in ("loss", "rec", "clu", "kl", "alpha", "delta_label", "acc", "nmi", "ari"):
        if key in rec and rec[key] is not None:
            parts.append(f"{key}={rec[key]:.4f}" if isinstance(rec[key], float) else f"{key}={rec[key]}")
    return " ".join(parts)


#: Reconstruction "never improved" when the last pretraining loss is above this fraction of the
#: mean image's MSE (the best an output that ignores its input can do).
NO_IMPROVEMENT_FRACTION = 0.9


def dominant_share_limit(k: int) -> float:
    """Largest share of the images one of ``k`` clusters may hold before the partition is flagged:
    half for k >= 6, more for fewer clusters (0.6 for k=5, 0.75 for k=4, 0.9 for k <= 3)."""
    return max(0.5, min(0.9, 3.0 / max(1, k)))


def degenerate_reasons(labels: np.ndarray, k: int, pretrain: list[dict[str, Any]] | None = None,
                       dead_ratio: float = 0.01) -> list[str]:
    """Why a deep clustering result is degenerate, in words; empty when nothing looks wrong.

    Checks: one cluster holds more than :func:`dominant_share_limit` of the images; some of the
    ``k`` clusters are empty; the autoencoder's pretraining (``pretrain``: its ``pretrain``
    records, as :func:`~gpu_ops.deep.autoencoder.fit_autoencoder_tensor` returns them) ended with
    reconstructions that hardly vary with the input (less than ``dead_ratio`` of the images'
    variance), or never reconstructed much better than the mean image.
    """
    labels = np.asarray(labels)
    assigned = labels[labels >= 0]
    reasons: list[str] = []
    if k > 1 and len(assigned):
        sizes = np.bincount(assigned, minlength=k)
        share = float(sizes.max()) / len(assigned)
        if share > dominant_share_limit(k):
            reasons.append(f"one cluster holds {share:.0%} of the images (more than "
                           f"{dominant_share_limit(k):.0%} with k={k})")
        empty = int((sizes[:k] == 0).sum())
        if empty:
            reasons.append(f"{empty} of {k} clusters are empty")
    records = [r for r in (pretrain or []) if r.get("phase") == "pretrain"]
    final = records[-1] if records and "final_probe_mse" in records[-1] else None
    if final is not None and final["final_output_variance_ratio"] < dead_ratio:
        reasons.append(f"the autoencoder's reconstructions do not depend on the input (they vary "
                       f"{final['final_output_variance_ratio']:.5f} as much as the images)")
    elif final is not None and final["final_probe_mse"] >= NO_IMPROVEMENT_FRACTION * final["mean_image_mse"]:
        reasons.append(f"the autoencoder never reconstructed much better than the mean image (MSE "
                       f"{final['final_probe_mse']:.4f}, mean image {final['mean_image_mse']:.4f})")
    return reasons
