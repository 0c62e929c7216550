"""Readers for each dataset kind."""

from __future__ import annotations

import gzip
import importlib.util
import math
import os
import zipfile
import zlib
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from gpu_ops.data.base import (ArrayDataset, BadImageError, Dataset, check_labels, check_vectors, hash_array,
                               hash_strings, to_uint8_images)
from gpu_ops.errors import InputError
from gpu_ops.rundir import is_run_dir

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def _split_ids(prefix: str, n: int) -> list[str]:
    return [f"{prefix}/{i:07d}" for i in range(n)]


def _concat_splits(name: str, parts: list[tuple[str, np.ndarray, np.ndarray | None]],
                   class_names: list[str] | None = None) -> ArrayDataset:
    """Join (split, items, labels) parts in order; ids are ``split/index``."""
    items = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    has_labels = all(p[2] is not None for p in parts)
    labels = np.concatenate([p[2] for p in parts]) if has_labels else None  # type: ignore[misc]
    ids = [i for split, arr, _ in parts for i in _split_ids(split, len(arr))]
    content = hash_strings([hash_array(items), hash_array(labels) if labels is not None else "nolabels"])
    return ArrayDataset(name, items, labels, ids, content, class_names)


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images (1797, 8, 8) in 0..16, labels) of scikit-learn's bundled digits.

    Read from the CSV file scikit-learn ships (what ``load_digits`` reads), found without importing
    scikit-learn: that import takes seconds, and a run with nothing else for it to do should not
    pay them. ``load_digits`` where the file is not found."""
    spec = importlib.util.find_spec("sklearn")
    csv = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if csv is not None and csv.is_file():
        with gzip.open(csv, "rt") as fh:
            data = np.loadtxt(fh, delimiter=",")
        return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images, bunch.target


def digits(split: str) -> ArrayDataset:
    """scikit-learn's bundled digits: 1,797 images of 8x8, 10 classes; no train/test split."""
    pixels, target = _digits_arrays()
    images = to_uint8_images(pixels / 16.0, "digits")  # 17 grey levels 0..16
    return _concat_splits("digits", [("digits", images, target.astype(np.int32))],
                          [str(c) for c in range(10)])


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (optionally gzipped) into an array of its declared shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise InputError(f"{path}: cannot read IDX file ({exc})") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise InputError(f"{path}: not an IDX file (bad magic number)")
    dtype_code, ndim = data[2], data[3]
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if dtype_code not in dtypes:
        raise InputError(f"{path}: unknown IDX data type 0x{dtype_code:02x}")
    offset = 4 + 4 * ndim
    if ndim == 0 or len(data) < offset:
        raise InputError(f"{path}: IDX header declares {ndim} dimensions but the file holds {len(data)} bytes")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    expected = math.prod(dims) * np.dtype(dtypes[dtype_code]).itemsize
    if len(data) - offset != expected:
        raise InputError(f"{path}: IDX header says shape {dims} but the file holds {len(data) - offset} bytes of data")
    return np.frombuffer(data, dtype=dtypes[dtype_code], offset=offset).reshape(dims).astype(dtypes[dtype_code][1:])


def _find_idx(directory: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem, stem.replace("-idx", ".idx") + ".gz", stem.replace("-idx", ".idx")):
        if (directory / name).is_file():
            return directory / name
    return None


