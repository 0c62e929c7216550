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
#: imagehash's phash sees a grey thumbnail of this side (hash_size 8 x highfreq_factor 4).
PHASH_SIDE = 32
#: The views of each image that are hashed besides the image itself: its mirror image, and its
#: centre with 5, 10 and 15 % of each side cut away. A copy that was flipped or cropped that much
#: hashes close to the original's view, where its own hash is far (a 10 % crop moves 18-30 bits).
VIEWS: tuple[tuple[str, float], ...] = (("mirror", 0.0), ("crop5", 0.05), ("crop10", 0.10), ("crop15", 0.15))
#: Bytes of an item's content digest (sha256).
DIGEST_BYTES = 32
#: Items scanned (submitted to the thread pool) at a time.
SCAN_CHUNK = 4096
#: Image files of at least this median size (of the first :data:`SIZE_SAMPLE_FILES`) are scanned
#: by several threads: decoding them, which releases the GIL, outweighs the per-item Python work.
PHOTO_FILE_BYTES = 32 * 1024
SIZE_SAMPLE_FILES = 64


@dataclass
class ItemScan:
    """Per-item facts in the order of the scanned ids (n items).

    ``content``: (n,) ``S32`` sha256 digests of the file's bytes (image folders) or of the item's
    array (in-memory datasets). The image fields are None for vector datasets (no pixels): ``readable`` (n,) bool,
    False for an item that could not be decoded now (its other facts are neutral placeholders that
    raise no flag, and it takes no part in perceptual matching); ``phash`` (n, 64) uint8 bits of
    the image and ``phash_views`` (n, len(VIEWS), 64) those of its :data:`VIEWS`,
    ``width``/``height`` the original size in pixels, ``luma_mean``/``luma_std`` the mean and
    standard deviation of the grey level (0..255), ``laplacian_var`` the variance of the
    Laplacian of the grey image (low: few sharp edges).
    """

    content: np.ndarray
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


def phash_thumbnail(image: Any) -> np.ndarray:
    """The grey :data:`PHASH_SIDE` x :data:`PHASH_SIDE` thumbnail (uint8) imagehash's ``phash`` hashes."""
    from PIL import Image

    return np.asarray(image.convert("L").resize((PHASH_SIDE, PHASH_SIDE), Image.LANCZOS), dtype=np.uint8)


def phash_of_thumbnails(thumbs: np.ndarray) -> np.ndarray:
    """imagehash's ``phash`` bits (..., 64) uint8 of grey thumbnails (..., 32, 32) from
    :func:`phash_thumbnail`: the same bits as ``imagehash.phash(image).hash`` of each image, its
    low-frequency 8 x 8 block of the 2-D DCT-II (scipy's unnormalised) computed for all of them
    as two small matrix products instead of one FFT call per image."""
    side = int(np.sqrt(HASH_BITS))
    k, n = np.arange(side)[:, None], np.arange(PHASH_SIDE)[None, :]
    basis = 2.0 * np.cos(np.pi * k * (2 * n + 1) / (2 * PHASH_SIDE))  # (8, 32) rows of DCT-II
    low = (basis @ np.asarray(thumbs, dtype=np.float64) @ basis.T).reshape(*np.shape(thumbs)[:-2], HASH_BITS)
    return (low > np.median(low, axis=-1, keepdims=True)).astype(np.uint8)


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


def _scan_image(rgb: np.ndarray) -> tuple[np.ndarray, float, float, float]:
    """The phash thumbnails (1 + len(VIEWS), 32, 32) of the image and its views, then its grey measures."""
    from PIL import Image

    im = Image.fromarray(rgb)
    if max(im.size) > MEASURE_MAX_SIDE:  # the hashes see 32 x 32 pixels: shrink a big photo once, not per view
        im.thumbnail((MEASURE_MAX_SIDE, MEASURE_MAX_SIDE), Image.BILINEAR)
    grey = im.convert("L")  # a view of the grey image is the grey image of the view
    thumbs = np.stack([phash_thumbnail(grey)] + [phash_thumbnail(view(grey, name, cut)) for name, cut in VIEWS])
    return (thumbs, *grey_measures(rgb))


def _content_hash(arr: np.ndarray) -> bytes:
    """sha256 digest of an in-memory item: its dtype, shape and bytes."""
    arr = np.ascontiguousarray(arr)
    return hashlib.sha256(f"{arr.dtype}{arr.shape}".encode() + arr.tobytes()).digest()


def _scan_one(dataset: Any, index: int, is_image: bool) -> tuple[bytes, Any]:
    paths = getattr(dataset, "paths", None)
    items = getattr(dataset, "items", None)
    if paths is not None:
        content = hashlib.sha256(paths[index].read_bytes()).digest()
    else:
        content = _content_hash(items[index] if items is not None else dataset.load(index))
    if not is_image:
        return content, None
    rgb = _as_rgb(dataset.load(index))
    return content, (rgb.shape[1], rgb.shape[0], *_scan_image(rgb))


def _positions(dataset: Any, image_ids: Sequence[str]) -> range | list[int]:
    """The dataset index of each of ``image_ids``: ``range(n)`` when they are the dataset's own ids in
    its order (the usual case: a store lists its dataset's items in order), without a dict of n strings."""
    own = dataset.image_ids
    same = len(own) == len(image_ids)
    if same and hasattr(own, "array") and hasattr(image_ids, "array"):  # Arrow-backed id columns
        same = own.array.equals(image_ids.array)  # type: ignore[attr-defined]
    elif same:
        same = all(str(a) == str(b) for a, b in zip(own, image_ids))
    if same:
        return range(len(own))
    position = {str(image_id): i for i, image_id in enumerate(own)}
    return [position[str(i)] for i in image_ids]


