"""Parquet embedding store: sharded, atomic, resumable, verified.

One directory per (dataset, extractor, weights, preprocessing)::

    part-00000.parquet  part-00001.parquet  ...   one shard = a fixed range of dataset indices
    manifest.json                                 finished shards, written after each shard
    quarantine.csv                                items that could not be read (path, reason)

Columns: ``image_id: string``, ``source: string``, ``label: int32`` (nullable),
``embedding: fixed_size_list<float32>[d]``. Schema metadata carries the extractor, weights
identity, preprocessing, dataset fingerprint and library versions. Every file is written to a
temporary name and renamed, so a killed run leaves either a whole shard or none; a rerun skips
the shards the manifest lists and produces exactly one row per readable item.

**Verification.** Parts carry Parquet page checksums (checked on every read) and the manifest
records each part's size, modification time and sha256. Reusing a store re-hashes every part
against the manifest; a part that is missing, truncated or altered is re-extracted (its shard
only), a damaged manifest restarts the store, each with one warning. :func:`cached_store_ok` is
the cheap (stat-only) variant for a store named by an earlier run's cached result.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gpu_ops.errors import InputError
from gpu_ops.fsutil import atomic_write_bytes, atomic_write_json, file_sha256, json_bytes

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
QUARANTINE = "quarantine.csv"
#: 2: parts carry page checksums; the manifest records each part's bytes, mtime_ns and sha256.
FORMAT_VERSION = 2
#: Problems listed by name in a re-extraction warning (the rest are counted).
_LISTED_PROBLEMS = 3


# --------------------------------------------------------------------------------------------
# Atomic files


def write_if_changed(path: Path, data: bytes) -> bool:
    """Atomically write ``data`` unless ``path`` already holds exactly it (a finished store on a
    read-only filesystem is then reused without a single write). True when it wrote."""
    try:
        if path.read_bytes() == data:
            return False
    except OSError:
        pass
    atomic_write_bytes(path, data)
    return True


def parquet_bytes(table: pa.Table) -> bytes:
    """``table`` as Parquet file bytes, with page checksums."""
    sink = io.BytesIO()
    pq.write_table(table, sink, write_page_checksum=True)
    return sink.getvalue()


def atomic_write_table(path: Path, table: pa.Table) -> None:
    """Write a Parquet file atomically (with page checksums)."""
    atomic_write_bytes(path, parquet_bytes(table))


def write_part(path: Path, table: pa.Table) -> dict[str, Any]:
    """Write one part atomically; return its manifest record (rows, bytes, mtime_ns, sha256)."""
    data = parquet_bytes(table)
    atomic_write_bytes(path, data)
    return {"file": path.name, "rows": table.num_rows, "bytes": len(data), "mtime_ns": path.stat().st_mtime_ns,
            "sha256": hashlib.sha256(data).hexdigest()}


def library_versions() -> dict[str, str]:
    """Versions of the libraries behind a store's embeddings. torch's is read from its
    distribution when torch is not loaded: a raw-pixel run never imports it."""
    import importlib.metadata
    import sys

    import gpu_ops

    torch = sys.modules.get("torch")
    try:
        torch_version = torch.__version__ if torch is not None else importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch_version = "not installed"
    return {"gpuclust": gpu_ops.__version__, "numpy": np.__version__, "pyarrow": pa.__version__, "torch": torch_version}


def embedding_schema(dim: int, metadata: dict[str, str]) -> pa.Schema:
    """The store's Arrow schema for ``dim``-d embeddings, with string metadata."""
    return pa.schema(
        [
            pa.field("image_id", pa.string(), nullable=False),
            pa.field("source", pa.string()),
            pa.field("label", pa.int32(), nullable=True),
            pa.field("embedding", pa.list_(pa.float32(), dim), nullable=False),
        ],
        metadata={k: str(v) for k, v in metadata.items()},
    )


def build_table(image_ids: list[str], sources: list[str], labels: np.ndarray | None,
                embeddings: np.ndarray, metadata: dict[str, str]) -> pa.Table:
    """One shard's table. ``embeddings`` (b, d) float32; ``labels`` (b,) or None (null labels)."""
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    n, dim = embeddings.shape
    flat = pa.array(embeddings.reshape(-1), type=pa.float32())
    label_arr = pa.nulls(n, pa.int32()) if labels is None else pa.array(np.asarray(labels, dtype=np.int32))
    return pa.Table.from_arrays(
        [pa.array(image_ids, pa.string()), pa.array(sources, pa.string()), label_arr,
         pa.FixedSizeListArray.from_arrays(flat, dim)],
        schema=embedding_schema(dim, metadata),
    )


