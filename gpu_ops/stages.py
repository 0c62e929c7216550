"""What the pipeline's stages hand each other: typed results, and the two rules every cluster path shares.

The stage functions (:mod:`gpu_ops.pipeline`, :func:`gpu_ops.distributed.cluster_stage_dask`) return
these pydantic models; Prefect tasks pass and persist them as they are. Every cluster path, whatever
runs it (in memory, streamed from the store, on a Dask cluster, deep clustering in torch), ends in
:func:`write_cluster_result` and chooses ``k=auto`` with :func:`k_for`.

This module sits below :mod:`gpu_ops.pipeline` (which imports extraction and the report) so that
:mod:`gpu_ops.distributed` can use it without importing the whole pipeline.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from gpu_ops.registry import Resolution
from gpu_ops.rundir import RunDir

log = logging.getLogger(__name__)

#: ``k=auto`` runs its sweep on at most this many rows (a uniform sample of larger stores).
K_AUTO_SAMPLE_ROWS = 20_000


class StageModel(BaseModel):
    """Stage results are values: immutable, and unknown fields are an error."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class StoreRef(StageModel):
    """The extract stage's result: a finished embedding store and how it was made."""

    store: str  #: the store directory
    rows: int
    dim: int
    quarantined: int  #: items that could not be read (listed in the store)
    device: str  #: torch device(s) that embedded it (``cpu+cuda`` when Dask workers differed)
    extractor: str
    seconds: float
    shard_rows: int | None = None  #: sharded (Dask) extraction: rows per shard
    writers: list[str] | None = None  #: sharded extraction: the worker processes that wrote shards
    revision: str | None = None  #: a store refreshed in place: the run that last changed it
    extracted: int | None = None  #: items this run read (embedded or quarantined); the rest were stored already


class ResolutionRecord(StageModel):
    """Which backend ran one op of a stage, and why (one entry of metrics.json's ``backends``)."""

    op: str
    requested: str
    backend: str
    kind: Literal["gpu", "cpu"]
    reason: str
    fallbacks: list[str] = []
    skipped: list[str] = []
    stage: str  #: the algorithm, or ``map`` for the 2-D map

    @classmethod
    def of(cls, resolution: Resolution, stage: str) -> ResolutionRecord:
        """The record of a registry :class:`~gpu_ops.registry.Resolution` made for ``stage``."""
        return cls(**resolution.as_dict(), stage=stage)


class StreamingStats(StageModel):
    """How the streaming k-means spent its memory budget (``memory_mb`` runs)."""

    memory_mb: int
    sample_rows: int
    seed_rows: int
    batch_rows: int
    timings_s: dict[str, float]
    inertia: float


class ClusterResult(StageModel):
    """One algorithm's clustering of the store, its labels in the run directory."""

    algorithm: str
    labels: str  #: :meth:`RunDir.labels`: int64, one label per store row, -1 for noise
    k: int
    backend: str  #: the backend of the clustering op itself (the last resolution)
    resolutions: list[ResolutionRecord]
    seconds: float
    linkage: str | None = None  #: :meth:`RunDir.linkage` of hierarchical algorithms
    streaming: StreamingStats | None = None
    inertia: float | None = None
    n_iter: int | None = None
    #: metrics.json's ``degenerate`` (see :class:`gpu_ops.report.metrics_doc.AlgorithmMetrics`)
    degenerate: list[str] | None = None

    def load_labels(self) -> np.ndarray:
        return np.load(self.labels)


class MapResult(StageModel):
    """The reduce stage's 2-D map (``path`` None when the run has none: reducer ``none``)."""

    path: str | None
    backend: str | None
    resolutions: list[ResolutionRecord]
    seconds: float
    #: :class:`gpu_ops.reduce.sampled.MapPlan` as a dict: rows, rows fitted, how the rest were placed
    plan: dict[str, Any] | None = None


class AlgorithmMetrics(StageModel):
    """metrics.json's entry for one algorithm; quality scores only when the store has labels."""

    acc: float | None = None
    nmi: float | None = None
    ari: float | None = None
    k: int
    backend: str
    cluster_sizes: list[int]
    noise: int | None = None  #: rows labelled -1 (HDBSCAN), when there are any
    #: see :class:`gpu_ops.report.metrics_doc.AlgorithmMetrics`
    degenerate: list[str] | None = None

    def as_json(self) -> dict[str, Any]:
        """The entry as metrics.json holds it (absent scores and noise left out)."""
        return self.model_dump(exclude_none=True)