def _vector_contents(dataset: Any, n: int) -> np.ndarray:
    """Content digests of a vector dataset's first ``n`` rows, streamed in row order (``dataset.rows``):
    the same digests :func:`_scan_one` makes item by item."""
    out = np.empty(n, dtype=f"S{DIGEST_BYTES}")
    for start in range(0, n, SCAN_CHUNK):
        X = dataset.rows(start, min(n, start + SCAN_CHUNK))
        for i, row in enumerate(X):
            out[start + i] = _content_hash(row)
    return out


def scan_threads(dataset: Any) -> int:
    """Threads that scan ``dataset`` fastest: one per core (up to 8) for files of photos, whose
    decoding releases the GIL; one for thumbnails and in-memory items, where the per-item Python
    work holds it and more threads only contend (3,000 CIFAR-10 JPEGs on 2 cores: 1.4 s with one
    thread, 2.6 s with two; 1600 x 1200 photos: 3.3 s with one, 1.5 s with two)."""
    paths = getattr(dataset, "paths", None)
    if paths is None or len(paths) == 0:
        return 1
    sizes = [p.stat().st_size for p in paths[:SIZE_SAMPLE_FILES] if p.exists()]
    return min(8, os.cpu_count() or 1) if sizes and np.median(sizes) >= PHOTO_FILE_BYTES else 1


def scan_items(dataset: Any, image_ids: Sequence[str], threads: int | None = None) -> ItemScan:
    """Scan the items ``image_ids`` (in that order) of ``dataset`` (:class:`~gpu_ops.data.base.Dataset`).

    Image folders are hashed by file bytes, in-memory datasets by each item's array. Items that
    cannot be decoded now (changed since extraction) keep their content hash and get neutral
    image facts (mid-grey, sharp, the median size), so they raise no flag.

    Memory: the per-item facts only (about 400 bytes an image, 32 bytes a vector); items are
    scanned :data:`SCAN_CHUNK` at a time, and a vector dataset that reads rows in ranges
    (``parquet:DIR``) is streamed in row order.
    """
    index = _positions(dataset, image_ids)
    n = len(index)
    is_image = getattr(dataset, "item_kind", "image") == "image"
    if not is_image and isinstance(index, range) and hasattr(dataset, "rows"):
        return ItemScan(content=_vector_contents(dataset, n))

    def one(i: int) -> tuple[bytes, Any]:
        try:
            return _scan_one(dataset, i, is_image)
        except BadImageError:
            return hashlib.sha256(f"unreadable:{i}".encode()).digest(), None

    scan = ItemScan(content=np.empty(n, dtype=f"S{DIGEST_BYTES}"))
    if is_image:
        scan.readable = np.zeros(n, bool)
        scan.width, scan.height = np.zeros(n, np.int32), np.zeros(n, np.int32)
        scan.phash = np.zeros((n, HASH_BITS), np.uint8)
        scan.phash_views = np.zeros((n, len(VIEWS), HASH_BITS), np.uint8)
        scan.luma_mean, scan.luma_std, scan.laplacian_var = (np.zeros(n, np.float32) for _ in range(3))
    threads = threads or scan_threads(dataset)
    if not is_image:
        threads = 1  # vectors are only hashed; a Parquet dataset reads them as one forward stream, not thread-safe
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        each = pool.map if threads > 1 else map  # one thread: no future and no hand-over per item
        for start in range(0, n, SCAN_CHUNK):  # a chunk at a time: no future or result per item piles up
            read: list[int] = []
            thumbs: list[np.ndarray] = []
            for j, (content, facts) in enumerate(each(one, index[start:start + SCAN_CHUNK]), start):
                scan.content[j] = content
                if facts is not None:
                    read.append(j)
                    thumbs.append(facts[2])
                    scan.width[j], scan.height[j] = facts[:2]  # type: ignore[index]
                    scan.luma_mean[j], scan.luma_std[j], scan.laplacian_var[j] = facts[3:]  # type: ignore[index]
            if read:
                bits = phash_of_thumbnails(np.stack(thumbs))  # (m, 1 + len(VIEWS), 64)
                scan.readable[read] = True  # type: ignore[index]
                scan.phash[read], scan.phash_views[read] = bits[:, 0], bits[:, 1:]  # type: ignore[index]
    if is_image:
        _neutral_unreadable(scan)
    return scan


def _neutral_unreadable(scan: ItemScan) -> None:
    """Give unreadable items neutral facts: the median size of the readable ones, zero hashes,
    mid-grey, some contrast, sharp."""
    assert scan.readable is not None and scan.width is not None and scan.height is not None
    bad = ~scan.readable
    if not bad.any():
        return
    ok = scan.readable
    scan.width[bad] = int(np.median(scan.width[ok])) if ok.any() else 0
    scan.height[bad] = int(np.median(scan.height[ok])) if ok.any() else 0
    scan.luma_mean[bad], scan.luma_std[bad], scan.laplacian_var[bad] = 128.0, 64.0, 1e6  # type: ignore[index]