# --------------------------------------------------------------------------------------------
# Manifest and part checks


def manifest_problem(manifest: Any) -> str | None:
    """Why a parsed ``manifest.json`` cannot be trusted (None when its structure is sound)."""
    if not isinstance(manifest, dict):
        return f"{MANIFEST} is damaged (not a JSON object)"
    if manifest.get("format") != FORMAT_VERSION:
        return f"{MANIFEST} has store format {manifest.get('format')!r}, this gpuclust writes {FORMAT_VERSION}"
    for key, kind in (("n_items", int), ("shard_rows", int), ("shards", dict), ("metadata", dict),
                      ("complete", bool)):
        if not isinstance(manifest.get(key), kind) or (kind is int and isinstance(manifest[key], bool)):
            return f"{MANIFEST} is damaged ({key!r} is missing or has the wrong type)"
    if manifest["shard_rows"] < 1 or manifest["n_items"] < 0:
        return f"{MANIFEST} is damaged (shard_rows {manifest['shard_rows']}, n_items {manifest['n_items']})"
    for name, entry in manifest["shards"].items():
        if not re.fullmatch(r"\d{5}", name) or not isinstance(entry, dict):
            return f"{MANIFEST} is damaged (bad entry for shard {name!r})"
        if not isinstance(entry.get("rows"), int) or not isinstance(entry.get("quarantined"), list):
            return f"{MANIFEST} is damaged (shard {name} lacks rows or quarantined)"
        if entry.get("file") is None:
            continue
        if (entry["file"] != f"part-{name}.parquet" or not isinstance(entry.get("bytes"), int)
                or not isinstance(entry.get("mtime_ns"), int)
                or not re.fullmatch(r"[0-9a-f]{64}", str(entry.get("sha256")))):
            return f"{MANIFEST} is damaged (shard {name}: bad file record)"
    return None


def read_manifest(directory: Path) -> tuple[dict[str, Any] | None, str | None]:
    """``(manifest, None)`` for a sound ``manifest.json``; ``(None, why)`` when it is missing,
    unreadable or malformed."""
    path = Path(directory) / MANIFEST
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None, f"has no {MANIFEST}"
    except (OSError, UnicodeDecodeError) as exc:
        return None, f"{MANIFEST} is damaged (cannot read it: {exc})"
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, f"{MANIFEST} is damaged (not valid JSON: {exc})"
    problem = manifest_problem(manifest)
    return (None, problem) if problem else (manifest, None)


def part_problem(directory: Path, record: dict[str, Any], full: bool = True) -> str | None:
    """Why the part a manifest record names is not what was written (None when it is).

    ``full`` compares its sha256 (reads the file); otherwise only size and modification time
    (a stat: for cheap checks of stores an earlier run vouched for).
    """
    name = record["file"]
    try:
        st = (Path(directory) / name).stat()
    except FileNotFoundError:
        return f"{name} is missing"
    except OSError as exc:
        return f"{name} is unreadable ({exc.strerror})"
    if st.st_size < record["bytes"]:
        return f"{name} is damaged (truncated: {st.st_size} of {record['bytes']} bytes)"
    if st.st_size != record["bytes"]:
        return f"{name} is damaged ({st.st_size} bytes, {record['bytes']} written)"
    if not full:
        return None if st.st_mtime_ns == record["mtime_ns"] else f"{name} changed since it was written"
    try:
        digest = file_sha256(Path(directory) / name)
    except OSError as exc:
        return f"{name} is unreadable ({exc.strerror})"
    return None if digest == record["sha256"] else f"{name} is damaged (sha256 mismatch)"


def _problems_line(problems: list[str]) -> str:
    listed = "; ".join(problems[:_LISTED_PROBLEMS])
    more = len(problems) - _LISTED_PROBLEMS
    return listed + (f"; and {more} more part(s)" if more > 0 else "")


def _writable(directory: Path) -> bool:
    return os.access(directory, os.W_OK | os.X_OK)


