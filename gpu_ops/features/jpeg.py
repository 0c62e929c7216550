"""Decoding JPEGs in batches on the extraction device (nvJPEG through torchvision on CUDA).

Loader workers only read file bytes; the main process decodes a whole batch with one
``torchvision.io.decode_jpeg`` call on the device, resizes and normalises there. Files that are
not JPEG, and JPEGs the batched decoder rejects, are decoded one by one on the CPU so a corrupt
file is quarantined instead of failing the batch; a batch that falls back is logged, and
:class:`DecodeCounts` tells how many images each path decoded.

A list of tensors is decoded in one call (nvJPEG's batched decoder on CUDA) from torchvision
0.20 on, the oldest release the project allows. torchvision 0.29 deprecates its image decoders
in favour of TorchCodec; they still work and the notice is silenced here.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gpu_ops.data.base import BadImageError, Dataset

JPEG_SUFFIXES = (".jpg", ".jpeg")

log = logging.getLogger(__name__)


@dataclass
class DecodeCounts:
    """How many images each decoding path handled (a check that device decoding really ran)."""

    batched: int = 0  #: JPEGs decoded by the one batched call on the device
    one_by_one: int = 0  #: JPEGs decoded one at a time on the CPU after the batch was rejected
    failed: int = 0  #: JPEGs no decoder could read (quarantined)
    pixels: int = 0  #: non-JPEG images, decoded on the CPU by the loader


def read_item(dataset: Dataset, index: int) -> tuple[str, torch.Tensor]:
    """("jpeg", raw bytes (n,) uint8) for JPEG files, else ("pixels", (h, w, 3) uint8) decoded on the CPU."""
    path: Path = dataset.paths[index]  # type: ignore[attr-defined]
    if path.suffix.lower() in JPEG_SUFFIXES:
        data = path.read_bytes()
        if not data:
            raise BadImageError("empty file (0 bytes)")
        return "jpeg", torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return "pixels", torch.from_numpy(np.array(dataset.load(index), dtype=np.uint8))


def _decode(raw: list[torch.Tensor] | torch.Tensor, device: str) -> list[torch.Tensor] | torch.Tensor:
    """``torchvision.io.decode_jpeg`` to RGB: a list in one call, or one tensor."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)  # torchvision 0.29 deprecation notice
        warnings.simplefilter("ignore", category=DeprecationWarning)
        return decode_jpeg(raw, mode=ImageReadMode.RGB, device=device)


def decode_batch(kinds: list[str], payloads: list[torch.Tensor], device: str,
                 counts: DecodeCounts | None = None) -> tuple[list[torch.Tensor | None], list[str]]:
    """Decode a batch to (3, h, w) uint8 tensors on ``device``; None + reason for unreadable items.

    The JPEGs go to one batched ``decode_jpeg`` call on ``device``. When it raises (a corrupt
    file, or a JPEG nvJPEG cannot read), each JPEG is decoded alone on the CPU (one tensor per
    call) and moved to ``device``; that fallback is logged. ``counts`` is updated in place.
    """
    counts = counts if counts is not None else DecodeCounts()
    out: list[torch.Tensor | None] = [None] * len(kinds)
    reasons = [""] * len(kinds)
    jpeg_pos = [i for i, k in enumerate(kinds) if k == "jpeg"]
    if jpeg_pos:
        try:
            decoded = _decode([payloads[i] for i in jpeg_pos], device)
            for pos, img in zip(jpeg_pos, decoded):
                out[pos] = img
            counts.batched += len(jpeg_pos)
        except RuntimeError as batch_error:
            log.warning("batched JPEG decoding on %s failed (%s): decoding %d JPEG(s) one by one on the CPU", device,
                        (str(batch_error).strip().splitlines() or ["?"])[0], len(jpeg_pos))
            for pos in jpeg_pos:  # find the bad file(s): decode one at a time on the CPU
                try:
                    out[pos] = _decode(payloads[pos], "cpu").to(device)  # type: ignore[union-attr]
                    counts.one_by_one += 1
                except RuntimeError as exc:
                    reasons[pos] = f"cannot decode JPEG ({str(exc).splitlines()[0]})"
                    counts.failed += 1
    for i, kind in enumerate(kinds):
        if kind == "pixels":
            out[i] = payloads[i].permute(2, 0, 1).to(device)
            counts.pixels += 1
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
