"""Incremental embedding stores: one store per image folder, refreshed image by image.

A folder's store is keyed by what decides an embedding (extractor, weights, preprocessing,
precision: :meth:`gpu_ops.features.base.Extractor.identity`) and by the folder itself
(:meth:`gpu_ops.data.base.Dataset.collection_id`), never by what the folder holds today. Every row
records its image's identity and content::

    image_id  source  label  embedding   size  mtime_ns  blake2b  run_id
    (relative path)                      (the file's bytes, mtime and 128-bit BLAKE2b; the run that embedded it)

A rerun (:meth:`IncrementalStore.plan` then :meth:`IncrementalStore.apply`) compares the folder with
the store: a file whose size and mtime match its row is unchanged (not even read); one whose size
or mtime differ is hashed, and only a different hash makes it *changed*. Then

1. removed and changed images are retired: each part holding one is rewritten without it (under a
   new part number; manifest updated; the old file deleted). Parts holding none stay byte for byte
   as they were. (A part is also rewritten when the labels its rows get from class folders change,
   e.g. a new class folder sorts before the others: embeddings are copied, never recomputed.)
2. new and changed images are embedded into new parts, the manifest updated after each.

Both steps go through atomic renames and the manifest, so a run killed at any point leaves a store
that holds no duplicate and no stale row; the next run's comparison finds what is still missing
and embeds exactly that. A run holds the store's writer lock (:mod:`gpu_ops.store_lock`) while it
writes. ``manifest.json`` keeps the store's ``revision`` (the last run that changed it) and a
history of the runs that changed it, with their counts; each row's ``run_id`` says which run
embedded it.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gpu_ops.data.base import Dataset
from gpu_ops.errors import InputError
from gpu_ops.fsutil import atomic_write_json
from gpu_ops.store_lock import changing_store
from gpu_ops.store import (
    FORMAT_VERSION,
    MANIFEST,
    EmbeddingStore,
    StoreSummary,
    build_table,
    read_manifest,
    read_part,
    write_part,
)

log = logging.getLogger(__name__)

#: ``manifest.json``'s ``layout`` for stores refreshed in place.
LAYOUT = "incremental"
#: The per-row record of an image's content and of the run that embedded it.
RECORD_FIELDS = [pa.field("size", pa.int64()), pa.field("mtime_ns", pa.int64()), pa.field("blake2b", pa.string()),
                 pa.field("run_id", pa.string())]
#: Run records kept in the manifest's history.
HISTORY = 100
_HASH_THREADS = 4


def content_hash(path: Path) -> str:
    """128-bit BLAKE2b of a file's bytes (hex), read in 1 MiB blocks."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class FileState:
    """An image file as a store records it."""

    size: int
    mtime_ns: int
    blake2b: str


@dataclass(frozen=True)
class Known:
    """One image the store holds: where, as what, with which label (None: quarantined or unlabelled)."""

    part: str
    state: FileState
    label: int | None
    quarantined: bool


@dataclass
class Plan:
    """What a refresh does (:meth:`IncrementalStore.plan`)."""

    states: dict[str, FileState]  #: every current image's fingerprint, by image_id
    pending: list[int]  #: dataset indices to embed (new, changed, or lost with a damaged part)
    drop: dict[str, set[str]] = field(default_factory=dict)  #: part -> image_ids to retire from it
    relabel: set[str] = field(default_factory=set)  #: parts whose rows' labels changed
    counts: dict[str, int] = field(default_factory=dict)  #: new, changed, removed, unchanged, touched

    @property
    def changes(self) -> bool:
        return bool(self.pending or self.drop or self.relabel)

    def describe(self) -> str:
        c = self.counts
        touched = f" ({c['touched']} with a new mtime but the same content)" if c.get("touched") else ""
        return f"{c['unchanged']} unchanged{touched}, {c['new']} new, {c['changed']} changed, {c['removed']} removed"


def _stat(path: Path) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return -1, -1  # gone since the folder was listed: embedded (and quarantined) as a new item
    return st.st_size, st.st_mtime_ns


def _hash_or_empty(path: Path) -> str:
    try:
        return content_hash(path)
    except OSError:
        return ""