def cached_store_ok(directory: str | Path, revision: str | None = None) -> bool:
    """Cheap check (a stat per part, no hashing) that a finished store is as its manifest says
    (and, for a store refreshed in place, still at the ``revision`` the cached result saw).

    For a store named by a cached result of an earlier run: False means "run the extract stage
    again". It logs why: a warning when the store (or its manifest) is gone or unfinished, since
    the extract stage then starts or resumes it without a word; otherwise at INFO level, as the
    extract stage itself verifies every part and warns about each damaged one it re-extracts.
    """
    directory = Path(directory)
    if not directory.is_dir():
        log.warning("store %s is missing: re-extracting", directory)
        return False
    manifest, problem = read_manifest(directory)
    if manifest is None:
        if not (directory / MANIFEST).exists():
            log.warning("store %s %s: re-extracting", directory, problem)
        else:
            log.info("store %s: %s: running the extract stage again", directory, problem)
        return False
    if not manifest["complete"]:
        log.warning("store %s is unfinished: re-extracting its missing shards", directory)
        return False
    if manifest.get("revision") != revision:
        log.info("store %s was refreshed since (revision %s, the cached result saw %s): running the extract "
                 "stage again", directory, manifest.get("revision"), revision)
        return False
    problems = [p for entry in manifest["shards"].values() if entry["file"]
                for p in [part_problem(directory, entry, full=False)] if p]
    if problems:
        log.info("store %s: %s: verifying it in the extract stage", directory, _problems_line(problems))
        return False
    return True


def check_cache_root(path: Path) -> None:
    """Refuse a cache root that is a file or cannot be created or written (before any work).

    An existing read-only cache that already holds stores is accepted: its finished stores are
    reused without writing (the extract stage refuses if it would have to write).
    """
    path = Path(path)
    what = f"cache directory {path} (GPUCLUST_CACHE or cache_dir)"
    if path.exists():
        if not path.is_dir():
            raise InputError(f"{what} is not a directory")
        if not _writable(path) and not (path / "stores").is_dir():
            raise InputError(f"{what} is not writable")
        return
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{what} cannot be created ({exc.strerror})") from None


# --------------------------------------------------------------------------------------------
# Writer


def write_shard_part(directory: Path, shard: int, image_ids: list[str], sources: list[str],
                     labels: np.ndarray | None, embeddings: np.ndarray, quarantined: list[tuple[str, str]],
                     metadata: dict[str, str]) -> dict[str, Any]:
    """Write shard ``shard``'s part file (when it has rows; ``embeddings`` (b, d)) and return its
    manifest entry: the part's record (file, rows, bytes, sha256), ``dim`` and the quarantined items."""
    entry: dict[str, Any] = {"file": None, "rows": 0}
    if len(image_ids):
        entry = write_part(Path(directory) / f"part-{shard:05d}.parquet",
                           build_table(image_ids, sources, labels, embeddings, metadata))
    entry["dim"] = int(embeddings.shape[1]) if len(image_ids) else None
    entry["quarantined"] = [{"source": s, "reason": r} for s, r in quarantined]
    return entry