class Evaluation(StageModel):
    """The evaluate stage: each algorithm's metrics, and how long the stage took."""

    metrics: dict[str, AlgorithmMetrics]
    seconds: float


#: Share of ``memory_mb`` one streamed batch of rows may take (its Arrow and float32 copies).
BATCH_FRACTION = 0.10
#: Rows per streamed batch when the run sets no ``memory_mb``.
DEFAULT_BATCH_ROWS = 65_536



def batch_rows_for(memory_mb: int | None, d: int) -> int:
    """Rows per batch a stage streams from the store: :data:`BATCH_FRACTION` of ``memory_mb``
    (each row: its Arrow and float32 copies, ``8 d`` bytes, plus ids and per-row results), between
    1 024 and 1 048 576; :data:`DEFAULT_BATCH_ROWS` without a budget."""
    if memory_mb is None:
        return DEFAULT_BATCH_ROWS
    return max(1024, min(1 << 20, int(BATCH_FRACTION * memory_mb * 2**20 // (8 * d + 96))))


def write_cluster_result(run: RunDir, algorithm: str, *, k: int, resolutions: list[ResolutionRecord],
                         started: float, labels: np.ndarray | None = None, linkage: np.ndarray | None = None,
                         **extras: Any) -> ClusterResult:
    """Write one algorithm's labels (and linkage matrix) into the run directory; return its result.

    ``labels`` None: the caller has already written them to ``run.labels(algorithm)`` (the
    streaming k-means memory-maps them there). ``started``: ``time.perf_counter()`` at the
    stage's start. ``extras``: :class:`ClusterResult`'s optional fields (streaming, inertia, n_iter,
    degenerate).
    """
    path = run.labels(algorithm)
    if labels is not None:
        np.save(path, np.asarray(labels).astype(np.int64, copy=False))
    elif not path.is_file():
        raise FileNotFoundError(f"{path}: the labels of {algorithm} were not written")
    linkage_path = None
    if linkage is not None:
        linkage_path = str(run.linkage(algorithm))
        np.save(linkage_path, linkage)
    return ClusterResult(algorithm=algorithm, labels=str(path), k=int(k), backend=resolutions[-1].backend,
                         resolutions=resolutions, seconds=round(time.perf_counter() - started, 3),
                         linkage=linkage_path, **extras)


def k_for(cfg: Any, data: Any, run: RunDir) -> int:
    """The run's k: ``cfg.k``, or for ``k=auto`` the label-free choice over ``cfg.k_range``
    (:func:`~gpu_ops.cluster.choose_k.choose_k`: the highest modularity of graph-merged micro-clusters).

    ``data``: the embeddings (an array), a store directory, or a k-means source
    (:class:`~gpu_ops.cluster.sources.StoreSource`, ...). ``k=auto`` is chosen once per run (saved
    as ``k_selection.json`` and read back by every later algorithm) on at most
    :data:`K_AUTO_SAMPLE_ROWS` rows, the same rows whichever form ``data`` takes.
    """
    if cfg.k != "auto":
        return int(cfg.k)
    saved = run.k_selection
    if saved.is_file():
        return int(json.loads(saved.read_text())["chosen_k"])
    from gpu_ops.cluster.choose_k import choose_k
    from gpu_ops.cluster.sources import as_source
    from gpu_ops.store import atomic_write_json

    source = data if hasattr(data, "subset") else as_source(data)
    n = source.count()
    rows = min(n, K_AUTO_SAMPLE_ROWS)
    sample = data if rows == n and isinstance(data, np.ndarray) else source.subset(rows, int(cfg.seed))
    selection = choose_k(sample, *cfg.k_range, backend=cfg.backend_for("kmeans"), seed=cfg.seed)
    atomic_write_json(saved, selection.as_dict())
    log.info("k=auto chose k=%d (%s on %d of %d rows); elbow at k=%d", selection.chosen_k, selection.method, rows, n,
             selection.elbow_k)
    return selection.chosen_k


def k_selection_summary(run: RunDir) -> dict[str, Any] | None:
    """metrics.json's ``k_selection``: the chosen k, the score that chose it and its curve over k
    (None when the run's k was given)."""
    if not run.k_selection.is_file():
        return None
    sel = json.loads(run.k_selection.read_text())
    method = sel.get("method", "silhouette")
    curve = sel.get({"elbow": "inertia"}.get(method, method)) or []
    return {"chosen_k": sel["chosen_k"], "method": method, "ks": sel["ks"], "score": curve,
            "elbow_k": sel.get("elbow_k"), "rows": sel.get("n_fit")}
