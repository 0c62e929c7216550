"""Prefect tasks: each makes one call into gpu_ops; caching, retries and artifacts live here."""

from __future__ import annotations

import time
import uuid
from typing import Any

from prefect import task
from pathlib import Path

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import INPUTS, TASK_SOURCE, CacheKeyFnPolicy
from prefect.context import TaskRunContext

from prefect import get_run_logger

from flows import stopping
from gpu_ops import pipeline
from gpu_ops.config import RunConfig
from gpu_ops.device import Machine
from gpu_ops.distributed import device_label
from gpu_ops.errors import InputError
from gpu_ops.explore.stage import ExploreResult
from gpu_ops.stages import AlgorithmMetrics, ClusterResult, Evaluation, MapResult, StoreRef

#: Tag of tasks that run on a GPU; `prefect concurrency-limit create gpu 1` lets one at a time
#: hold the card, across every run that talks to the same Prefect server.
GPU_TAG = "gpu"


def _dataset_content_key(_ctx: TaskRunContext, inputs: dict[str, Any]) -> str:
    """Cache key part that changes when the data on disk changes (same spec, new files): the stage
    then runs again, and for an image folder that refresh embeds only the new and changed images
    into the folder's one store. A cached result is reused only while its store is still at the
    revision it saw (:func:`gpu_ops.store.cached_store_ok`)."""
    try:
        return pipeline.dataset_fingerprint(inputs["params"])
    except Exception:  # noqa: BLE001 - unreadable input: never reuse a cached result
        return uuid.uuid4().hex


def retry_unless_bad_input(_task: Any, _run: Any, state: Any) -> bool:
    """Retry transient I/O failures only; bad input, or a run being stopped, fails at once."""
    return stopping.requested() is None and not isinstance(state.result(raise_on_failure=False), InputError)


@task(
    name="extract",
    cache_policy=INPUTS + TASK_SOURCE + CacheKeyFnPolicy(cache_key_fn=_dataset_content_key),
    persist_result=True,
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=retry_unless_bad_input,
)
def extract_features(params: dict[str, Any]) -> StoreRef:
    """Embed the dataset into the Parquet store; progress shown as a Prefect progress artifact."""
    artifact_id = create_progress_artifact(progress=0.0, key="extract-progress",
                                           description=f"{params['extractor']} features of {params['dataset']}")

    def on_shard(done: int, total: int) -> None:
        update_progress_artifact(artifact_id=artifact_id, progress=100.0 * done / max(total, 1))

    get_run_logger().info("extract: %s features of %s on %s", params["extractor"], params["dataset"],
                          device_label(params["device"]))
    ref = pipeline.extract_stage(params, on_shard=on_shard)
    get_run_logger().info("extract: %d item(s) embedded now, %d row(s) in store %s", ref.extracted, ref.rows, ref.store)
    return ref


def _log_backends(stage: str, result: ClusterResult | MapResult) -> None:
    """Which backend ran and on which device (GPU backends: the CUDA device this process uses)."""
    gpu = any(r.kind == "gpu" for r in result.resolutions)
    get_run_logger().info("%s: backend %s on %s", stage, result.backend, device_label("cuda" if gpu else "cpu"))


@task(name="cluster")
def cluster(store: str, config: RunConfig, algorithm: str, staging: str) -> ClusterResult:
    """One clustering algorithm over the store."""
    result = pipeline.cluster_stage(store, config, algorithm, staging)
    _log_backends(f"cluster {algorithm}", result)
    return result


@task(name="cluster-dask")
def cluster_on_dask(store: str, config: RunConfig, algorithm: str, staging: str, address: str) -> ClusterResult:
    """One clustering algorithm over a store whose parts are loaded by the Dask cluster's workers
    (k-means: distributed Lloyd or cuML's Dask KMeans; other algorithms gather to this process)."""
    from gpu_ops.distributed import cluster_stage_dask

    result = cluster_stage_dask(store, config, algorithm, staging, address)
    _log_backends(f"cluster {algorithm} (Dask cluster {address})", result)
    return result


@task(name="reduce")
def reduce_to_2d(store: str, config: RunConfig, staging: str) -> MapResult:
    """The 2-D map."""
    result = pipeline.reduce_stage(store, config, staging)
    _log_backends(f"reduce {config.reducer}", result)
    return result


@task(name="evaluate")
def evaluate(store: str, clusters: list[ClusterResult]) -> Evaluation:
    """Metrics per algorithm, published as a table artifact keyed so runs form a history."""
    started = time.perf_counter()
    metrics = pipeline.evaluate_stage(store, clusters)
    rows = [{"algorithm": name, **{k: (round(v, 4) if isinstance(v, float) else "; ".join(v) if k == "degenerate" else v)
                                   for k, v in m.as_json().items() if k != "cluster_sizes"}}
            for name, m in metrics.items()]
    create_table_artifact(table=rows, key="cluster-metrics", description="Clustering quality per algorithm")
    return Evaluation(metrics=metrics, seconds=round(time.perf_counter() - started, 3))


@task(name="explore")
def explore(store: str, config: RunConfig, staging: str, clusters: list[ClusterResult]) -> ExploreResult:
    """Duplicates, outlier scores and quality flags (duplicates.parquet, outliers.parquet)."""
    from gpu_ops.explore.stage import explore_stage

    result = explore_stage(store, config, staging, clusters)
    get_run_logger().info("explore: %d duplicate group(s), flagged %s; knn on %s", result.groups, result.flagged,
                          ", ".join(result.backends) or "-")
    return result


@task(name="write-run")
def write_run(config: RunConfig, store: StoreRef, clusters: list[ClusterResult], reduced: MapResult,
              metrics: dict[str, AlgorithmMetrics], staging: str, timings: dict[str, float],
              explored: ExploreResult | None = None) -> dict[str, Any]:
    """The run directory's files (assignments, map, metrics, figures, config)."""
    return pipeline.finalize_run(config, store, clusters, reduced, metrics, staging, timings, explored)


@task(name="report")
def build_report(staging: str, run_dir: str) -> dict[str, Any]:
    """report.html and its figures; a markdown artifact summarises the run and links the report
    (``seconds``: the stage's time)."""
    from gpu_ops.report import build_report as build, summary_markdown

    started = time.perf_counter()
    result = build(Path(staging), shown_as=Path(run_dir))
    markdown = summary_markdown(Path(staging), result).replace(str(Path(staging)), str(Path(run_dir)))
    create_markdown_artifact(markdown=markdown, key="run-report", description="Run summary and figures")
    return {"html": str(Path(run_dir) / result.html.name), "missing": [str(m) for m in result.missing],
            "seconds": round(time.perf_counter() - started, 3)}


def uses_gpu(config: RunConfig, stage: str, machine: Machine | None = None) -> bool:
    """True when ``stage`` (``extract``, an algorithm or a reducer) of this run is placed on a GPU
    here (or on a described ``machine``): the task then carries the ``gpu`` tag."""
    from gpu_ops.placement import placement_for

    try:
        return placement_for(config, stage, machine).kind == "gpu"
    except InputError:
        return False  # nothing to place (reducer none), or a bad setting the stage itself reports


def configured(task_: Any, config: RunConfig, stage: str, gpu: bool = False) -> Any:
    """``task_`` with this run's time limit for ``stage`` (``config.timeouts``) and, when it will
    run on a GPU, the ``gpu`` tag that a Prefect tag concurrency limit holds to one at a time."""
    tags = set(task_.tags) | ({GPU_TAG} if gpu else set())
    return task_.with_options(timeout_seconds=getattr(config.timeouts, stage), tags=tags)