def idx(directory: Path, split: str) -> ArrayDataset:
    """MNIST-style IDX files: ``train-images-idx3-ubyte[.gz]`` / ``t10k-images-idx3-ubyte[.gz]``
    and the matching label files (labels optional)."""
    if not directory.is_dir():
        raise InputError(f"{directory}: IDX dataset directory does not exist")
    wanted = {"train": ["train"], "test": ["t10k"], "all": ["train", "t10k"]}[split]
    parts = []
    for prefix in wanted:
        images_path = _find_idx(directory, f"{prefix}-images-idx3-ubyte")
        if images_path is None:
            raise InputError(f"{directory}: no {prefix}-images-idx3-ubyte[.gz] file for split {split!r}")
        raw = read_idx(images_path)
        if raw.ndim not in (3, 4):
            raise InputError(f"{images_path}: expected n x h x w images; the IDX file holds shape {list(raw.shape)}")
        images = to_uint8_images(raw, str(images_path), "images")
        labels_path = _find_idx(directory, f"{prefix}-labels-idx1-ubyte")
        labels = None
        if labels_path is not None:
            raw_labels = read_idx(labels_path)
            if raw_labels.ndim != 1 or len(raw_labels) != len(images):
                raise InputError(f"{labels_path}: {len(raw_labels)} labels for {len(images)} images")
            labels = check_labels(raw_labels, len(images), str(labels_path), "labels")
        parts.append(("train" if prefix == "train" else "test", images, labels))
    return _concat_splits(f"idx:{directory}", parts)


def usps(path: Path, split: str) -> ArrayDataset:
    """USPS digits in the common HDF5 layout (train/data, train/target, test/...), 16x16."""
    import h5py

    if not path.is_file():
        raise InputError(f"{path}: USPS file does not exist")
    parts = []
    try:
        fh = h5py.File(path, "r")
    except OSError as exc:
        raise InputError(f"{path}: not a readable HDF5 file ({exc})") from None
    with fh:
        for name in {"train": ["train"], "test": ["test"], "all": ["train", "test"]}[split]:
            group = fh.get(name)
            if not isinstance(group, h5py.Group) or not isinstance(group.get("data"), h5py.Dataset) \
                    or not isinstance(group.get("target"), h5py.Dataset):
                raise InputError(f"{path}: USPS HDF5 needs datasets {name}/data and {name}/target "
                                 f"(top level holds: {', '.join(fh.keys()) or 'nothing'})")
            try:
                data, target = np.asarray(group["data"]), np.asarray(group["target"])
            except (OSError, ValueError, TypeError) as exc:
                raise InputError(f"{path}: cannot read {name}/data or {name}/target ({exc})") from None
            if data.size == 0 or data.size % 256 != 0 or data.size // 256 != len(data):
                raise InputError(f"{path}: {name}/data must hold 16x16 images (n x 256); got shape {data.shape}")
            images = to_uint8_images(data, str(path), f"{name}/data").reshape(-1, 16, 16)
            parts.append((name, images, check_labels(target, len(images), str(path), f"{name}/target")))
    return _concat_splits(f"usps:{path}", parts)


def arrays(path: Path) -> ArrayDataset:
    """``.npz`` with ``X`` (n x h x w [x c] images or n x d vectors) and optional ``y``; or a ``.npy`` of X."""
    if not path.is_file():
        raise InputError(f"{path}: array file does not exist")
    X, y = _load_arrays(path)
    if X.ndim not in (2, 3, 4) or X.size == 0:
        raise InputError(f"{path}: X must be n x d vectors or n x h x w [x c] images; got shape {X.shape}")
    if X.ndim == 4 and X.shape[-1] not in (1, 3, 4):
        raise InputError(f"{path}: images must be n x h x w x c with c in 1, 3 or 4; got shape {X.shape}")
    labels = None if y is None else check_labels(y, len(X), str(path))
    X = check_vectors(X, str(path)) if X.ndim == 2 else to_uint8_images(X, str(path))
    return _concat_splits(f"npz:{path}", [(path.stem, X, labels)])


def _load_arrays(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """``X`` and ``y`` (or None) from an .npz, or ``X`` from an .npy; any unreadable file is an InputError."""
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            return loaded, None
        with loaded as npz:
            if "X" not in npz.files:
                raise InputError(f"{path}: .npz has no array 'X' (found: {', '.join(npz.files) or 'nothing'})")
            return npz["X"], (npz["y"] if "y" in npz.files else None)
    except InputError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, KeyError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"{path}: cannot read arrays ({detail})") from None


