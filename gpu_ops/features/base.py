"""The extractor interface: per-item preprocessing (runs in loader workers) + batched embedding."""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np
import torch


class Extractor(ABC):
    """Turns images (or vectors) into fixed-length float32 embeddings.

    Subclasses set ``name`` and implement :meth:`preprocess` (one item -> tensor, picklable so
    DataLoader workers can run it) and :meth:`embed` (a batch tensor -> (b, d) float32).
    """

    name: str = ""
    device: str = "cpu"

    @abstractmethod
    def preprocess(self, item: np.ndarray) -> torch.Tensor:
        """One item, uint8 image (h, w[, c]) or float vector (d,), to a tensor ready to batch."""

    @abstractmethod
    def embed(self, batch: torch.Tensor) -> np.ndarray:
        """(b, ...) batch from :meth:`preprocess` -> (b, d) float32 numpy."""

    @abstractmethod
    def metadata(self) -> dict[str, str]:
        """Identity written into the store's schema: ``extractor``, ``weights``, ``weights_sha256``
        and ``preprocessing`` (JSON)."""

    def store_key(self) -> str:
        """Short hash of :meth:`metadata`: stores of different extractors/weights never mix."""
        blob = json.dumps(self.metadata(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def file_sha256(path: Path) -> str:
    """sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def to_rgb(image: np.ndarray) -> np.ndarray:
    """(h, w) or (h, w, 1|3|4) uint8 -> (h, w, 3) uint8."""
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    if image.shape[2] == 1:
        return np.repeat(image, 3, axis=2)
    return image[:, :, :3]


def describe(**fields: Any) -> str:
    """Stable JSON for the ``preprocessing`` metadata entry."""
    return json.dumps(fields, sort_keys=True)
