"""Parquet embedding store: sharded, atomic, resumable.

One directory per (dataset, extractor, weights, preprocessing)::

    part-00000.parquet  part-00001.parquet  ...   one shard = a fixed range of dataset indices
    manifest.json                                 finished shards, written after each shard
    quarantine.csv                                items that could not be read (path, reason)

Columns: ``image_id: string``, ``source: string``, ``label: int32`` (nullable),
``embedding: fixed_size_list<float32>[d]``. Schema metadata carries the extractor, weights
identity, preprocessing, dataset fingerprint and library versions. Every file is written to a
temporary name and renamed, so a killed run leaves either a whole shard or none; a rerun skips
the shards the manifest lists and produces exactly one row per readable item.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gpu_ops.errors import InputError

MANIFEST = "manifest.json"
QUARANTINE = "quarantine.csv"
FORMAT_VERSION = 1


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same directory and os.replace."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any, sort_keys: bool = True) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n").encode())


def atomic_write_table(path: Path, table: pa.Table) -> None:
    """Write a Parquet file atomically."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def library_versions() -> dict[str, str]:
    import torch

    import gpu_ops

    return {"gpuclust": gpu_ops.__version__, "numpy": np.__version__, "pyarrow": pa.__version__, "torch": torch.__version__}


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


class EmbeddingStore:
    """Writer side of a store directory (resumable across processes)."""

    def __init__(self, directory: Path, metadata: dict[str, str], n_items: int, shard_rows: int) -> None:
        if shard_rows < 1:
            raise InputError(f"shard_rows must be positive; got {shard_rows}")
        self.directory = Path(directory)
        self.metadata = metadata
        self.n_items = n_items
        self.shard_rows = shard_rows
        self.directory.mkdir(parents=True, exist_ok=True)
        self.manifest = self._load_or_start_manifest()

    @property
    def n_shards(self) -> int:
        return max(1, -(-self.n_items // self.shard_rows))

    def shard_range(self, shard: int) -> range:
        return range(shard * self.shard_rows, min(self.n_items, (shard + 1) * self.shard_rows))

    def _load_or_start_manifest(self) -> dict[str, Any]:
        path = self.directory / MANIFEST
        fresh = {"format": FORMAT_VERSION, "n_items": self.n_items, "shard_rows": self.shard_rows,
                 "metadata": self.metadata, "shards": {}, "complete": False}
        if not path.exists():
            return fresh
        manifest = json.loads(path.read_text())
        same = (manifest.get("n_items") == self.n_items
                and manifest.get("metadata", {}).get("store_key") == self.metadata.get("store_key"))
        if not same:
            raise InputError(f"{self.directory}: holds a store of another configuration; remove it or choose another store directory")
        self.shard_rows = int(manifest["shard_rows"])  # resume with the layout the store was started with
        return manifest

    def pending_shards(self) -> list[int]:
        """Shards not yet listed as finished, in order."""
        done = self.manifest["shards"]
        return [s for s in range(self.n_shards) if f"{s:05d}" not in done]

    def write_shard(self, shard: int, image_ids: list[str], sources: list[str], labels: np.ndarray | None,
                    embeddings: np.ndarray, quarantined: list[tuple[str, str]]) -> None:
        """Write shard ``shard`` (part file, then manifest) atomically. ``embeddings`` (b, d)."""
        name = f"part-{shard:05d}.parquet"
        if len(image_ids):
            atomic_write_table(self.directory / name, build_table(image_ids, sources, labels, embeddings, self.metadata))
            self.manifest["dim"] = int(embeddings.shape[1])
        self.manifest["shards"][f"{shard:05d}"] = {
            "file": name if len(image_ids) else None,
            "rows": len(image_ids),
            "quarantined": [{"source": s, "reason": r} for s, r in quarantined],
        }
        atomic_write_json(self.directory / MANIFEST, self.manifest)

    def finish(self) -> "StoreSummary":
        """Mark the store complete and write ``quarantine.csv``; return a summary."""
        bad = self.quarantined()
        tmp = self.directory / f".{QUARANTINE}.tmp-{os.getpid()}"
        with open(tmp, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["source", "reason"])
            writer.writerows((q["source"], q["reason"]) for q in bad)
        os.replace(tmp, self.directory / QUARANTINE)
        self.manifest["complete"] = True
        atomic_write_json(self.directory / MANIFEST, self.manifest)
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
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise InputError(f"{directory}: not an embedding store (no {MANIFEST})")
    return json.loads(path.read_text())


def summarize(directory: Path) -> StoreSummary:
    m = load_manifest(directory)
    shards = m["shards"].values()
    return StoreSummary(str(directory), sum(s["rows"] for s in shards), int(m.get("dim", 0)), len(m["shards"]),
                        sum(len(s["quarantined"]) for s in shards), bool(m.get("complete")))


def part_files(directory: Path) -> list[Path]:
    """Finished part files in shard order (manifest-listed when a manifest exists)."""
    directory = Path(directory)
    if (directory / MANIFEST).is_file():
        m = load_manifest(directory)
        return [directory / m["shards"][s]["file"] for s in sorted(m["shards"]) if m["shards"][s]["file"]]
    files = sorted(directory.glob("*.parquet")) if directory.is_dir() else [directory]
    if not files:
        raise InputError(f"{directory}: no .parquet files")
    return files


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
        yield pq.read_table(path, columns=columns)


def embeddings_to_numpy(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """fixed_size_list<float32>[d] column -> (n, d) float32 without a Python loop."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if not pa.types.is_fixed_size_list(arr.type):
        raise InputError(f"embedding column must be fixed_size_list<float32>; got {arr.type}")
    dim = arr.type.list_size
    values = arr.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return values.reshape(-1, dim)


def read_embeddings(directory: Path) -> EmbeddingTable:
    """Read every finished shard of a store into memory."""
    tables = list(iter_tables(directory))
    if not tables:
        raise InputError(f"{directory}: the store holds no rows")
    table = pa.concat_tables(tables)
    for col in ("image_id", "embedding"):
        if col not in table.column_names:
            raise InputError(f"{directory}: Parquet files lack the {col!r} column (found: {', '.join(table.column_names)})")
    labels = None
    if "label" in table.column_names and table.column("label").null_count < table.num_rows:
        labels = table.column("label").fill_null(-1).to_numpy().astype(np.int32)
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    sources = table.column("source").to_pylist() if "source" in table.column_names else [""] * table.num_rows
    return EmbeddingTable(table.column("image_id").to_pylist(), sources, labels,
                          embeddings_to_numpy(table.column("embedding")), meta)
