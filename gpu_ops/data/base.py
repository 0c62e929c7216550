"""The dataset interface shared by every reader."""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from typing import Literal

import numpy as np

Split = Literal["train", "test", "all"]
SPLITS: tuple[str, ...] = ("train", "test", "all")


class BadImageError(Exception):
    """One item could not be read; extraction quarantines it and goes on."""


class Dataset(ABC):
    """A sequence of images (or vectors) with stable ids and optional labels.

    Attributes
    ----------
    name : str
        The spec it was opened from, e.g. ``"idx:/data/mnist"``.
    image_ids : list[str]
        One stable id per item (relative path or ``split/index``).
    labels : np.ndarray or None
        (n,) int32 class ids, or None when the dataset has no labels.
    class_names : list[str] or None
        Names for the label ids when known.
    """

    name: str
    image_ids: list[str]
    labels: np.ndarray | None
    class_names: list[str] | None = None
    #: "image" items are (h, w) or (h, w, c) uint8; "vector" items are (d,) float32.
    item_kind: Literal["image", "vector"] = "image"
    #: False when images may differ in size (an image folder): pixel features then need one size.
    uniform_size: bool = True

    def __len__(self) -> int:
        return len(self.image_ids)

    @abstractmethod
    def load(self, index: int) -> np.ndarray:
        """Item ``index``: uint8 image (h, w) or (h, w, 3), or float32 vector (d,).

        Raises :class:`BadImageError` when the item cannot be read.
        """

    def source(self, index: int) -> str:
        """Where item ``index`` came from (a file path, or the dataset spec)."""
        return self.name

    @abstractmethod
    def fingerprint(self) -> str:
        """A short hash that changes when the content (or the selection of items) changes."""

    def subset(self, limit: int | None) -> "Dataset":
        """The first ``limit`` items (all when None)."""
        if limit is None or limit >= len(self):
            return self
        return _Head(self, limit)


class ArrayDataset(Dataset):
    """Items held in memory: images (n, h, w[, c]) uint8 or vectors (n, d)."""

    def __init__(self, name: str, items: np.ndarray, labels: np.ndarray | None, image_ids: list[str],
                 content_hash: str, class_names: list[str] | None = None) -> None:
        self.name = name
        self.items = items
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int32)
        self.image_ids = image_ids
        self.class_names = class_names
        self.item_kind = "vector" if items.ndim == 2 else "image"
        self._hash = content_hash

    def load(self, index: int) -> np.ndarray:
        return self.items[index]

    def fingerprint(self) -> str:
        return self._hash


class _Head(Dataset):
    """The first ``limit`` items of another dataset."""

    def __init__(self, parent: Dataset, limit: int) -> None:
        self.parent = parent
        self.name = parent.name
        self.image_ids = parent.image_ids[:limit]
        self.labels = None if parent.labels is None else parent.labels[:limit]
        self.class_names = parent.class_names
        self.item_kind = parent.item_kind
        self.uniform_size = parent.uniform_size
        self._limit = limit

    def load(self, index: int) -> np.ndarray:
        return self.parent.load(index)

    def source(self, index: int) -> str:
        return self.parent.source(index)

    def fingerprint(self) -> str:
        return hash_strings([self.parent.fingerprint(), f"head={self._limit}"])

    def __getattr__(self, attr: str):  # expose reader-specific extras (e.g. paths)
        if attr.startswith("__") or attr in ("parent", "_limit"):  # unpickling looks these up first
            raise AttributeError(attr)
        value = getattr(self.parent, attr)
        if attr in ("items", "paths"):  # per-item sequences: only the first `limit`
            return value[: self._limit]
        return value


def hash_strings(parts: list[str]) -> str:
    """sha256 over the parts, 16 hex chars."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def hash_array(arr: np.ndarray) -> str:
    """sha256 of an array's bytes, dtype and shape, 16 hex chars."""
    h = hashlib.sha256()
    h.update(f"{arr.dtype}{arr.shape}".encode())
    h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()[:16]
