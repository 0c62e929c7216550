"""One pass over a dataset's items: what duplicates and quality flags need to know of each image.

:func:`scan_items` reads every item once and keeps only small per-item facts (a content hash,
64-bit perceptual hashes of the image and of a few altered views of it, its original size,
brightness, contrast and sharpness), so the images themselves never pile up in memory.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from gpu_ops.data.base import BadImageError

#: Sharpness and brightness are measured on a grey copy whose longer side is at most this many
#: pixels, so a 4000-px photo and a 32-px thumbnail are judged on comparable scales.
MEASURE_MAX_SIDE = 256
#: A perceptual hash has this many bits (imagehash's phash with hash_size=8).
HASH_BITS = 64
#: The views of each image that are hashed besides the image itself: its mirror image, and its
#: centre with 5, 10 and 15 % of each side cut away. A copy that was flipped or cropped that much
#: hashes close to the original's view, where its own hash is far (a 10 % crop moves 18-30 bits).
VIEWS: tuple[tuple[str, float], ...] = (("mirror", 0.0), ("crop5", 0.05), ("crop10", 0.10), ("crop15", 0.15))


@dataclass
class ItemScan:
    """Per-item facts in the order of the scanned ids (n items).

    ``content``: sha256 hex of the file's bytes (image folders) or of the item's array (in-memory
    datasets). The image fields are None for vector datasets (no pixels): ``readable`` (n,) bool,
    False for an item that could not be decoded now (its other facts are neutral placeholders that
    raise no flag, and it takes no part in perceptual matching); ``phash`` (n, 64) uint8 bits of
    the image and ``phash_views`` (n, len(VIEWS), 64) those of its :data:`VIEWS`,
    ``width``/``height`` the original size in pixels, ``luma_mean``/``luma_std`` the mean and
    standard deviation of the grey level (0..255), ``laplacian_var`` the variance of the
    Laplacian of the grey image (low: few sharp edges).
    """

    content: list[str]
    readable: np.ndarray | None = None
    phash: np.ndarray | None = None
    phash_views: np.ndarray | None = None
    width: np.ndarray | None = None
    height: np.ndarray | None = None
    luma_mean: np.ndarray | None = None
    luma_std: np.ndarray | None = None
    laplacian_var: np.ndarray | None = None

    @property
    def has_images(self) -> bool:
        return self.phash is not None


def phash_bits(image: Any) -> np.ndarray:
    """imagehash's DCT perceptual hash of a PIL image as 64 uint8 bits."""
    import imagehash

    return np.asarray(imagehash.phash(image).hash, dtype=np.uint8).reshape(-1)


def grey_measures(rgb: np.ndarray) -> tuple[float, float, float]:
    """(mean grey level, its standard deviation, variance of its Laplacian) of a uint8 image,
    measured on a copy whose longer side is at most :data:`MEASURE_MAX_SIDE` pixels."""
    from PIL import Image
    from scipy import ndimage

    im = Image.fromarray(rgb).convert("L")
    if max(im.size) > MEASURE_MAX_SIDE:
        im.thumbnail((MEASURE_MAX_SIDE, MEASURE_MAX_SIDE), Image.BILINEAR)
    grey = np.asarray(im, dtype=np.float32)
    return float(grey.mean()), float(grey.std()), float(ndimage.laplace(grey).var())


def _as_rgb(item: np.ndarray) -> np.ndarray:
    a = np.asarray(item)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    elif a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    return np.ascontiguousarray(a[:, :, :3], dtype=np.uint8)


def view(image: Any, name: str, cut: float) -> Any:
    """One of :data:`VIEWS` of a PIL image: its mirror image, or its centre without ``cut`` of each side."""
    from PIL import ImageOps

    if name == "mirror":
        return ImageOps.mirror(image)
    dx, dy = round(image.width * cut), round(image.height * cut)
    if image.width - 2 * dx < 1 or image.height - 2 * dy < 1:
        return image
    return image.crop((dx, dy, image.width - dx, image.height - dy))


def _scan_image(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, float, float]:
    from PIL import Image

    im = Image.fromarray(rgb)
    if max(im.size) > MEASURE_MAX_SIDE:  # the hashes see 32 x 32 pixels: shrink a big photo once, not per view
        im.thumbnail((MEASURE_MAX_SIDE, MEASURE_MAX_SIDE), Image.BILINEAR)
    views = np.stack([phash_bits(view(im, name, cut)) for name, cut in VIEWS])
    return (phash_bits(im), views, *grey_measures(rgb))


def _scan_one(dataset: Any, index: int, is_image: bool) -> tuple[str, Any]:
    paths = getattr(dataset, "paths", None)
    items = getattr(dataset, "items", None)
    if paths is not None:
        data = paths[index].read_bytes()
        content = hashlib.sha256(data).hexdigest()
    else:
        arr = np.ascontiguousarray(items[index] if items is not None else dataset.load(index))
        content = hashlib.sha256(f"{arr.dtype}{arr.shape}".encode() + arr.tobytes()).hexdigest()
    if not is_image:
        return content, None
    rgb = _as_rgb(dataset.load(index))
    return content, (rgb.shape[1], rgb.shape[0], *_scan_image(rgb))


def scan_items(dataset: Any, image_ids: Sequence[str], threads: int | None = None) -> ItemScan:
    """Scan the items ``image_ids`` (in that order) of ``dataset`` (:class:`~gpu_ops.data.base.Dataset`).

    Image folders are hashed by file bytes, in-memory datasets by each item's array. Items that
    cannot be decoded now (changed since extraction) keep their content hash and get neutral
    image facts (mid-grey, sharp, the median size), so they raise no flag.
    """
    position = {str(image_id): i for i, image_id in enumerate(dataset.image_ids)}
    index = [position[str(i)] for i in image_ids]
    is_image = getattr(dataset, "item_kind", "image") == "image"

    def one(i: int) -> tuple[str, Any]:
        try:
            return _scan_one(dataset, i, is_image)
        except BadImageError:
            return hashlib.sha256(f"unreadable:{i}".encode()).hexdigest(), None

    if not is_image:  # vectors: only hashed; a Parquet dataset reads them as one forward stream, not thread-safe
        return ItemScan(content=[one(i)[0] for i in index])
    threads = threads or min(8, os.cpu_count() or 1)  # decoding and resizing release the GIL
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        results = list(pool.map(one, index))
    scan = ItemScan(content=[c for c, _ in results])
    n = len(results)
    facts = [r for _, r in results if r is not None]
    median_w = int(np.median([f[0] for f in facts])) if facts else 0
    median_h = int(np.median([f[1] for f in facts])) if facts else 0
    neutral = (median_w, median_h, np.zeros(HASH_BITS, np.uint8), np.zeros((len(VIEWS), HASH_BITS), np.uint8),
               128.0, 64.0, 1e6)
    rows = [r if r is not None else neutral for _, r in results]
    scan.readable = np.array([r is not None for _, r in results], bool)
    scan.width = np.array([r[0] for r in rows], np.int32)
    scan.height = np.array([r[1] for r in rows], np.int32)
    scan.phash = np.stack([r[2] for r in rows]) if n else np.zeros((0, HASH_BITS), np.uint8)
    scan.phash_views = np.stack([r[3] for r in rows]) if n else np.zeros((0, len(VIEWS), HASH_BITS), np.uint8)
    scan.luma_mean = np.array([r[4] for r in rows], np.float32)
    scan.luma_std = np.array([r[5] for r in rows], np.float32)
    scan.laplacian_var = np.array([r[6] for r in rows], np.float32)
    return scan
