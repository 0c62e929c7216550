"""The data interface every k-means of ours runs over, and its three sources.

Modelled on FAISS ``contrib/clustering.py`` (``DatasetAssign``, ``DatasetAssignGPU``): the Lloyd
driver (:func:`gpu_ops.cluster.lloyd.lloyd`) never sees the rows, only a source that can

- ``count()`` and ``dim()`` its rows,
- ``subset(n, seed)``: ``n`` rows drawn uniformly without replacement by
  ``np.random.default_rng(seed)`` (:func:`subset_rows`), in source order, for seeding or an
  initial fit; every row when ``n >= count()``. Every source draws the same rows for the same
  ``(n, seed)``, so a seeding does not depend on where the rows live;
- ``assign_to(centroids)``: each row's nearest centroid and squared distance, and the per-cluster
  sums and counts the next centroids are made of (:class:`Assignment`). The driver, not the
  source, decides what an empty cluster (count 0) becomes.

Sources: :class:`ArraySource` (an in-memory or memory-mapped array), :class:`StoreSource` (a
Parquet embedding store read batch by batch within a memory budget) and :class:`DaskSource`
(partitions held by Dask workers; each worker assigns its own, the driver adds up the sums). All
three use the same two routines: :class:`NearestCentre`, the one nearest-centre kernel per device
kind (CPU: blocked BLAS; GPU: a FAISS GPU flat index), and :func:`cluster_sums`, the one
per-cluster sum.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Protocol, runtime_checkable

import numpy as np

from gpu_ops.errors import InputError

log = logging.getLogger(__name__)

#: Bytes of the (rows x k) float32 distance block of the CPU kernel. 8 MiB assigned 100k x 128 rows
#: to 100 centres as fast as 32 MiB did and kept the 2M-row streaming k-means 10 MB lower in peak RSS.
DISTANCE_BLOCK_BYTES = 8 * 2**20
#: Bytes of the float64 copy of the rows :func:`cluster_sums` adds up at a time.
SUM_BLOCK_BYTES = 2**20
#: Bytes of one float32 batch an :class:`ArraySource` converts at a time (a memmap or another dtype).
ARRAY_BATCH_BYTES = 64 * 2**20
#: Rows per record batch a :class:`StoreSource` reads when not told otherwise.
STORE_BATCH_ROWS = 65_536


# --------------------------------------------------------------------------------------------
# The two routines every source uses


@functools.lru_cache(maxsize=1)
def _faiss_gpu_resources() -> Any:
    """One ``StandardGpuResources`` per process: creating it reserves GPU scratch memory."""
    from gpu_ops.cluster.kmeans import import_faiss

    return import_faiss().StandardGpuResources()


def faiss_gpu_usable() -> bool:
    """Is the installed faiss a GPU build that sees a GPU? (Imports faiss, never torch.)"""
    if importlib.util.find_spec("faiss") is None:
        return False
    from gpu_ops.cluster.kmeans import import_faiss
    from gpu_ops.device import faiss_has_gpu

    try:
        faiss = import_faiss()  # first, so that its OpenMP threads sleep when idle
    except Exception:  # noqa: BLE001 - a broken install is "not usable"
        return False
    return hasattr(faiss, "StandardGpuResources") and faiss_has_gpu()


class NearestCentre:
    """The nearest-centre kernel: for rows ``X`` (b, d), the index of the nearest centroid and
    the squared L2 distance to it.

    CPU: blocked BLAS products with the ``|x|^2 - 2 x.c + |c|^2`` expansion (FAISS's own), the
    ``(rows x k)`` block bounded by :data:`DISTANCE_BLOCK_BYTES`. numpy's matrix product beat
    ``faiss.IndexFlatL2.search`` by 4x for 100 centres (44 000 x 64 rows: 0.05 s vs 0.23 s per
    batch on two cores), and FAISS's OpenMP threads kept spinning into the Parquet decoding that
    follows each search. GPU (``gpu=True`` and a GPU build of faiss that sees a GPU): the
    centroids in a FAISS flat index on GPU 0 (``index_cpu_to_gpu``), searched for the nearest one,
    as FAISS's ``DatasetAssignGPU`` does; without one, the CPU kernel runs (``device`` says which).
    """

    def __init__(self, centroids: np.ndarray, gpu: bool = False) -> None:
        self.centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        self._index = self._gpu_index(self.centroids) if gpu else None
        self.device = "gpu" if self._index is not None else "cpu"
        self._csq = np.einsum("ij,ij->i", self.centroids, self.centroids)

    @staticmethod
    def _gpu_index(centroids: np.ndarray) -> Any:
        if not faiss_gpu_usable():
            log.info("no GPU build of faiss sees a GPU: nearest centres on the CPU")
            return None
        from gpu_ops.cluster.kmeans import import_faiss

        faiss = import_faiss()
        index = faiss.index_cpu_to_gpu(_faiss_gpu_resources(), 0, faiss.IndexFlatL2(centroids.shape[1]))
        index.add(centroids)
        return index

    def __call__(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(labels int64 (b,), squared distances float32 (b,))``."""
        X = np.ascontiguousarray(X, dtype=np.float32)
        if self._index is not None:
            return self._gpu(X)
        return self._cpu(X)

    def _cpu(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        labels = np.empty(X.shape[0], dtype=np.int64)
        dist = np.empty(X.shape[0], dtype=np.float32)
        step = max(256, DISTANCE_BLOCK_BYTES // (4 * len(self.centroids)))
        for s in range(0, X.shape[0], step):
            block = X[s:s + step]
            D = block @ self.centroids.T
            D *= -2.0
            D += self._csq[None, :]
            j = np.argmin(D, axis=1)
            labels[s:s + len(j)] = j
            xsq = np.einsum("ij,ij->i", block, block)
            dist[s:s + len(j)] = np.maximum(D[np.arange(len(j)), j] + xsq, 0)
        return labels, dist

    def _gpu(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        D, I = self._index.search(X, 1)
        return I[:, 0].astype(np.int64), np.maximum(D[:, 0], 0).astype(np.float32)


def cluster_sums(X: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster sums ``(k, d)`` float64 and counts ``(k,)`` int64 of the rows of ``X`` by label.

    A sparse one-hot ``(k x rows)`` matrix times the rows (FAISS's ``DatasetAssignSparse`` does the
    same), in blocks whose float64 copy takes at most :data:`SUM_BLOCK_BYTES`.
    """
    from scipy.sparse import csc_matrix

    labels = np.asarray(labels, dtype=np.int64)
    sums = np.zeros((int(k), X.shape[1]), dtype=np.float64)
    step = max(256, SUM_BLOCK_BYTES // (8 * X.shape[1]))
    for s in range(0, X.shape[0], step):
        lab = labels[s:s + step]
        m = len(lab)
        onehot = csc_matrix((np.ones(m), lab, np.arange(m + 1)), shape=(int(k), m))
        sums += onehot @ np.asarray(X[s:s + step], dtype=np.float64)
    return sums, np.bincount(labels, minlength=int(k)).astype(np.int64)


# --------------------------------------------------------------------------------------------
# The interface


class Assignment(NamedTuple):
    """What ``assign_to`` returns (a tuple: ``labels, distances, sums, counts, inertia = ...``).

    ``labels`` (n,) int64 and ``distances`` (n,) float32 are None when the caller asked for no
    labels; ``distances`` is also None when the labels went to a caller's array (``labels_out``,
    e.g. a memory-mapped file: n more floats would break a memory bound). ``sums`` (k, d) and
    ``inertia`` (the sum of the squared distances) are float64, ``counts`` (k,) int64.
    """

    labels: np.ndarray | None
    distances: np.ndarray | None
    sums: np.ndarray
    counts: np.ndarray
    inertia: float


@runtime_checkable
class KMeansSource(Protocol):
    """What the Lloyd driver needs from the rows (see the module docstring)."""

    def count(self) -> int:
        """Number of rows."""

    def dim(self) -> int:
        """Number of columns."""

    def subset(self, n: int, seed: int) -> np.ndarray:
        """``min(n, count())`` rows (see :func:`subset_rows`), float32 of shape (m, d)."""

    def assign_to(self, centroids: np.ndarray, *, with_labels: bool = True,
                  labels_out: np.ndarray | None = None) -> Assignment:
        """Nearest centroid of every row, and the per-cluster sums and counts."""


def subset_rows(count: int, n: int, seed: int) -> np.ndarray:
    """The rows every source's ``subset(n, seed)`` returns: sorted, drawn without replacement."""
    if n >= count:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, size=int(n), replace=False))


def _check_centroids(centroids: np.ndarray, d: int) -> np.ndarray:
    c = np.asarray(centroids)
    if c.ndim != 2 or c.shape[1] != d or c.shape[0] == 0:
        raise InputError(f"centroids must have shape (k, {d}); got {c.shape}")
    return c


def _labels_array(n: int, labels_out: np.ndarray | None) -> np.ndarray:
    if labels_out is None:
        return np.empty(n, dtype=np.int64)
    if labels_out.shape != (n,):
        raise InputError(f"labels_out must have shape ({n},); got {labels_out.shape}")
    return labels_out


# --------------------------------------------------------------------------------------------
# In-process sources: rows arrive in float32 batches


class BatchedSource:
    """A source whose rows arrive in float32 batches (``batches()``); one pass per ``assign_to``.

    ``batch_rows`` and ``gpu`` (run the GPU kernel) may be changed between calls.
    """

    def __init__(self, n: int, d: int, batch_rows: int, gpu: bool) -> None:
        self.n, self.d = int(n), int(d)
        self.batch_rows = int(batch_rows)
        self.gpu = bool(gpu)

    def count(self) -> int:
        return self.n

    def dim(self) -> int:
        return self.d

    def batches(self) -> Iterator[np.ndarray]:  # pragma: no cover - every source defines it
        raise NotImplementedError

    def take(self, rows: np.ndarray) -> np.ndarray:  # pragma: no cover - every source defines it
        """The sorted, unique rows ``rows`` as float32 (len(rows), d)."""
        raise NotImplementedError

    def subset(self, n: int, seed: int) -> np.ndarray:
        return self.take(subset_rows(self.n, n, seed))

    def assign_to(self, centroids: np.ndarray, *, with_labels: bool = True,
                  labels_out: np.ndarray | None = None) -> Assignment:
        """One pass over the batches: nearest centroids, per-cluster sums and counts.

        ``labels_out`` (n,) int64, e.g. a ``np.memmap``, receives the labels instead of a new array.
        """
        centroids = _check_centroids(centroids, self.d)
        k = centroids.shape[0]
        nearest = NearestCentre(centroids, self.gpu)
        labels = _labels_array(self.n, labels_out) if with_labels else None
        distances = np.empty(self.n, dtype=np.float32) if with_labels and labels_out is None else None
        sums = np.zeros((k, self.d), dtype=np.float64)
        counts = np.zeros(k, dtype=np.int64)
        inertia, start = 0.0, 0
        for X in self.batches():
            lab, dist = nearest(X)
            s, c = cluster_sums(X, lab, k)
            sums += s
            counts += c
            inertia += float(dist.sum(dtype=np.float64))
            if labels is not None:
                labels[start:start + len(lab)] = lab
            if distances is not None:
                distances[start:start + len(lab)] = dist
            start += len(lab)
        if start != self.n:  # pragma: no cover - footers and data disagree
            raise InputError(f"expected {self.n} rows, read {start}")
        if isinstance(labels, np.memmap):
            labels.flush()
        return Assignment(labels, distances, sums, counts, inertia)


class ArraySource(BatchedSource):
    """Rows of an in-memory or memory-mapped array (n, d) (FAISS's ``DatasetAssign``).

    A C-contiguous float32 array is used in place; any other array (a ``np.memmap``, float64) is
    converted ``batch_rows`` rows at a time, so a memory-mapped file stays on disk.
    """

    def __init__(self, X: np.ndarray, *, batch_rows: int | None = None, gpu: bool = False) -> None:
        X = X if isinstance(X, np.ndarray) else np.asarray(X)
        if X.ndim != 2 or X.shape[0] == 0 or X.shape[1] == 0:
            raise InputError(f"X must be a non-empty 2-D array (n_samples, n_features); got shape {X.shape}")
        self.X = X
        rows = batch_rows or max(1024, ARRAY_BATCH_BYTES // (4 * X.shape[1]))
        super().__init__(X.shape[0], X.shape[1], rows, gpu)

    def batches(self) -> Iterator[np.ndarray]:
        for start in range(0, self.n, self.batch_rows):
            yield np.ascontiguousarray(self.X[start:start + self.batch_rows], dtype=np.float32)

    def take(self, rows: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(self.X[rows], dtype=np.float32)

    def iter_ids(self) -> Iterator[Any]:
        """Row numbers as strings, batch by batch (the ids of an array's rows)."""
        import pyarrow as pa

        for start in range(0, self.n, self.batch_rows):
            stop = min(self.n, start + self.batch_rows)
            yield pa.array([str(i) for i in range(start, stop)], pa.string())


class StoreSource(BatchedSource):
    """Rows of a Parquet embedding store, read one record batch of ``batch_rows`` at a time.

    Only the ``embedding`` (and, for :meth:`iter_ids`, ``image_id``) column is read; row counts and
    the dimension come from the Parquet footers, so opening a store reads no data. Memory: one
    decoded batch and its float32 copy, plus the Parquet row group being decoded.
    """

    def __init__(self, directory: str | Path, *, batch_rows: int = STORE_BATCH_ROWS, gpu: bool = False) -> None:
        import pyarrow.parquet as pq

        from gpu_ops.store import part_files

        self.directory = Path(directory)
        self.files = part_files(self.directory)
        counts, dims = [], set()
        for path in self.files:
            meta = pq.ParquetFile(path)
            schema = meta.schema_arrow
            if "embedding" not in schema.names:
                raise InputError(f"{path}: no 'embedding' column (found: {', '.join(schema.names)})")
            etype = schema.field("embedding").type
            if not hasattr(etype, "list_size"):
                raise InputError(f"{path}: embedding column must be fixed_size_list<float32>; got {etype}")
            dims.add(int(etype.list_size))
            counts.append(int(meta.metadata.num_rows))
        if len(dims) != 1:
            raise InputError(f"{self.directory}: shards disagree on the embedding dimension: {sorted(dims)}")
        if sum(counts) == 0:
            raise InputError(f"{self.directory}: the store holds no rows")
        super().__init__(sum(counts), dims.pop(), batch_rows, gpu)

    def _record_batches(self, column: str) -> Iterator[Any]:
        import pyarrow.parquet as pq

        for path in self.files:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=self.batch_rows, columns=[column]):
                yield batch.column(0)

    def batches(self) -> Iterator[np.ndarray]:
        from gpu_ops.store import embeddings_to_numpy

        for column in self._record_batches("embedding"):
            yield np.ascontiguousarray(embeddings_to_numpy(column), dtype=np.float32)

    def iter_ids(self) -> Iterator[Any]:
        """The ``image_id`` column, batch by batch, in the order :meth:`batches` reads the rows."""
        yield from self._record_batches("image_id")

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Gather the (sorted, unique) global row numbers ``rows`` in one streaming pass."""
        out = np.empty((len(rows), self.d), dtype=np.float32)
        start, filled = 0, 0
        for emb in self.batches():
            stop = start + emb.shape[0]
            lo, hi = np.searchsorted(rows, [start, stop])
            if hi > lo:
                out[filled:filled + hi - lo] = emb[rows[lo:hi] - start]
                filled += hi - lo
            start = stop
        if filled != len(rows):  # pragma: no cover - the footers promised more rows than came
            raise InputError(f"{self.directory}: expected {len(rows)} sampled rows, read {filled}")
        return out


def as_source(data: Any, *, batch_rows: int | None = None, gpu: bool = False) -> ArraySource | StoreSource:
    """A store directory (str / Path) or an array-like of shape (n, d), as a source."""
    if isinstance(data, (str, os.PathLike)):
        return StoreSource(data, batch_rows=batch_rows or STORE_BATCH_ROWS, gpu=gpu)
    return ArraySource(data, batch_rows=batch_rows, gpu=gpu)


# --------------------------------------------------------------------------------------------
# Partitions held by Dask workers


def _load_part(path: str) -> np.ndarray:
    import pyarrow.parquet as pq

    from gpu_ops.store import embeddings_to_numpy

    column = pq.read_table(path, columns=["embedding"]).column("embedding")
    return np.ascontiguousarray(embeddings_to_numpy(column), dtype=np.float32)


def _shape(X: np.ndarray) -> tuple[int, int]:
    return int(X.shape[0]), int(X.shape[1])


def _take(X: np.ndarray, rows: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(X[rows], dtype=np.float32)


def _assign_partition(X: np.ndarray, centroids: np.ndarray, with_labels: bool, gpu: bool) -> Assignment:
    """Worker side: one partition's assignment, by the in-memory source's code."""
    return ArraySource(X, gpu=gpu).assign_to(centroids, with_labels=with_labels)


class DaskSource:
    """Rows spread over Dask workers as partitions (futures of float32 (n_i, d) arrays).

    ``assign_to`` runs :class:`ArraySource`'s assignment on each worker, on its own partition, and
    adds up the per-cluster sums, counts and inertia on the driver; labels travel only when asked
    for. ``subset`` gathers just the drawn rows.
    """

    def __init__(self, client: Any, partitions: list[Any], gpu: bool = False) -> None:
        if not partitions:
            raise InputError("a Dask source needs at least one partition")
        self.client = client
        self.partitions = list(partitions)
        self.gpu = bool(gpu)
        shapes = client.gather(client.map(_shape, self.partitions))
        dims = {d for _, d in shapes}
        if len(dims) != 1:
            raise InputError(f"partitions disagree on the dimension: {sorted(dims)}")
        self.sizes = [n for n, _ in shapes]
        self.n, self.d = int(sum(self.sizes)), dims.pop()
        if self.n == 0:
            raise InputError("the Dask partitions hold no rows")

    @classmethod
    def from_parts(cls, client: Any, paths: list[str], gpu: bool = False) -> "DaskSource":
        """Each worker loads the ``embedding`` column of its Parquet part files."""
        return cls(client, client.map(_load_part, [str(p) for p in paths]), gpu)

    def count(self) -> int:
        return self.n

    def dim(self) -> int:
        return self.d

    def subset(self, n: int, seed: int) -> np.ndarray:
        rows = subset_rows(self.n, n, seed)
        bounds = np.cumsum([0, *self.sizes])
        picks = [rows[(rows >= lo) & (rows < hi)] - lo for lo, hi in zip(bounds[:-1], bounds[1:])]
        return np.concatenate(self.client.gather(self.client.map(_take, self.partitions, picks)))

    def assign_to(self, centroids: np.ndarray, *, with_labels: bool = True,
                  labels_out: np.ndarray | None = None) -> Assignment:
        centroids = np.ascontiguousarray(_check_centroids(centroids, self.d), dtype=np.float32)
        m = len(self.partitions)
        # Fresh keys every call: equal centroids (a converged loop's final pass) must not reuse the
        # key of a scattered array or of results that are being released.
        c = self.client.scatter(centroids, broadcast=True, hash=False)
        parts = self.client.gather(self.client.map(_assign_partition, self.partitions, [c] * m,
                                                   [bool(with_labels)] * m, [self.gpu] * m, pure=False))
        sums = np.sum([p.sums for p in parts], axis=0)
        counts = np.sum([p.counts for p in parts], axis=0)
        inertia = float(sum(p.inertia for p in parts))
        labels = distances = None
        if with_labels:
            labels = _labels_array(self.n, labels_out)
            labels[:] = np.concatenate([p.labels for p in parts])
            if labels_out is None:
                distances = np.concatenate([p.distances for p in parts])
        return Assignment(labels, distances, sums, counts, inertia)
