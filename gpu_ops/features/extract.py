"""Batched, streaming extraction of a dataset into the Parquet embedding store.

:func:`extract_to_store` is the one extraction routine: a single process calls it for the whole
store, each Dask worker for its shards of a store of fixed ranges (:mod:`gpu_ops.distributed`).
A Dask worker's share of an image folder's refresh goes through the same loop but comes back in
memory (:func:`embed_items`): the driver writes the folder's store. :func:`open_dataset` and
:func:`build_extractor` decide, from an extract run's parameters, what both of them read and
with which extractor.

torch is imported only where a batch needs it: raw pixels of in-memory arrays (and Parquet
embeddings) are batched with numpy, without torch's DataLoader."""

from __future__ import annotations

import dataclasses
import functools
import logging
import multiprocessing
import os
import re
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Protocol, Sequence

import numpy as np
from tqdm.auto import tqdm

from gpu_ops.data import load_dataset
from gpu_ops.data.base import BadImageError, Dataset
from gpu_ops.errors import InputError
from gpu_ops.features import create_extractor
from gpu_ops.features.base import Extractor
from gpu_ops.incremental import start_refresh
from gpu_ops.store import EmbeddingStore, StoreSummary, library_versions
from gpu_ops.store_lock import StoreLock, new_run_id

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

#: Rows per shard (Parquet part) of a new store when none is asked for.
DEFAULT_SHARD_ROWS = 4096
#: Side in pixels that raw-pixel features resize images of differing sizes to.
RAW_SIZE = 32

ShardCallback = Callable[[int, int], None]


class ShardSink(Protocol):
    """Where embedded shards go: a store (:class:`~gpu_ops.store.EmbeddingStore`) or a group kept
    in memory (:func:`embed_items`)."""

    def pending_shards(self) -> list[int]: ...

    def shard_range(self, shard: int) -> Sequence[int]: ...

    def write_shard(self, shard: int, image_ids: list[str], sources: list[str], labels: np.ndarray | None,
                    embeddings: np.ndarray, quarantined: list[tuple[str, str]]) -> None: ...


class _Items:
    """Map-style view (a dataset for torch's DataLoader) that preprocesses item ``i`` (or, when
    decoding on the device, only reads its bytes) and turns read errors into a reason string."""

    def __init__(self, dataset: Dataset, extractor: Extractor, indices: list[int], raw_bytes: bool = False) -> None:
        self.dataset, self.extractor, self.indices, self.raw_bytes = dataset, extractor, indices, raw_bytes

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, pos: int) -> tuple[int, Any, str]:
        index = self.indices[pos]
        try:
            if self.raw_bytes:
                from gpu_ops.features import jpeg

                return index, jpeg.read_item(self.dataset, index), ""
            return index, self.extractor.preprocess(self.dataset.load(index)), ""
        except BadImageError as exc:
            return index, None, str(exc)
        except OSError as exc:
            return index, None, f"cannot read file ({exc})"


def _collate(batch: list[tuple[int, Any, str]]) -> tuple[list[int], Any, list[tuple[int, str]]]:
    """Stack preprocessed tensors or numpy arrays (or keep raw (kind, bytes) pairs as a list); set bad
    items aside."""
    good = [(i, t) for i, t, _ in batch if t is not None]
    bad = [(i, why) for i, t, why in batch if t is None]
    if good and isinstance(good[0][1], tuple):
        return [i for i, _ in good], [t for _, t in good], bad
    if not good:
        return [], None, bad
    if isinstance(good[0][1], np.ndarray):
        return [i for i, _ in good], np.stack([t for _, t in good]), bad
    import torch

    return [i for i, _ in good], torch.stack([t for _, t in good]), bad


def _out_of_memory_errors() -> tuple[type[BaseException], ...]:
    """CUDA's out-of-memory error when torch is loaded (only torch extractors raise it), else none."""
    torch = sys.modules.get("torch")
    return (torch.cuda.OutOfMemoryError,) if torch is not None else ()