def image_files(root: Path) -> Iterator[Path]:
    """Image files in the tree under ``root``, skipping hidden files and folders and every gpuclust
    run directory (a run written inside the folder, its figures included, is not data)."""
    for top, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".") and not is_run_dir(Path(top, d))]
        for name in files:
            path = Path(top, name)
            if not name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                yield path


class FolderDataset(Dataset):
    """Images in a folder tree. Labels come from class-named subfolders when every image sits in
    one (``root/cat/1.jpg``); otherwise there are none. Ids are paths relative to the root."""

    uniform_size = False

    def __init__(self, root: Path) -> None:
        if not root.exists():
            raise InputError(f"{root}: image folder does not exist")
        if not root.is_dir():
            raise InputError(f"{root}: expected a folder of images, found a file")
        paths = sorted(image_files(root))
        if not paths:
            raise InputError(f"{root}: no image files ({', '.join(IMAGE_SUFFIXES)}) in the folder")
        self.root = root
        self.name = f"folder:{root}"
        self.paths = paths
        self.image_ids = [p.relative_to(root).as_posix() for p in paths]
        top = [p.relative_to(root).parts for p in paths]
        if all(len(parts) == 2 for parts in top) and len({parts[0] for parts in top}) > 1:
            self.class_names = sorted({parts[0] for parts in top})
            index = {c: i for i, c in enumerate(self.class_names)}
            self.labels = np.array([index[parts[0]] for parts in top], dtype=np.int32)
        else:
            self.class_names, self.labels = None, None

    def load(self, index: int) -> np.ndarray:
        """Decode to (h, w, 3) uint8 RGB (see :func:`decode_image`)."""
        return decode_image(self.paths[index])

    def source(self, index: int) -> str:
        return str(self.paths[index])

    def fingerprint(self) -> str:
        parts = []
        for p in self.paths:
            st = p.stat()
            parts.append(f"{p.relative_to(self.root).as_posix()}:{st.st_size}:{st.st_mtime_ns}")
        return hash_strings(parts)

    def collection_id(self) -> str:
        """The folder itself (its resolved path), whatever it holds today: one store per folder,
        refreshed image by image."""
        return hash_strings(["folder", str(self.root.resolve())])


