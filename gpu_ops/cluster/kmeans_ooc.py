"""k-means over more rows than fit in memory: fit on a sample, refine and assign in a stream.

:class:`StreamingKMeans` reads an embedding store (:mod:`gpu_ops.store`, Parquet) batch by batch
and never holds more than a ``memory_mb`` budget of embeddings:

1. **Sample.** ``min(n, k * max_points_per_centroid)`` rows (FAISS's points-per-centroid cap,
   set explicitly, default 256), further capped so the sample fits in half of ``memory_mb``,
   drawn uniformly without replacement in one streaming pass.
2. **Fit** the sample in memory with the ``kmeans`` backend the registry resolves (cuML or
   FAISS-GPU on a GPU machine, FAISS-CPU with k-means++ seeding here): see
   :class:`gpu_ops.cluster.kmeans.FaissKMeans`.
3. **Refine** (``refine_iter`` passes, default 1): exact Lloyd steps over *all* rows, streamed:
   :func:`gpu_ops.cluster.lloyd.lloyd` (the package's one Lloyd loop) over a
   :class:`~gpu_ops.cluster.sources.StoreSource` (or an :class:`~gpu_ops.cluster.sources.ArraySource`
   for an array): each pass assigns every batch to the current centres and accumulates per-cluster
   sums and counts in float64 (``k * d`` memory), then moves every non-empty centre to its mean.
4. **Assign** every row to the final centres in a last pass (the driver's final assignment):
   labels go to a memory-mapped ``.npy`` (``labels_path``) and, optionally, to a Parquet file of
   ``image_id, label`` (``assignments_path``), written one row group per batch to a temporary name
   renamed at the end (one more pass that reads only the ``image_id`` column).

Memory: ``memory_mb`` bounds the sample, the seeding sample, one decoded batch and the
accumulators; the process also holds the interpreter and libraries (about 80 MB for numpy,
pyarrow and faiss) and one Parquet row group while decoding it (the store writes at most
``shard_rows`` = 50 000 rows per row group). Labels in memory cost 8 bytes per row unless
``labels_path`` is given (then they are a memory-mapped file).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gpu_ops._validation import as_float32_matrix, check_int
from gpu_ops.cluster.kmeans import default_trials
from gpu_ops.cluster.lloyd import lloyd
from gpu_ops.cluster.sources import ArraySource, NearestCentre, StoreSource, as_source
from gpu_ops.errors import InputError
from gpu_ops.fsutil import atomic_path

log = logging.getLogger(__name__)

#: Fractions of ``memory_mb`` given to each buffer.
SAMPLE_FRACTION = 0.45
SEED_FRACTION = 0.15
BATCH_FRACTION = 0.10
CENTROID_FRACTION = 0.15


@dataclass
class MemoryPlan:
    """How ``memory_mb`` is spent: rows per buffer."""

    memory_mb: int
    sample_rows: int
    seed_rows: int
    batch_rows: int

    def as_dict(self) -> dict[str, int]:
        return {"memory_mb": self.memory_mb, "sample_rows": self.sample_rows, "seed_rows": self.seed_rows,
                "batch_rows": self.batch_rows}


def plan_memory(n: int, d: int, k: int, memory_mb: int, max_points_per_centroid: int,
                batch_rows: int | None = None) -> MemoryPlan:
    """Split ``memory_mb`` between the training sample, the seeding sample and one batch.

    Raises :class:`InputError` when ``memory_mb`` cannot hold ``k`` centres plus a sample of at
    least ``k`` rows (FAISS needs as many training rows as centres).
    """
    budget = int(memory_mb) * 2**20
    # centres (float32), their float64 sums, counts: k * (4d + 8d + 8), plus a per-centre FAISS
    # assignment workspace.
    centroid_bytes = k * (12 * d + 64)
    if centroid_bytes > CENTROID_FRACTION * budget:
        need = int(np.ceil(centroid_bytes / CENTROID_FRACTION / 2**20))
        raise InputError(f"memory_mb={memory_mb} is too small for k={k} centres of {d} dimensions; need at least {need}")
    row_train = 4 * d + 32  # the row, FAISS's distance and label per row, our final search output
    sample_rows = min(n, k * int(max_points_per_centroid), int(SAMPLE_FRACTION * budget // row_train))
    if sample_rows < k:
        raise InputError(f"memory_mb={memory_mb} holds a sample of {sample_rows} rows of {d} dimensions, "
                         f"fewer than k={k}; raise memory_mb")
    trials = default_trials(k)
    seed_rows = int(SEED_FRACTION * budget // (4 * d + 24 * trials + 16))
    if batch_rows is None:
        # one decoded Arrow batch + its float32 copy + ids + labels and distances
        batch_rows = int(BATCH_FRACTION * budget // (8 * d + 96))
        batch_rows = max(1024, min(batch_rows, 1 << 20))
    return MemoryPlan(int(memory_mb), int(sample_rows), max(1, seed_rows), int(batch_rows))


class StreamingKMeans:
    """k-means whose memory is bounded by ``memory_mb``, not by the number of rows.

    Parameters
    ----------
    n_clusters : int
        Any k up to the sample size: 10 000+ works (FAISS trains it; seeding switches to random
        when k-means++ would be too costly, see :class:`~gpu_ops.cluster.kmeans.FaissKMeans`).
    memory_mb : int
        Budget for the sample, the seeding sample, one batch and the accumulators.
    max_iter : int
        Lloyd iterations on the sample.
    n_init : int
        Restarts on the sample (best objective kept).
    refine_iter : int
        Streaming Lloyd passes over all rows after the sample fit (0 to skip); they stop early once
        the objective stops decreasing.
    max_points_per_centroid : int
        Sample at most ``k * max_points_per_centroid`` rows (FAISS's rule; its default is 256).
    seed : int
    backend : str
        ``kmeans`` backend for the sample fit (``auto`` / ``gpu`` / ``cpu`` / a name).
    batch_rows : int or None
        Rows per streamed batch; None derives it from ``memory_mb``.

    Attributes
    ----------
    cluster_centers_ : np.ndarray of shape (k, d), float32
    labels_ : np.ndarray (or np.memmap) of shape (n,), int64
    inertia_ : float
        Sum over *all* rows of the squared distance to the nearest final centre.
    sample_inertia_ : float
        The in-memory fit's objective on its sample.
    pass_objectives_ : list of float
        Full-data objective at the start of each refinement pass, then the final one.
    counts_ : np.ndarray of shape (k,), int64
        Rows per cluster.
    plan_ : MemoryPlan
    resolution_ : dict
        The backend the registry picked for the sample fit, and why.
    timings_ : dict of str to float
        Seconds spent sampling, fitting, refining and assigning.
    """

    def __init__(self, n_clusters: int = 8, memory_mb: int = 1024, max_iter: int = 25, n_init: int = 1,
                 refine_iter: int = 1, max_points_per_centroid: int = 256, seed: int = 0, backend: str = "auto",
                 batch_rows: int | None = None) -> None:
        self.n_clusters = n_clusters
        self.memory_mb = memory_mb
        self.max_iter = max_iter
        self.n_init = n_init
        self.refine_iter = refine_iter
        self.max_points_per_centroid = max_points_per_centroid
        self.seed = seed
        self.backend = backend
        self.batch_rows = batch_rows

    def fit(self, data: Any, labels_path: str | Path | None = None,
            assignments_path: str | Path | None = None) -> "StreamingKMeans":
        """Cluster ``data``: a store directory, or an array (n, d) (a ``np.memmap`` stays on disk).

        ``labels_path``: write labels to this ``.npy`` (memory-mapped, int64) instead of memory.
        ``assignments_path``: also write a Parquet of ``image_id, label`` (int32), batch by batch.
        """
        from gpu_ops.placement import op_backend

        k = check_int("n_clusters", self.n_clusters)
        memory_mb = check_int("memory_mb", self.memory_mb)
        check_int("max_iter", self.max_iter)
        check_int("n_init", self.n_init)
        check_int("max_points_per_centroid", self.max_points_per_centroid)
        refine_iter = check_int("refine_iter", self.refine_iter, minimum=0)
        if self.batch_rows is not None:
            check_int("batch_rows", self.batch_rows)
        source = as_source(data)
        n, d = source.count(), source.dim()
        if k > n:
            raise InputError(f"k={k} is larger than the number of images ({n})")
        plan = plan_memory(n, d, k, memory_mb, int(self.max_points_per_centroid), self.batch_rows)
        self.plan_ = plan
        source.batch_rows = plan.batch_rows
        timings: dict[str, float] = {}

        t0 = time.perf_counter()
        sample = source.subset(plan.sample_rows, int(self.seed))
        timings["sample"] = time.perf_counter() - t0
        log.info("streaming k-means: k=%d over %d rows x %d dims; sample of %d rows, batches of %d (memory_mb=%d)",
                 k, n, d, len(sample), plan.batch_rows, memory_mb)

        t0 = time.perf_counter()
        params: dict[str, Any] = {"n_clusters": k, "max_iter": int(self.max_iter), "n_init": int(self.n_init),
                                  "seed": int(self.seed)}
        spec, res = op_backend("kmeans", self.backend, params, without_torch=True)
        if spec.name.startswith("faiss"):
            params["init_sample"] = min(plan.seed_rows, len(sample))
        est = spec.factory(**params)
        est.fit(sample)
        self.resolution_ = res.as_dict()
        self.resolution_["requested"] = self.backend
        centers = np.asarray(est.cluster_centers_, dtype=np.float32)
        self.sample_inertia_ = float(est.inertia_)
        del sample, est
        timings["fit_sample"] = time.perf_counter() - t0

        source.gpu = res.kind == "gpu"
        labels_out = None
        if labels_path is not None:
            labels_out = np.lib.format.open_memmap(Path(labels_path), mode="w+", dtype=np.int64, shape=(n,))
        result = lloyd(source, k, init_centroids=centers, max_iter=refine_iter, tol=0.0, labels_out=labels_out)
        timings["refine"] = sum(s.seconds for s in result.history)
        timings["assign"] = result.assign_seconds
        if assignments_path is not None:
            t0 = time.perf_counter()
            write_assignments(source, result.labels, Path(assignments_path))
            timings["assign"] += time.perf_counter() - t0

        self.cluster_centers_ = result.centroids
        self.labels_ = result.labels
        self.inertia_ = result.inertia
        self.pass_objectives_ = [s.objective for s in result.history] + [result.inertia]
        self.counts_ = result.counts
        self.n_iter_ = int(self.max_iter) + result.n_iter
        self.n_samples_ = n
        self.timings_ = {key: round(v, 3) for key, v in timings.items()}
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Nearest final centre for each row of ``X`` (m, d) -> (m,)."""
        return NearestCentre(self.cluster_centers_)(as_float32_matrix(X))[0]


def write_assignments(source: ArraySource | StoreSource, labels: np.ndarray, path: Path) -> None:
    """Parquet of ``image_id, label`` (int32) in the source's row order, one row group per batch,
    written to a temporary name and renamed at the end (nothing is left behind on failure)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([pa.field("image_id", pa.string()), pa.field("label", pa.int32())])
    start = 0
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for ids in source.iter_ids():
            lab = np.asarray(labels[start:start + len(ids)], dtype=np.int32)
            start += len(ids)
            writer.write_table(pa.table({"image_id": ids, "label": pa.array(lab)}, schema=schema))
