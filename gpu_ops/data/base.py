"""The dataset interface shared by every reader."""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from typing import Literal

import numpy as np

from gpu_ops.errors import InputError

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

    def collection_id(self) -> str | None:
        """A short hash of *which* collection this is (not of its content), for datasets whose
        items are files that can be added, changed and removed one by one: their embedding store
        is refreshed in place (:mod:`gpu_ops.incremental`). None (the default): the dataset is
        one immutable whole, and its store is keyed by :meth:`fingerprint`."""
        return None

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

    def collection_id(self) -> str | None:
        parent = self.parent.collection_id()
        return None if parent is None else hash_strings([parent, f"head={self._limit}"])

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


# --- Numbers in, numbers checked -------------------------------------------------------------
#
# The one rule for pixel values. Every reader turns image arrays into the pipeline's uint8 images
# through :func:`to_uint8_images`, and every extractor that needs [0, 1] floats goes through
# :func:`to_unit_scale`, so a value is never rescaled by a guess from the data (such as its maximum).

#: The rule in words (the README states it for users).
SCALE_RULE = ("uint8 images are divided by 255, uint16 by 65535, bool is 0/1, other integer types must hold "
              "0..255; float images must already be in [0, 1]")
_FLOAT_HINT = "float images must be scaled to [0, 1]; uint8 and uint16 are scaled automatically"


def index_text(name: str, shape: tuple[int, ...], flat: int) -> str:
    """``X[12, 3, 4]``: the array name and the multi-index of flat position ``flat``."""
    return f"{name}[{', '.join(str(int(i)) for i in np.unravel_index(flat, shape))}]"


def _value_text(value: object) -> str:
    return f"{value:.6g}" if isinstance(value, (float, np.floating)) else str(value)


def _refuse_first(bad: np.ndarray, arr: np.ndarray, where: str, name: str, why: str) -> None:
    """Raise InputError naming the first True position of ``bad`` when there is one."""
    if bad.any():
        flat = int(np.argmax(bad.reshape(-1)))
        value = arr.reshape(-1)[flat]
        raise InputError(f"{where}: {index_text(name, arr.shape, flat)} = {_value_text(value)} {why}")


def pixel_full_scale(images: np.ndarray, where: str, name: str = "X") -> float:
    """Check ``images`` against :data:`SCALE_RULE` and return the value that means full intensity.

    Raises :class:`InputError` naming ``where`` and the first bad index: a float outside [0, 1]
    (NaN and inf included), an integer of another type outside 0..255, or a non-numeric dtype.
    """
    dtype = images.dtype
    if dtype == np.uint8:
        return 255.0
    if dtype == np.uint16:
        return 65535.0
    if dtype == np.bool_:
        return 1.0
    if np.issubdtype(dtype, np.integer):
        _refuse_first((images < 0) | (images > 255), images, where, name,
                      f"is outside 0..255 ({dtype} images hold 8-bit values; store 16-bit images as uint16)")
        return 255.0
    if np.issubdtype(dtype, np.floating):
        # NaN fails both comparisons, so it is caught with the out-of-range values.
        _refuse_first(~((images >= 0) & (images <= 1)), images, where, name, f"is outside [0, 1] ({_FLOAT_HINT})")
        return 1.0
    raise InputError(f"{where}: {name} has dtype {dtype}; images must be uint8, uint16, bool or float in [0, 1]")


def to_unit_scale(images: np.ndarray, where: str, name: str = "X") -> np.ndarray:
    """Pixel values as float32 in [0, 1] by :data:`SCALE_RULE` (uint8 / 255, uint16 / 65535, ...)."""
    images = np.asarray(images)
    full = pixel_full_scale(images, where, name)
    out = images.astype(np.float32)
    if full != 1.0:
        out /= np.float32(full)
    return out


def to_uint8_images(images: np.ndarray, where: str, name: str = "X") -> np.ndarray:
    """Images as the pipeline's uint8 (0..255) by :data:`SCALE_RULE`, rounded to the nearest level."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images
    full = pixel_full_scale(images, where, name)
    if images.dtype == np.uint16:  # exact integer rounding: 257 * v maps back to v
        return ((images.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    if full == 255.0:  # other integer types, already checked to hold 0..255
        return images.astype(np.uint8)
    return np.rint(images.astype(np.float32) * np.float32(255.0)).astype(np.uint8)


def max_abs_vector_value(d: int) -> float:
    """The largest |x| allowed in d-dimensional vectors: squared distances between two of them
    (at most d * (2 |x|)^2) must stay finite in float32."""
    return math.sqrt(float(np.finfo(np.float32).max) / (4.0 * max(d, 1)))


def check_vectors(X: np.ndarray, where: str, name: str = "X") -> np.ndarray:
    """(n, d) numbers as float32, refusing NaN, inf and values that would overflow float32
    distance arithmetic; the message names ``where`` and the first bad index."""
    X = np.asarray(X)
    if not (np.issubdtype(X.dtype, np.integer) or np.issubdtype(X.dtype, np.floating) or X.dtype == np.bool_):
        raise InputError(f"{where}: {name} has dtype {X.dtype}; vectors must be numbers (integer or float)")
    if X.dtype == np.bool_:
        return X.astype(np.float32)
    if np.issubdtype(X.dtype, np.floating):
        _refuse_first(~np.isfinite(X), X, where, name, "is not a finite number")
    limit = max_abs_vector_value(X.shape[1] if X.ndim == 2 else 1)
    _refuse_first((X > limit) | (X < -limit), X, where, name,
                  f"is too large: |x| must be at most {limit:.3g} for {X.shape[-1]}-d vectors "
                  "(squared distances must fit in float32)")
    return X.astype(np.float32)


def check_labels(y: np.ndarray, n: int, where: str, name: str = "y") -> np.ndarray:
    """(n,) class labels as int32: integers >= 0 (floats only when whole numbers); the message
    names ``where`` and the first bad index."""
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != n:
        raise InputError(f"{where}: {name} must hold one label per row of X ({n}); got shape {y.shape}")
    if y.dtype == np.bool_:
        return y.astype(np.int32)
    if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
        raise InputError(f"{where}: {name} has dtype {y.dtype}; labels must be integers >= 0")
    why = "is not a class label (labels must be integers >= 0; leave y out when there are none)"
    bad = (y < 0) | (y > np.iinfo(np.int32).max)
    if np.issubdtype(y.dtype, np.floating):
        bad |= ~np.isfinite(y) | (y != np.floor(y))
    _refuse_first(bad, y, where, name, why)
    return y.astype(np.int32)