class EmbeddingStore:
    """Writer side of a store directory (resumable across processes).

    Opening verifies what is already there (``verify``): every finished part is hashed against the
    manifest; damaged parts become pending again, a damaged manifest restarts the store.
    """

    def __init__(self, directory: Path, metadata: dict[str, str], n_items: int, shard_rows: int,
                 verify: bool = True) -> None:
        if shard_rows < 1:
            raise InputError(f"shard_rows must be positive; got {shard_rows}")
        self.directory = Path(directory)
        self.metadata = metadata
        self.n_items = n_items
        self.shard_rows = shard_rows
        if not self.directory.is_dir():
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise InputError(f"cannot create store directory {self.directory} ({exc.strerror})") from None
        self.manifest = self._load_or_start_manifest(verify)

    @property
    def n_shards(self) -> int:
        return max(1, -(-self.n_items // self.shard_rows))

    def shard_range(self, shard: int) -> range:
        return range(shard * self.shard_rows, min(self.n_items, (shard + 1) * self.shard_rows))

    def _fresh_manifest(self) -> dict[str, Any]:
        return {"format": FORMAT_VERSION, "n_items": self.n_items, "shard_rows": self.shard_rows,
                "metadata": self.metadata, "shards": {}, "complete": False}

    def _must_rewrite(self, problem: str) -> None:
        """Warn that the store is re-extracted because of ``problem`` (or refuse if it cannot be)."""
        if not _writable(self.directory):
            raise InputError(f"store {self.directory}: {problem}, and the store is not writable: "
                             "make it writable or remove it")
        log.warning("store %s: %s: re-extracting", self.directory, problem)

    def _load_or_start_manifest(self, verify: bool) -> dict[str, Any]:
        path = self.directory / MANIFEST
        if not path.exists():
            return self._fresh_manifest()
        manifest, problem = read_manifest(self.directory)
        if manifest is None and not verify:  # a writer that trusts the manifest (a Dask worker) never restarts it
            raise InputError(f"store {self.directory}: {problem}")
        if manifest is None:
            self._must_rewrite(str(problem))
            # parts (and sharded writers' entries, see gpu_ops.distributed) of the unknown old layout
            for stale in [*self.directory.glob("part-*.parquet"), *self.directory.glob(".shards/*.json")]:
                stale.unlink()
            fresh = self._fresh_manifest()
            atomic_write_json(path, fresh)  # a killed restart does not warn again
            return fresh
        same = (manifest["n_items"] == self.n_items
                and manifest["metadata"].get("store_key") == self.metadata.get("store_key"))
        if not same:
            raise InputError(f"{self.directory}: holds a store of another configuration; remove it or choose another store directory")
        self.shard_rows = manifest["shard_rows"]  # resume with the layout the store was started with
        if verify:
            self._verify_parts(manifest)
        return manifest

    def _verify_parts(self, manifest: dict[str, Any]) -> None:
        """Hash every finished part; drop the damaged ones from ``manifest`` (re-extracted later)."""
        damaged: dict[str, str] = {}
        moved = []
        for shard, entry in sorted(manifest["shards"].items()):
            if not entry["file"]:
                continue
            problem = part_problem(self.directory, entry)
            if problem:
                damaged[shard] = problem
            elif (self.directory / entry["file"]).stat().st_mtime_ns != entry["mtime_ns"]:
                moved.append(shard)  # same bytes, new mtime (copied or touched)
        if damaged:
            self._must_rewrite(_problems_line(list(damaged.values())))
            for shard in damaged:
                del manifest["shards"][shard]
            manifest["complete"] = False
        for shard in moved:
            entry = manifest["shards"][shard]
            entry["mtime_ns"] = (self.directory / entry["file"]).stat().st_mtime_ns
        if damaged or (moved and _writable(self.directory)):
            # persisted now: other writers (Dask workers) see the damaged shards as pending, and
            # the next cheap check of the store passes again
            atomic_write_json(self.directory / MANIFEST, manifest)

    def pending_shards(self) -> list[int]:
        """Shards not yet listed as finished, in order."""
        done = self.manifest["shards"]
        return [s for s in range(self.n_shards) if f"{s:05d}" not in done]

    def check_writable(self) -> None:
        """Refuse (one line) to extract into a store directory that cannot be written."""
        if not _writable(self.directory):
            raise InputError(f"store {self.directory} needs {len(self.pending_shards())} more shard(s) but is not "
                             "writable: make it writable or choose another cache (GPUCLUST_CACHE)")

    def write_shard(self, shard: int, image_ids: list[str], sources: list[str], labels: np.ndarray | None,
                    embeddings: np.ndarray, quarantined: list[tuple[str, str]]) -> None:
        """Write shard ``shard`` (part file, then manifest) atomically. ``embeddings`` (b, d)."""
        entry = write_shard_part(self.directory, shard, image_ids, sources, labels, embeddings, quarantined,
                                 self.metadata)
        if entry["dim"] is not None:
            self.manifest["dim"] = entry["dim"]
        self.manifest["shards"][f"{shard:05d}"] = entry
        atomic_write_json(self.directory / MANIFEST, self.manifest)

    def finish(self) -> "StoreSummary":
        """Mark the store complete and write ``quarantine.csv``; return a summary. Writes
        nothing when both are already so (a finished store is reusable read-only)."""
        text = io.StringIO(newline="")
        writer = csv.writer(text)
        writer.writerow(["source", "reason"])
        writer.writerows((q["source"], q["reason"]) for q in self.quarantined())
        write_if_changed(self.directory / QUARANTINE, text.getvalue().encode())
        self.manifest["complete"] = True
        write_if_changed(self.directory / MANIFEST, json_bytes(self.manifest))
        return summarize(self.directory)

    def quarantined(self) -> list[dict[str, str]]:
        return [q for s in sorted(self.manifest["shards"]) for q in self.manifest["shards"][s]["quarantined"]]


@dataclass(frozen=True)
class StoreSummary:
    """What a finished store holds."""

    directory: str
    rows: int
    dim: int
    shards: int
    quarantined: int
    complete: bool


def load_manifest(directory: Path) -> dict[str, Any]:
    """The store's manifest; InputError when it is missing or damaged."""
    manifest, problem = read_manifest(directory)
    if manifest is None:
        if not (Path(directory) / MANIFEST).exists():
            raise InputError(f"{directory}: not an embedding store (no {MANIFEST})")
        raise InputError(f"store {directory}: {problem}")
    return manifest


def summarize(directory: Path) -> StoreSummary:
    m = load_manifest(directory)
    shards = m["shards"].values()
    return StoreSummary(str(directory), sum(s["rows"] for s in shards), int(m.get("dim", 0)), len(m["shards"]),
                        sum(len(s["quarantined"]) for s in shards), bool(m.get("complete")))


# --------------------------------------------------------------------------------------------
# Reader


def part_files(directory: Path) -> list[Path]:
    """Finished part files in shard order (manifest-listed when a manifest exists; otherwise
    every ``*.parquet`` file of the folder, or the one file named)."""
    directory = Path(directory)
    if (directory / MANIFEST).is_file():
        m = load_manifest(directory)
        return [directory / m["shards"][s]["file"] for s in sorted(m["shards"]) if m["shards"][s]["file"]]
    if directory.is_dir():
        files = sorted(p for p in directory.glob("*.parquet") if not p.name.startswith("."))
    else:
        files = [directory]
    if not files:
        raise InputError(f"{directory}: no .parquet files")
    return files


def open_part(path: Path) -> pq.ParquetFile:
    """Open one Parquet file with page-checksum verification; InputError naming it when it is not
    Parquet or its footer is damaged."""
    try:
        return pq.ParquetFile(path, page_checksum_verification=True)
    except (OSError, pa.ArrowException) as exc:
        reason = re.sub(r"^Could not open Parquet input source '[^']*': ", "", str(exc)).replace("\n", " ")
        raise InputError(f"{path}: not a readable Parquet file ({reason})") from None


def read_part(path: Path, columns: list[str] | None = None) -> pa.Table:
    """One part (or ``columns`` of it), every page's checksum verified; InputError naming the file
    when it is not Parquet, lacks a column, or a page is damaged."""
    pf = open_part(path)
    names = pf.schema_arrow.names
    missing = [c for c in columns or [] if c not in names]
    if missing:
        raise InputError(f"{path}: no {missing[0]!r} column (found: {', '.join(names)})")
    try:
        return pf.read(columns=columns)
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"{path}: damaged Parquet data ({str(exc).splitlines()[0]})") from None


@dataclass
class EmbeddingTable:
    """A whole store in memory: ``embeddings`` (n, d) float32, ``labels`` (n,) int32 (-1 = none) or None."""

    image_ids: list[str]
    sources: list[str]
    labels: np.ndarray | None
    embeddings: np.ndarray
    metadata: dict[str, str]


def iter_tables(directory: Path, columns: list[str] | None = None) -> Iterable[pa.Table]:
    """Yield each finished shard as an Arrow table (streaming: one shard in memory at a time)."""
    for path in part_files(directory):
        yield read_part(path, columns=columns)


def store_labels(directory: str | Path) -> np.ndarray | None:
    """The store's ``label`` column (int64, -1 where missing), read alone, part by part; None when
    it has none or some row lacks a label."""
    parts = []
    for path in part_files(Path(directory)):
        pf = open_part(path)
        if "label" not in pf.schema_arrow.names:
            return None
        parts.append(pf.read(columns=["label"]).column("label").fill_null(-1).to_numpy().astype(np.int64))
    labels = np.concatenate(parts) if parts else np.empty(0, np.int64)
    return labels if len(labels) and (labels >= 0).all() else None


def embeddings_to_numpy(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """fixed_size_list<float32>[d] column -> (n, d) float32 without a Python loop."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if not pa.types.is_fixed_size_list(arr.type):
        raise InputError(f"embedding column must be fixed_size_list<float32>; got {arr.type}")
    dim = arr.type.list_size
    values = arr.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return values.reshape(-1, dim)


def check_embedding_values(embeddings: np.ndarray, path: Path, first_row: int = 0,
                           image_ids: Any = None) -> None:
    """Refuse a non-finite value or one whose squared distances overflow float32 in FAISS / cuML
    (beyond ±:func:`~gpu_ops.data.base.max_abs_vector_value` of the dimension): InputError naming
    ``path``, the row (``first_row`` + position) and its image_id. ``embeddings`` (b, d)."""
    from gpu_ops.data.base import max_abs_vector_value

    if embeddings.size == 0:
        return
    limit = max_abs_vector_value(embeddings.shape[1])
    lo, hi = float(embeddings.min()), float(embeddings.max())  # NaN propagates: one pass each, no copy
    if -limit <= lo and hi <= limit:
        return
    bad = ~(np.abs(embeddings) <= limit)
    row = int(np.flatnonzero(bad.any(axis=1))[0])
    value = float(embeddings[row][bad[row]][0])
    ident = f" (image_id {str(image_ids[row])!r})" if image_ids is not None else ""
    what = ("a non-finite value" if not np.isfinite(value)
            else f"a value beyond ±{limit:.3g}, where float32 distances of {embeddings.shape[1]}-d vectors overflow")
    raise InputError(f"{path}: row {first_row + row}{ident} holds {what} ({value:g}) in its embedding")


def _part_shape(path: Path, table: pa.Table) -> tuple[list[str], int]:
    """Column names and embedding dimension of one part; InputError naming it when unusable."""
    for col in ("image_id", "embedding"):
        if col not in table.column_names:
            raise InputError(f"{path}: Parquet file lacks the {col!r} column (found: {', '.join(table.column_names)})")
    etype = table.schema.field("embedding").type
    if not pa.types.is_fixed_size_list(etype):
        raise InputError(f"{path}: the embedding column must be fixed_size_list<float32>; got {etype}")
    return table.column_names, int(etype.list_size)


def _raise_duplicate(ids: list[str], parts: list[tuple[Path, int]]) -> None:
    """InputError naming the first repeated image_id, the part it repeats in and where it was first."""
    owner = [path for path, rows in parts for _ in range(rows)]
    seen: dict[str, Path] = {}
    for image_id, path in zip(ids, owner):
        if image_id in seen:
            also = "" if seen[image_id] == path else f" (also in {seen[image_id].name})"
            raise InputError(f"{path}: duplicate image_id {image_id!r}{also}")
        seen[image_id] = path


def read_embeddings(directory: Path) -> EmbeddingTable:
    """Read every finished shard of a store (or a folder of Parquet files) into memory.

    Every part is checked: readable Parquet with intact pages, the same columns and embedding
    dimension as the first, unique ``image_id``s, finite values that float32 distances can hold.
    Each failure is an InputError naming the file (and the row or id).
    """
    ids: list[str] = []
    sources: list[str] = []
    labels: list[np.ndarray] = []
    embeddings: list[np.ndarray] = []
    null_labels = 0
    parts: list[tuple[Path, int]] = []  # (file, rows)
    first: tuple[Path, list[str], int] | None = None
    meta: dict[str, str] = {}
    for path in part_files(directory):
        table = read_part(path)
        columns, dim = _part_shape(path, table)
        if first is None:
            first = (path, columns, dim)
            meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        elif columns != first[1]:
            raise InputError(f"{path}: columns ({', '.join(columns)}) differ from those of {first[0].name} "
                             f"({', '.join(first[1])})")
        elif dim != first[2]:
            raise InputError(f"{path}: embedding dimension {dim} differs from {first[0].name}'s {first[2]}")
        part_ids = [str(i) for i in table.column("image_id").to_pylist()]
        parts.append((path, len(part_ids)))
        emb = embeddings_to_numpy(table.column("embedding"))
        check_embedding_values(emb, path, 0, part_ids)
        ids += part_ids
        sources += (table.column("source").to_pylist() if "source" in columns else [""] * table.num_rows)
        if "label" in columns:
            null_labels += table.column("label").null_count
            labels.append(table.column("label").fill_null(-1).to_numpy().astype(np.int32))
        embeddings.append(emb)
    if not ids:
        raise InputError(f"{directory}: the store holds no rows")
    if len(set(ids)) != len(ids):
        _raise_duplicate(ids, parts)
    label_arr = np.concatenate(labels) if labels and null_labels < len(ids) else None
    return EmbeddingTable(ids, sources, label_arr, np.concatenate(embeddings), meta)