class IncrementalStore(EmbeddingStore):
    """Writer side of a folder's store (see the module docstring). Open it while holding the
    store's :class:`~gpu_ops.store_lock.StoreLock`: opening verifies every part (damaged ones
    are dropped and their images re-embedded) and deletes files a killed writer left behind."""

    def __init__(self, directory: Path, metadata: dict[str, str], shard_rows: int, run_id: str,
                 verify: bool = True) -> None:
        self.run_id = run_id
        self.groups: dict[int, list[int]] = {}
        self.states: dict[str, FileState] = {}
        self._ids_by_source: dict[str, str] = {}
        self._started = False
        super().__init__(directory, metadata, 0, shard_rows, verify=verify)
        self._remove_leftovers()

    # ---------------------------------------------------------------- manifest
    def _fresh_manifest(self) -> dict[str, Any]:
        return {"format": FORMAT_VERSION, "layout": LAYOUT, "n_items": 0, "shard_rows": self.shard_rows,
                "metadata": self.metadata, "shards": {}, "complete": False, "next_part": 0, "revision": None,
                "runs": []}

    def _load_or_start_manifest(self, verify: bool) -> dict[str, Any]:
        if not (self.directory / MANIFEST).exists():
            return self._fresh_manifest()
        manifest, problem = read_manifest(self.directory)
        if manifest is None:
            self._must_rewrite(str(problem))
            for stale in self.directory.glob("part-*.parquet"):
                stale.unlink()
            fresh = self._fresh_manifest()
            atomic_write_json(self.directory / MANIFEST, fresh)
            return fresh
        if manifest.get("layout") != LAYOUT or manifest["metadata"].get("store_key") != self.metadata.get("store_key"):
            raise InputError(f"{self.directory}: holds a store of another configuration; remove it or choose "
                             "another store directory")
        if verify:
            self._verify_parts(manifest)
        return manifest

    def _remove_leftovers(self) -> None:
        """Delete part files the manifest does not list and temporary files: what a killed writer
        left between writing a file and recording it (or between recording and deleting one)."""
        listed = {e["file"] for e in self.manifest["shards"].values() if e["file"]}
        leftovers = [p for p in self.directory.glob("part-*.parquet") if p.name not in listed]
        leftovers += [*self.directory.glob(".part-*.tmp*"), *self.directory.glob(f".{Path(MANIFEST).stem}.*.tmp*")]
        for path in leftovers:
            path.unlink(missing_ok=True)
        if leftovers:
            log.info("store %s: removed %d file(s) an interrupted run left behind", self.directory, len(leftovers))

    def _save(self) -> None:
        atomic_write_json(self.directory / MANIFEST, self.manifest)

    def _next_part(self) -> int:
        used = [int(s) for s in self.manifest["shards"]]
        number = max([int(self.manifest.get("next_part", 0)), *(u + 1 for u in used)])
        self.manifest["next_part"] = number + 1
        return number

    # ---------------------------------------------------------------- the comparison
    def known(self) -> tuple[dict[str, Known], dict[str, set[str]]]:
        """Every image the store holds (rows and quarantined items), by image_id; and, by part, any
        later copy of an image_id already seen (never written by this module: retired if found)."""
        out: dict[str, Known] = {}
        extra: dict[str, set[str]] = defaultdict(set)

        def add(image_id: str, item: Known) -> None:
            if image_id in out:
                extra[item.part].add(image_id)
            else:
                out[image_id] = item

        for name, entry in sorted(self.manifest["shards"].items()):
            if entry["file"]:
                table = read_part(self.directory / entry["file"],
                                  columns=["image_id", "label", "size", "mtime_ns", "blake2b"])
                cols = [table.column(c).to_pylist() for c in ("image_id", "label", "size", "mtime_ns", "blake2b")]
                for image_id, label, size, mtime, digest in zip(*cols):
                    add(image_id, Known(name, FileState(size, mtime, digest), label, False))
            for q in entry["quarantined"]:
                if "image_id" in q:
                    add(q["image_id"], Known(name, FileState(q["size"], q["mtime_ns"], q["blake2b"]), None, True))
        return out, dict(extra)

    def plan(self, dataset: Dataset) -> Plan:
        """Compare ``dataset`` (an image folder) with the store: what to retire, what to embed.
        Files whose size and mtime match their record are not read; the others are hashed."""
        known, duplicates = self.known()
        paths: list[Path] = list(dataset.paths)  # type: ignore[attr-defined]
        ids = dataset.image_ids
        labels = None if dataset.labels is None else [int(v) for v in dataset.labels]
        stats = [_stat(p) for p in paths]
        to_hash = [i for i, image_id in enumerate(ids)
                   if (k := known.get(image_id)) is None or (k.state.size, k.state.mtime_ns) != stats[i]]
        with ThreadPoolExecutor(_HASH_THREADS) as pool:
            hashes = dict(zip(to_hash, pool.map(lambda i: _hash_or_empty(paths[i]), to_hash)))
        plan = Plan(states={}, pending=[], drop=defaultdict(set, {part: set(dup) for part, dup in duplicates.items()}))
        counts = dict.fromkeys(("unchanged", "touched", "new", "changed", "removed"), 0)
        for i, image_id in enumerate(ids):
            k = known.get(image_id)
            if i not in hashes:
                state = k.state  # type: ignore[union-attr]
            else:
                state = FileState(stats[i][0], stats[i][1], hashes[i])
            plan.states[image_id] = state
            if k is not None and k.state.blake2b == state.blake2b and state.blake2b:
                counts["unchanged"] += 1
                counts["touched"] += i in hashes
                if not k.quarantined and k.label != (None if labels is None else labels[i]):
                    plan.relabel.add(k.part)
                continue
            plan.pending.append(i)
            if k is None:
                counts["new"] += 1
            else:
                counts["changed"] += 1
                plan.drop[k.part].add(image_id)
        current = set(ids)
        for image_id, k in known.items():
            if image_id not in current:
                counts["removed"] += 1
                plan.drop[k.part].add(image_id)
        plan.drop = dict(plan.drop)
        plan.counts = counts
        return plan

    # ---------------------------------------------------------------- the refresh
    def check_writable_for(self, plan: Plan) -> None:
        """Refuse (one line) a refresh with work to do when the store directory cannot be written."""
        if plan.changes and not os.access(self.directory, os.W_OK | os.X_OK):
            raise InputError(f"store {self.directory} needs a refresh ({plan.describe()}) but is not writable: "
                             "make it writable or choose another cache (GPUCLUST_CACHE)")

    def apply(self, plan: Plan, dataset: Dataset) -> None:
        """Retire what ``plan`` drops (rewriting the parts that hold it) and lay out the new parts
        of its pending images (:meth:`pending_shards`, :meth:`shard_range`)."""
        self.states = plan.states
        self._ids_by_source = {dataset.source(i): dataset.image_ids[i] for i in plan.pending}
        if plan.changes:
            self._start_run(plan)
        labels = None if dataset.labels is None else dict(zip(dataset.image_ids, (int(v) for v in dataset.labels)))
        for name in sorted(set(plan.drop) | plan.relabel):
            self._rewrite(name, plan.drop.get(name, set()), relabel=name in plan.relabel, labels=labels)
        self.groups = {}
        for start in range(0, len(plan.pending), self.shard_rows):
            self.groups[self._next_part()] = plan.pending[start:start + self.shard_rows]
        if self.groups:
            self._save()

    def _start_run(self, plan: Plan) -> None:
        """Record this run in the manifest (a killed run's record keeps ``finished: null``)."""
        self.manifest["complete"] = False
        self.manifest["runs"] = [*self.manifest.get("runs", []),
                                 {"run_id": self.run_id, "started": _now(), "finished": None,
                                  **{k: v for k, v in plan.counts.items()}, "embedded": 0}][-HISTORY:]
        self._started = True
        self._save()

    def _rewrite(self, name: str, drop: set[str], relabel: bool, labels: dict[str, int] | None) -> None:
        """Part ``name`` without the rows (and quarantined items) in ``drop``, as a new part (with
        ``relabel``: its rows' labels from ``labels``, null where None); the manifest names it,
        then the old file goes."""
        entry = self.manifest["shards"][name]
        quarantined = [q for q in entry["quarantined"] if q.get("image_id") not in drop]
        table = None
        if entry["file"]:
            table = read_part(self.directory / entry["file"])
            keep = pc.invert(pc.is_in(table.column("image_id"), value_set=pa.array(sorted(drop), pa.string())))
            table = table.filter(keep)
            if relabel:
                ids = table.column("image_id").to_pylist()
                new_labels = (pa.nulls(len(ids), pa.int32()) if labels is None
                              else pa.array([labels[i] for i in ids], pa.int32()))
                table = table.set_column(table.schema.get_field_index("label"), table.schema.field("label"), new_labels)
        del self.manifest["shards"][name]
        if (table is not None and table.num_rows) or quarantined:
            number = self._next_part()
            new: dict[str, Any] = {"file": None, "rows": 0}
            if table is not None and table.num_rows:
                new = write_part(self.directory / f"part-{number:05d}.parquet", table)
                new["dim"] = entry.get("dim")
            new.update(quarantined=quarantined, run=entry.get("run"), rewritten_by=self.run_id)
            if "writer" in entry:
                new["writer"] = entry["writer"]
            self.manifest["shards"][f"{number:05d}"] = new
        self._save()
        if entry["file"]:
            (self.directory / entry["file"]).unlink(missing_ok=True)

    @property
    def n_shards(self) -> int:
        return len(self.groups)

    def shard_range(self, shard: int) -> list[int]:  # type: ignore[override]
        return self.groups[shard]

    def pending_shards(self) -> list[int]:
        return [s for s in self.groups if f"{s:05d}" not in self.manifest["shards"]]

    def write_shard(self, shard: int, image_ids: list[str], sources: list[str], labels: np.ndarray | None,
                    embeddings: np.ndarray, quarantined: list[tuple[str, str]], writer: str | None = None) -> None:
        """Write a new part (rows with their file records and this run's id), then the manifest.
        ``writer``: the process that embedded the rows when it is not this one (a Dask worker's
        ``host:pid``), recorded in the part's manifest entry."""
        entry: dict[str, Any] = {"file": None, "rows": 0}
        if image_ids:
            table = build_table(image_ids, sources, labels, embeddings, self.metadata)
            states = [self.states[i] for i in image_ids]
            columns = [pa.array([s.size for s in states], pa.int64()), pa.array([s.mtime_ns for s in states], pa.int64()),
                       pa.array([s.blake2b for s in states], pa.string()), pa.array([self.run_id] * len(image_ids), pa.string())]
            for spec, column in zip(RECORD_FIELDS, columns):
                table = table.append_column(spec, column)
            entry = write_part(self.directory / f"part-{shard:05d}.parquet", table)
            entry["dim"] = int(embeddings.shape[1])
            self.manifest["dim"] = entry["dim"]
        entry["quarantined"] = [{"source": s, "reason": r, "image_id": self._ids_by_source[s],
                                 **vars(self.states[self._ids_by_source[s]])} for s, r in quarantined]
        entry["run"] = self.run_id
        if writer is not None:
            entry["writer"] = writer
        self.manifest["shards"][f"{shard:05d}"] = entry
        if self._started:
            self.manifest["runs"][-1]["embedded"] += len(image_ids)
        self._save()

    def finish(self) -> StoreSummary:
        """Mark the store complete and current; the run's record gets its end time. A run that
        changed nothing writes nothing."""
        entries = self.manifest["shards"].values()
        self.manifest["n_items"] = sum(e["rows"] + len(e["quarantined"]) for e in entries)
        if self._started:
            self.manifest["revision"] = self.run_id
            self.manifest["runs"][-1]["finished"] = _now()
        if not any(e["file"] for e in entries):
            self.manifest.pop("dim", None)
        return super().finish()


@contextmanager
def start_refresh(directory: Path, metadata: dict[str, str], dataset: Dataset, shard_rows: int,
                  run_id: str) -> Iterator[IncrementalStore]:
    """Open the store of image folder ``dataset`` for a refresh by run ``run_id`` (the caller holds
    the store's lock): compare it with the folder (the plan is logged), refuse an unwritable store
    that needs work, retire what is gone and lay out the parts of the images still to embed
    (:meth:`IncrementalStore.pending_shards`). Within the context the caller embeds those, writes
    each part (:meth:`IncrementalStore.write_shard`) and finishes the store; a refresh that changes
    the store holds it exclusively meanwhile (:func:`gpu_ops.store_lock.changing_store`: runs
    reading it are waited for)."""
    store = IncrementalStore(directory, metadata, shard_rows, run_id)
    plan = store.plan(dataset)
    log.info("store %s: %s", directory, plan.describe())
    store.check_writable_for(plan)
    with changing_store(directory) if plan.changes else nullcontext():
        store.apply(plan, dataset)
        yield store


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def store_revision(directory: Path) -> str | None:
    """The run that last changed an incremental store (None for other stores or none yet)."""
    manifest, _ = read_manifest(Path(directory))
    return None if manifest is None else manifest.get("revision")
