"""Decoding JPEGs in batches on the extraction device (nvJPEG through torchvision on CUDA).

Loader workers only read file bytes; the main process decodes a whole batch with one
``torchvision.io.decode_jpeg`` call on the device, resizes and normalises there. Files that are
not JPEG, and JPEGs the batched decoder rejects, are decoded one by one on the CPU so a corrupt
file is quarantined instead of failing the batch.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gpu_ops.data.base import BadImageError, Dataset

JPEG_SUFFIXES = (".jpg", ".jpeg")


def read_item(dataset: Dataset, index: int) -> tuple[str, torch.Tensor]:
    """("jpeg", raw bytes (n,) uint8) for JPEG files, else ("pixels", (h, w, 3) uint8) decoded on the CPU."""
    path: Path = dataset.paths[index]  # type: ignore[attr-defined]
    if path.suffix.lower() in JPEG_SUFFIXES:
        data = path.read_bytes()
        if not data:
            raise BadImageError("empty file (0 bytes)")
        return "jpeg", torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return "pixels", torch.from_numpy(np.array(dataset.load(index), dtype=np.uint8))


def _decode(raw: list[torch.Tensor], device: str) -> list[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)  # torchvision 0.29 deprecation notice
        warnings.simplefilter("ignore", category=DeprecationWarning)
        return decode_jpeg(raw, mode=ImageReadMode.RGB, device=device)


def decode_batch(kinds: list[str], payloads: list[torch.Tensor], device: str) -> tuple[list[torch.Tensor | None], list[str]]:
    """Decode a batch to (3, h, w) uint8 tensors on ``device``; None + reason for unreadable items."""
    out: list[torch.Tensor | None] = [None] * len(kinds)
    reasons = [""] * len(kinds)
    jpeg_pos = [i for i, k in enumerate(kinds) if k == "jpeg"]
    if jpeg_pos:
        try:
            for pos, img in zip(jpeg_pos, _decode([payloads[i] for i in jpeg_pos], device)):
                out[pos] = img
        except RuntimeError:
            for pos in jpeg_pos:  # find the bad file(s): decode one at a time on the CPU
                try:
                    out[pos] = _decode([payloads[pos]], "cpu")[0].to(device)
                except RuntimeError as exc:
                    reasons[pos] = f"cannot decode JPEG ({str(exc).splitlines()[0]})"
    for i, kind in enumerate(kinds):
        if kind == "pixels":
            out[i] = payloads[i].permute(2, 0, 1).to(device)
    return out, reasons


def resize_normalise(images: list[torch.Tensor], size: int, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(3, h, w) uint8 images of any sizes -> (b, 3, size, size) float32 normalised, on their device."""
    batch = []
    for img in images:
        x = img.float().div_(255.0)[None]
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        batch.append(x)
    x = torch.cat(batch)
    return (x - mean.to(x.device)) / std.to(x.device)