#: Pillow modes holding one channel of 16-bit (``I;16*``) or 32-bit integer (``I``) values. A
#: 16-bit PNG opens as one of them; its values are scaled 0..65535 -> 0..255 by the pixel rule.
_WIDE_INTEGER_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def decode_image(path: Path) -> np.ndarray:
    """Decode one image file to (h, w, 3) uint8 RGB.

    Grayscale, palette and RGBA are converted (transparency over white). 16-bit images are
    scaled by the pixel rule (:data:`gpu_ops.data.base.SCALE_RULE`), float images must be in
    [0, 1]. Raises :class:`BadImageError` for a file that cannot be decoded, including one Pillow
    refuses as a decompression bomb (over twice ``PIL.Image.MAX_IMAGE_PIXELS`` pixels), so
    extraction quarantines it and goes on.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        if path.stat().st_size == 0:
            raise BadImageError("empty file (0 bytes)")
        with Image.open(path) as im:
            im.load()
            if im.mode in _WIDE_INTEGER_MODES or im.mode == "F":
                return _gray_to_rgb(_scaled_gray(np.asarray(im), im.mode))
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                background = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(background, im)
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except BadImageError:
        raise
    except UnidentifiedImageError:
        raise BadImageError("not a recognised image format") from None
    except Image.DecompressionBombError as exc:
        raise BadImageError(f"image too large ({exc})") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise BadImageError(f"cannot decode image ({exc})") from None


def _scaled_gray(values: np.ndarray, mode: str) -> np.ndarray:
    """One-channel 16-bit, 32-bit integer or float pixels -> (h, w) uint8 by the pixel rule."""
    arr = values
    if mode != "F":
        # Mode "I" is how 16-bit PNGs used to open; values past 16 bits have no known scale.
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise BadImageError(f"mode {mode} pixel values {values.min()}..{values.max()} are outside "
                                "the 16-bit range 0..65535")
        arr = values.astype(np.uint16)
    try:
        return to_uint8_images(arr, f"mode {mode} image", "pixel")
    except InputError as exc:
        raise BadImageError(str(exc)) from None


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[:, :, None], 3, axis=2)


class IdColumn(Sequence[str]):
    """A read-only sequence of strings over an Arrow string array: the ``image_ids`` of a large
    dataset without a Python string per row (2,000,000 ids: ~30 MB instead of ~130 MB)."""

    def __init__(self, array: Any) -> None:
        self.array = array

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self.array))
            if step == 1:
                return IdColumn(self.array.slice(start, max(0, stop - start)))
            return [self[i] for i in range(start, stop, step)]
        if index < 0:
            index += len(self.array)
        return self.array[index].as_py()

    def __iter__(self) -> Iterator[str]:
        for chunk in range(0, len(self.array), 65_536):
            yield from self.array.slice(chunk, 65_536).to_pylist()


#: Rows per record batch :class:`ParquetEmbeddings` decodes at a time.
PARQUET_BATCH_ROWS = 16_384
#: The content hash of the Parquet embeddings last verified in this process, by the files' (path,
#: size, mtime): a run opens its dataset several times (checks, cache key, extraction).
_VERIFIED: dict[tuple[tuple[str, int, int], ...], str] = {}


class ParquetEmbeddings(Dataset):
    """Embeddings already in the store format (``embedding`` column, ``image_id``, optional ``label``),
    read in bounded memory: opening reads the id and label columns and streams the vectors once,
    batch by batch, to check every value and hash the content (once per process for unchanged
    files); :meth:`rows` streams them again for the extract stage.

    Every part is checked as :func:`gpu_ops.store.read_embeddings` checks it: readable Parquet, the
    same columns and embedding dimension as the first, unique ``image_id``s, finite values that
    float32 distances can hold. Failures are InputErrors naming the file.
    """

    item_kind = "vector"

    def __init__(self, directory: Path) -> None:
        import pyarrow as pa

        from gpu_ops.store import open_part, part_files, read_part

        self.directory = Path(directory)
        self.name = f"parquet:{directory}"
        self.files = part_files(self.directory)
        ids, labels, counts = [], [], []
        first: tuple[Path, list[str], int] | None = None
        null_labels = 0
        for path in self.files:
            schema = open_part(path).schema_arrow
            for col in ("image_id", "embedding"):
                if col not in schema.names:
                    raise InputError(f"{path}: Parquet file lacks the {col!r} column (found: {', '.join(schema.names)})")
            etype = schema.field("embedding").type
            if not pa.types.is_fixed_size_list(etype):
                raise InputError(f"{path}: the embedding column must be fixed_size_list<float32>; got {etype}")
            columns, dim = list(schema.names), int(etype.list_size)
            if first is None:
                first = (path, columns, dim)
            elif columns != first[1]:
                raise InputError(f"{path}: columns ({', '.join(columns)}) differ from those of {first[0].name} "
                                 f"({', '.join(first[1])})")
            elif dim != first[2]:
                raise InputError(f"{path}: embedding dimension {dim} differs from {first[0].name}'s {first[2]}")
            table = read_part(path, columns=["image_id", "label"] if "label" in columns else ["image_id"])
            ids.append(table.column("image_id").cast(pa.string()).combine_chunks())
            counts.append(table.num_rows)
            if "label" in columns:
                null_labels += table.column("label").null_count
                labels.append(table.column("label").fill_null(-1).to_numpy().astype(np.int32))
        if not sum(counts):
            raise InputError(f"{directory}: the store holds no rows")
        assert first is not None
        self.dim = first[2]
        self.counts = counts
        self.image_ids = IdColumn(pa.concat_arrays(ids))  # type: ignore[assignment]
        self._check_unique(ids)
        lab = np.concatenate(labels) if labels and null_labels < len(self.image_ids) else None
        self.labels = lab if lab is not None and (lab >= 0).all() else None
        self._cursor: tuple[int, Any, np.ndarray] | None = None  # (first row of buffer, batch iterator, buffer)
        key = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in self.files)
        if key not in _VERIFIED:  # one streaming pass: every value checked, the content hashed
            _VERIFIED.clear()
            _VERIFIED[key] = self._content_hash()
        self._hash = _VERIFIED[key]
        self.backbones = source_backbones(self.directory)

    def _check_unique(self, ids: list[Any]) -> None:
        import pyarrow.compute as pc

        if len(pc.unique(self.image_ids.array)) == len(self.image_ids):  # type: ignore[attr-defined]
            return
        seen: dict[str, Path] = {}
        for path, part in zip(self.files, ids):
            for image_id in part.to_pylist():
                if image_id in seen:
                    also = "" if seen[image_id] == path else f" (also in {seen[image_id].name})"
                    raise InputError(f"{path}: duplicate image_id {image_id!r}{also}")
                seen[image_id] = path

    def _batches(self) -> Iterator[np.ndarray]:
        """The embeddings (b, d) float32 in row order, checked batch by batch."""
        from gpu_ops.store import check_embedding_values, embeddings_to_numpy, open_part

        offset = 0
        for path in self.files:
            first_row = 0
            for batch in open_part(path).iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=["embedding"]):
                X = np.ascontiguousarray(embeddings_to_numpy(batch.column(0)), dtype=np.float32)
                check_embedding_values(X, path, first_row, self.image_ids[offset:offset + len(X)])
                first_row += len(X)
                offset += len(X)
                yield X

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` (float32 (stop - start, d)). Reading forward (the extract stage's
        order) continues one stream; reading backwards restarts it."""
        out = np.empty((max(0, stop - start), self.dim), dtype=np.float32)
        if self._cursor is None or self._cursor[0] > start:
            self._cursor = (0, self._batches(), np.zeros((0, self.dim), np.float32))
        pos, it, buf = self._cursor
        filled = 0
        while filled < len(out):
            end = pos + len(buf)
            if end <= start + filled:  # the buffer lies before what is wanted: read on
                pos, buf = end, next(it)
                continue
            lo = start + filled - pos
            take = min(len(buf) - lo, len(out) - filled)
            out[filled:filled + take] = buf[lo:lo + take]
            filled += take
        self._cursor = (pos, it, buf)
        return out

    def load(self, index: int) -> np.ndarray:
        return self.rows(index, index + 1)[0]

    def _content_hash(self) -> str:
        """The content hash :func:`~gpu_ops.data.base.hash_array` gives the whole (n, d) array (with
        the first id and the row count), made in one streaming pass that checks every value."""
        import hashlib

        n = len(self.image_ids)
        h = hashlib.sha256()
        h.update(f"{np.dtype(np.float32)}{(n, self.dim)}".encode())
        for X in self._batches():
            h.update(X.tobytes())
        return hash_strings([h.hexdigest()[:16], self.image_ids[0], str(n)])

    def fingerprint(self) -> str:
        return self._hash


def parquet_embeddings(directory: Path) -> ParquetEmbeddings:
    """Embeddings already in the store format, opened lazily (:class:`ParquetEmbeddings`)."""
    if not directory.exists():
        raise InputError(f"{directory}: Parquet embeddings path does not exist")
    return ParquetEmbeddings(directory)


def env_path(raw: str) -> Path:
    """Expand ~ and environment variables in a user-given path."""
    return Path(os.path.expandvars(os.path.expanduser(raw)))


def source_backbones(directory: Path) -> str | None:
    """The ``backbones`` metadata (each backbone's column range) of a gpuclust store at
    ``directory`` whose rows join several backbones; None for any other Parquet folder."""
    from gpu_ops.store import read_manifest

    manifest, _ = read_manifest(directory)
    value = ((manifest or {}).get("metadata") or {}).get("backbones")
    return value if isinstance(value, str) and value else None