class AdaptiveEmbedder:
    """Calls ``extractor.embed`` in chunks of at most ``max_batch``; on CUDA out-of-memory it halves
    the chunk size (and says so) instead of failing, and keeps the smaller size afterwards."""

    def __init__(self, extractor: Extractor, max_batch: int) -> None:
        self.extractor = extractor
        self.max_batch = max_batch

    def __call__(self, batch: torch.Tensor | np.ndarray) -> np.ndarray:
        parts, start = [], 0
        while start < len(batch):
            chunk = batch[start:start + self.max_batch]
            try:
                parts.append(self.extractor.embed(chunk))
                start += len(chunk)
            except _out_of_memory_errors():
                if self.max_batch == 1:
                    raise
                self.max_batch = max(1, self.max_batch // 2)
                log.warning("CUDA out of memory at batch size %d: halving to %d", len(chunk), self.max_batch)
                sys.modules["torch"].cuda.empty_cache()
        return np.concatenate(parts)


def _device_decoded(extractor: Extractor, payloads: list[tuple[str, torch.Tensor]]) -> tuple[torch.Tensor | None, list[int], list[str]]:
    """Decode + resize + normalise raw items on the extractor's device; positions that failed and why."""
    from gpu_ops.features import jpeg

    decoded, reasons = jpeg.decode_batch([k for k, _ in payloads], [p for _, p in payloads], extractor.device)
    ok = [i for i, img in enumerate(decoded) if img is not None]
    failed = [i for i in range(len(decoded)) if decoded[i] is None]
    if not ok:
        return None, failed, [reasons[i] for i in failed]
    batch = extractor.preprocess_decoded([decoded[i] for i in ok])  # type: ignore[misc]
    return batch, failed, [reasons[i] for i in failed]


def _data_name(dataset: Dataset) -> str:
    """``<kind>-<name>``: the readable start of a dataset's cache folder."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(dataset.name.split(":", 1)[-1]).name)[-40:] or "data"
    return f"{dataset.name.split(':', 1)[0]}-{slug}"


def dataset_directory(store_root: Path, dataset: Dataset) -> Path:
    """``<root>/<kind>-<name>-<fingerprint>``: everything derived from one dataset selection's content."""
    return Path(store_root) / f"{_data_name(dataset)}-{dataset.fingerprint()}"


def refreshed_in_place(dataset: Dataset) -> bool:
    """Whether ``dataset``'s store is refreshed image by image (an image folder: :mod:`gpu_ops.incremental`)
    rather than keyed by the dataset's whole content (IDX, arrays, Parquet embeddings, digits)."""
    return dataset.collection_id() is not None


def store_directory(store_root: Path, dataset: Dataset, extractor: Extractor, incremental: bool | None = None,
                    device: str | None = None) -> Path:
    """``<collection dir>/<extractor>-<key>``: one store per data x extractor x weights x
    preprocessing x precision (``timm:resnet18`` becomes ``timm-resnet18``).

    An image folder's store (``incremental``, the default for one) is keyed by the folder, not its
    content: ``<kind>-<name>-<collection id>``; any other dataset's (and a folder's sharded over
    Dask workers) by its content, as :func:`dataset_directory`. ``device``: the device the
    embeddings are computed on, when not the extractor's own (it decides the precision).
    """
    slug = re.sub(r"[^A-Za-z0-9_.+-]+", "-", extractor.name)
    if incremental is None:
        incremental = refreshed_in_place(dataset)
    key = dataset.collection_id() if incremental else dataset.fingerprint()
    return Path(store_root) / f"{_data_name(dataset)}-{key}" / f"{slug}-{extractor.store_key(device)}"


def worker_start_method() -> str:
    """"fork" only when this process runs a single thread; otherwise "spawn".

    Forking a multi-threaded process (a Prefect task runner, an event loop, a server in a
    thread) copies locks held by other threads; the forked loader workers then fail at exit.
    """
    if sys.platform.startswith("linux") and threading.active_count() == 1:
        return "fork"
    return "spawn"


def default_workers(dataset: Dataset, items: int, batch_size: int) -> int:
    """Decode files in worker processes when ``items`` make more than one batch; in-memory arrays
    need none. A single batch has no other batch to overlap its decoding with, and a worker
    process costs seconds of start-up (it imports torch)."""
    if not hasattr(dataset, "paths") or items <= batch_size:
        return 0
    return max(1, min(4, (os.cpu_count() or 2) - 1))


@functools.lru_cache(maxsize=1)
def _note_daemonic() -> None:
    log.info("this is a daemonic process (a Dask worker): images are decoded in it, without loader worker processes")


def loader_workers(dataset: Dataset, items: int, batch_size: int, requested: int | None = None) -> int:
    """Loader worker processes for ``items`` of ``dataset``: ``requested`` (the default when None),
    but none in a daemonic process (a Dask worker), which multiprocessing forbids to start children."""
    workers = default_workers(dataset, items, batch_size) if requested is None else requested
    if workers and multiprocessing.current_process().daemon:
        _note_daemonic()
        return 0
    return workers


def _in_process_batches(items: _Items, batch_size: int,
                        threads: int = 0) -> Iterable[tuple[list[int], Any, list[tuple[int, str]]]]:
    """What a DataLoader yields, made in this process without importing torch: for extractors
    that prepare numpy arrays (raw pixels). ``threads`` > 0 reads and decodes that many items at
    a time (image decoders release the GIL), in order."""
    if not threads:
        for start in range(0, len(items), batch_size):
            yield _collate([items[pos] for pos in range(start, min(start + batch_size, len(items)))])
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode") as pool:
        for start in range(0, len(items), batch_size):
            yield _collate(list(pool.map(items.__getitem__, range(start, min(start + batch_size, len(items))))))


def batch_loader(dataset: Dataset, extractor: Extractor, indices: list[int], *, batch_size: int,
                 num_workers: int | None = None,
                 decode_on_device: bool = False) -> Iterable[tuple[list[int], Any, list[tuple[int, str]]]]:
    """Batches ``(indices, tensor or raw payloads, [(index, reason), ...])`` of the items at ``indices``,
    in order. Items are preprocessed for ``extractor`` (only read when ``decode_on_device``);
    unreadable ones come back with their reason instead. For numpy extractors (raw pixels), and
    without loader workers on the CPU, the batches are made in this process (no DataLoader; the
    files of a numpy extractor decoded by ``num_workers`` threads instead of processes)."""
    items = _Items(dataset, extractor, indices, raw_bytes=decode_on_device)
    if extractor.numpy_batches and not decode_on_device:
        threads = default_workers(dataset, len(indices), batch_size) if num_workers is None else num_workers
        return _in_process_batches(items, batch_size, threads)
    workers = loader_workers(dataset, len(indices), batch_size, num_workers)
    if not workers and extractor.device == "cpu" and not decode_on_device:
        return _in_process_batches(items, batch_size)
    from torch.utils.data import DataLoader

    return DataLoader(items, batch_size=batch_size,  # type: ignore[arg-type]
                      shuffle=False, num_workers=workers, collate_fn=_collate,
                      multiprocessing_context=worker_start_method() if workers else None,
                      pin_memory=extractor.device == "cuda" and not decode_on_device)


def open_dataset(params: dict[str, Any]) -> Dataset:
    """The dataset selection an extract run with ``params`` (:func:`gpu_ops.pipeline.extract_params`) reads."""
    return load_dataset(params["dataset"], params["split"], params["limit"])


def build_extractor(params: dict[str, Any], dataset: Dataset, *, device: str | None = None,
                    progress: bool = True) -> Extractor:
    """The extractor an extract run with ``params`` uses on ``dataset`` (on ``device``, else
    ``params["device"]``). Raw pixels of images that differ in size are resized to
    :data:`RAW_SIZE` unless ``image_size`` says otherwise; the autoencoder is trained here (or
    its checkpoint beside the dataset's stores is loaded)."""
    image_size = params["image_size"]
    if params["extractor"] == "raw" and image_size is None and not dataset.uniform_size:
        image_size = RAW_SIZE
    device = device or params["device"]
    if params["extractor"] == "autoencoder":
        from gpu_ops.features.autoencoder import trained_autoencoder

        store_root = Path(params["cache_root"]) / "stores"
        return trained_autoencoder(dataset, dataset_directory(store_root, dataset) / "autoencoder",
                                   latent_dim=params["latent_dim"], epochs=params["ae_epochs"],
                                   image_size=image_size, seed=params["seed"], device=device, progress=progress)
    return create_extractor(params["extractor"], weights=params["weights"], image_size=image_size, device=device,
                            seed=params["seed"], flip_average=bool(params.get("flip_average")))


def extract_options(params: dict[str, Any], device: str) -> dict[str, Any]:
    """:func:`extract_to_store`'s keyword options from an extract run's ``params`` for an extractor
    on ``device`` (JPEG batches are decoded on the device only where it is a GPU)."""
    return {"batch_size": params["batch_size"], "num_workers": params["num_workers"],
            "shard_rows": params.get("shard_rows") or DEFAULT_SHARD_ROWS,
            "decode_on_device": bool(params.get("decode_on_device")) and device == "cuda"}


def store_metadata(dataset: Dataset, extractor: Extractor, incremental: bool | None = None,
                   device: str | None = None) -> dict[str, str]:
    """The store's schema metadata: the extractor's identity (precision included), the dataset's
    (its content fingerprint, or for a store refreshed in place its collection id) and library versions."""
    if incremental is None:
        incremental = refreshed_in_place(dataset)
    which = {"collection": str(dataset.collection_id())} if incremental else {"dataset_fingerprint": dataset.fingerprint()}
    # rows copied from a store of several backbones keep their column ranges (TURTLE's spaces)
    kept = {"backbones": dataset.backbones} if getattr(dataset, "backbones", None) and extractor.name == "raw" else {}
    return {**extractor.identity(device), "store_key": extractor.store_key(device), "dataset": dataset.name, **which,
            "versions": str(library_versions()), **kept}


@dataclass(frozen=True)
class ExtractSummary(StoreSummary):
    """What :func:`extract_to_store` did: the store's summary plus the shards this call wrote
    (``written``) and the items it read (``items``, embedded or quarantined).

    For a writer of some shards only (``shards=`` given) the store is not finished here:
    ``complete`` is False and ``rows``, ``dim``, ``shards`` and ``quarantined`` count the
    shards this call wrote.
    """

    written: tuple[int, ...] = ()
    items: int = 0


def extract_to_store(dataset: Dataset, extractor: Extractor, store_root: Path, *, shards: list[int] | None = None,
                     batch_size: int = 256, num_workers: int | None = None, shard_rows: int = DEFAULT_SHARD_ROWS,
                     progress: bool = True, on_shard: ShardCallback | None = None,
                     decode_on_device: bool = False, wait: bool = True, run_id: str | None = None) -> ExtractSummary:
    """Embed the items of ``dataset`` into its store under ``store_root``; resume if one exists.

    ``shards=None``: this process is the store's only writer: it holds the store's lock
    (:class:`~gpu_ops.store_lock.StoreLock`; another writer is waited for, or with ``wait=False``
    an InputError), embeds every pending item and finishes the store. An image folder's store is
    refreshed in place (:mod:`gpu_ops.incremental`): only new and changed images are embedded,
    removed ones retired, and its rows record ``run_id`` (a new one when None). Any other
    dataset's store is one per content, its shards fixed ranges of dataset indices.
    ``shards=[...]``: one of many writers (a Dask worker) of a store of fixed ranges; it embeds
    those of the given shards that are still pending into their part files and per-shard entries
    (:class:`gpu_ops.distributed.ShardedStore`), never ``manifest.json``; the driver holds the lock
    and merges them (:func:`gpu_ops.distributed.merge_shards`). ``shard_rows`` applies to a new
    store (or a folder's new parts) only.

    Unreadable items are quarantined (source + reason) and the run goes on. Raises InputError
    when no item at all could be read (for a sharded store: when it is merged).
    ``decode_on_device`` decodes JPEG batches on the extractor's device (image folders and
    pretrained image extractors only). ``on_shard(done, total)`` follows the shards this call
    covers. On CUDA out-of-memory the batch is halved (:class:`AdaptiveEmbedder`).
    """
    _check_options(dataset, extractor, batch_size, decode_on_device)
    options = {"batch_size": batch_size, "num_workers": num_workers, "decode_on_device": decode_on_device,
               "progress": progress, "on_shard": on_shard}
    if shards is not None:
        incremental = False
        directory = store_directory(store_root, dataset, extractor, incremental)
        from gpu_ops.distributed import ShardedStore  # the multi-writer protocol lives with its merge

        store = ShardedStore(directory, store_metadata(dataset, extractor, incremental), len(dataset), shard_rows,
                             shards=shards)
        outside = [s for s in shards if not 0 <= s < store.n_shards]
        if outside:
            raise InputError(f"{directory}: shard(s) {outside} outside the store's {store.n_shards} shard(s)")
        return _extract_pending(store, dataset, extractor, len(set(shards)), finish=False, **options)
    incremental = refreshed_in_place(dataset)
    directory = store_directory(store_root, dataset, extractor, incremental)
    metadata = store_metadata(dataset, extractor, incremental)
    run_id = run_id or new_run_id()
    with StoreLock(directory, run_id, wait=wait):
        if incremental:
            with start_refresh(directory, metadata, dataset, shard_rows, run_id) as refreshing:
                return _extract_pending(refreshing, dataset, extractor, refreshing.n_shards, finish=True, **options)
        store = EmbeddingStore(directory, metadata, len(dataset), shard_rows)
        return _extract_pending(store, dataset, extractor, store.n_shards, finish=True, **options)


def _check_options(dataset: Dataset, extractor: Extractor, batch_size: int, decode_on_device: bool) -> None:
    """Refuse (one line) a batch size below 1, or decoding on the device where it cannot be done."""
    if batch_size < 1:
        raise InputError(f"batch_size must be a positive integer; got {batch_size}")
    if decode_on_device and not (hasattr(dataset, "paths") and extractor.device_decoding):
        raise InputError("decoding on the device needs an image folder and a pretrained image extractor "
                         f"(got {dataset.name} with {extractor.name})")


@dataclass(frozen=True)
class EmbeddedRows:
    """A group of items embedded but not yet stored: the arguments of a store's ``write_shard``."""

    image_ids: list[str]
    sources: list[str]
    labels: np.ndarray | None  #: (b,) int32, or None for an unlabelled dataset
    embeddings: np.ndarray  #: (b, d) float32; (0, 0) when no item could be read
    quarantined: list[tuple[str, str]]  #: (source, reason) of the unreadable items


class _InMemoryShard:
    """Stands in for a store in :func:`_embed_shards`: one shard, the given dataset indices, kept
    in memory (:attr:`rows`) instead of written."""

    def __init__(self, indices: list[int]) -> None:
        self.indices = indices
        self.rows: EmbeddedRows | None = None

    def pending_shards(self) -> list[int]:
        return [0] if self.rows is None else []

    def shard_range(self, shard: int) -> list[int]:
        return self.indices

    def write_shard(self, shard: int, image_ids: list[str], sources: list[str], labels: np.ndarray | None,
                    embeddings: np.ndarray, quarantined: list[tuple[str, str]]) -> None:
        self.rows = EmbeddedRows(list(image_ids), list(sources), None if labels is None else np.asarray(labels),
                                 np.asarray(embeddings, dtype=np.float32), list(quarantined))


def embed_items(dataset: Dataset, extractor: Extractor, indices: list[int], *, batch_size: int = 256,
                num_workers: int | None = None, decode_on_device: bool = False) -> EmbeddedRows:
    """Embed the items of ``dataset`` at ``indices`` (in that order) and return them as one
    shard's rows, without writing: a Dask worker's share of a refresh whose driver writes the
    store (:func:`gpu_ops.distributed.refresh_on_dask`). The loader, batching, out-of-memory
    halving and quarantine reasons are those of :func:`extract_to_store`."""
    _check_options(dataset, extractor, batch_size, decode_on_device)
    shard = _InMemoryShard(list(indices))
    _embed_shards(shard, dataset, extractor, shard.indices, batch_size=batch_size, num_workers=num_workers,
                  decode_on_device=decode_on_device, progress=False, on_shard=None)
    assert shard.rows is not None  # _embed_shards writes every pending shard or raises
    return shard.rows


def _extract_pending(store: EmbeddingStore, dataset: Dataset, extractor: Extractor, covered: int, *, finish: bool,
                     batch_size: int, num_workers: int | None, decode_on_device: bool, progress: bool,
                     on_shard: ShardCallback | None) -> ExtractSummary:
    """Embed ``store``'s pending shards; ``finish`` the store (the only writer) or summarise the
    shards written (one of many writers). ``covered``: the shards ``on_shard`` counts."""
    pending = store.pending_shards()
    if pending:
        store.check_writable()
    indices = [i for s in pending for i in store.shard_range(s)]
    if pending:
        log.info("extracting %d items (%d shards) with %s on %s into %s", len(indices), len(pending),
                 extractor.name, extractor.device, store.directory)
        done = (lambda: on_shard(covered - len(store.pending_shards()), covered)) if on_shard else None
        if streams_vectors(dataset, extractor):
            _copy_vector_shards(store, dataset, on_shard=done)
        else:
            _embed_shards(store, dataset, extractor, indices, batch_size=batch_size, num_workers=num_workers,
                          decode_on_device=decode_on_device, progress=progress, on_shard=done)
    else:
        log.info("store %s: nothing to extract", store.directory)
    if finish:
        summary = store.finish()
    else:
        entries = [store.manifest["shards"][f"{s:05d}"] for s in pending]
        dims = [int(e["dim"]) for e in entries if e.get("dim")]
        summary = StoreSummary(str(store.directory), sum(e["rows"] for e in entries), dims[0] if dims else 0,
                               len(entries), sum(len(e["quarantined"]) for e in entries), False)
    if on_shard:
        on_shard(covered, covered)
    if finish:
        summary = checked_summary(summary, dataset.name, len(dataset))
    return ExtractSummary(**dataclasses.asdict(summary), written=tuple(pending), items=len(indices))


def _embed_shards(store: ShardSink, dataset: Dataset, extractor: Extractor, indices: list[int], *,
                  batch_size: int, num_workers: int | None, decode_on_device: bool, progress: bool,
                  on_shard: Callable[[], None] | None) -> None:
    """Embed ``indices`` (the store's pending shards, in order) and write each shard once it is whole."""
    loader = batch_loader(dataset, extractor, indices, batch_size=batch_size, num_workers=num_workers,
                          decode_on_device=decode_on_device)
    embed = AdaptiveEmbedder(extractor, batch_size)
    bar = tqdm(total=len(indices), unit="img", desc=f"extract {extractor.name}", disable=not progress)
    buffer = _ShardBuffer(store, dataset)
    for good, tensor, bad in loader:
        if decode_on_device and tensor is not None:
            tensor, failed, reasons = _device_decoded(extractor, tensor)
            bad = bad + [(good[i], why) for i, why in zip(failed, reasons)]
            good = [g for i, g in enumerate(good) if i not in set(failed)]
        emb = embed(tensor) if tensor is not None else None
        buffer.add(good, emb, bad)
        bar.update(len(good) + len(bad))
        for done_shard in buffer.flush_finished():
            if on_shard:
                on_shard()
            log.debug("shard %d written", done_shard)
    bar.close()
    buffer.flush_all()


def streams_vectors(dataset: Dataset, extractor: Extractor) -> bool:
    """True when ``dataset`` reads its vectors in row ranges (``rows(start, stop)``: Parquet
    embeddings) and ``extractor`` passes vectors through (raw): shards are then copied range by
    range, with no per-item loader and one shard in memory at a time."""
    return dataset.item_kind == "vector" and extractor.name == "raw" and callable(getattr(dataset, "rows", None))


def _copy_vector_shards(store: EmbeddingStore, dataset: Any, on_shard: Callable[[], None] | None) -> None:
    """Write each pending shard from ``dataset.rows`` (see :func:`streams_vectors`)."""
    for shard in store.pending_shards():
        r = store.shard_range(shard)
        ids = [str(i) for i in dataset.image_ids[r.start:r.stop]]
        labels = None if dataset.labels is None else np.asarray(dataset.labels[r.start:r.stop])
        store.write_shard(shard, ids, [dataset.name] * len(ids), labels, dataset.rows(r.start, r.stop), [])
        if on_shard:
            on_shard()


def checked_summary(summary: StoreSummary, dataset_name: str, n_items: int) -> StoreSummary:
    """``summary`` of a finished store; fails on one with no rows at all, reports quarantined items."""
    if summary.rows == 0:
        raise InputError(f"{dataset_name}: no readable image among {n_items} files "
                         f"(see {Path(summary.directory) / 'quarantine.csv'})")
    if summary.quarantined:
        log.warning("%d unreadable item(s) skipped; listed in %s", summary.quarantined,
                    Path(summary.directory) / "quarantine.csv")
    return summary


class _ShardBuffer:
    """Collects embedded items in dataset order and writes each shard once it is whole."""

    def __init__(self, store: ShardSink, dataset: Dataset) -> None:
        self.store, self.dataset = store, dataset
        self.rows: dict[int, np.ndarray] = {}
        self.bad: dict[int, str] = {}
        self.queue = list(store.pending_shards())

    def add(self, good: list[int], emb: np.ndarray | None, bad: list[tuple[int, str]]) -> None:
        for pos, index in enumerate(good):
            self.rows[index] = emb[pos]  # type: ignore[index]
        self.bad.update(bad)

    def _complete(self, shard: int) -> bool:
        return all(i in self.rows or i in self.bad for i in self.store.shard_range(shard))

    def flush_finished(self) -> list[int]:
        written = []
        while self.queue and self._complete(self.queue[0]):
            written.append(self._write(self.queue.pop(0)))
        return written

    def flush_all(self) -> None:
        while self.queue:
            shard = self.queue.pop(0)
            if not self._complete(shard):
                raise RuntimeError(f"shard {shard} is incomplete after the loader finished")
            self._write(shard)

    def _write(self, shard: int) -> int:
        ds = self.dataset
        idx = [i for i in self.store.shard_range(shard) if i in self.rows]
        emb = np.stack([self.rows.pop(i) for i in idx]) if idx else np.zeros((0, 0), np.float32)
        labels = None if ds.labels is None else ds.labels[idx]
        quarantined = [(ds.source(i), self.bad.pop(i)) for i in self.store.shard_range(shard) if i in self.bad]
        for source, reason in quarantined:
            log.info("skipped %s: %s", source, reason)
        self.store.write_shard(shard, [ds.image_ids[i] for i in idx], [ds.source(i) for i in idx], labels, emb, quarantined)
        return shard
