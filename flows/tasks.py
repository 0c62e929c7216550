"""Prefect tasks: each makes one call into gpu_ops; caching, retries and artifacts live here."""

from __future__ import annotations

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

from gpu_ops import pipeline
from gpu_ops.config import RunConfig
from gpu_ops.errors import InputError


def _dataset_content_key(_ctx: TaskRunContext, inputs: dict[str, Any]) -> str:
    """Cache key part that changes when the data on disk changes (same spec, new files)."""
    try:
        return pipeline.dataset_fingerprint(inputs["params"])
    except Exception:  # noqa: BLE001 - unreadable input: never reuse a cached result
        return uuid.uuid4().hex


def _retry_unless_bad_input(_task: Any, _run: Any, state: Any) -> bool:
    """Retry transient I/O failures only; bad input fails at once."""
    return not isinstance(state.result(raise_on_failure=False), InputError)


@task(
    name="extract",
    cache_policy=INPUTS + TASK_SOURCE + CacheKeyFnPolicy(cache_key_fn=_dataset_content_key),
    persist_result=True,
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=_retry_unless_bad_input,
)
def extract_features(params: dict[str, Any]) -> dict[str, Any]:
    """Embed the dataset into the Parquet store; progress shown as a Prefect progress artifact."""
    artifact_id = create_progress_artifact(progress=0.0, key="extract-progress",
                                           description=f"{params['extractor']} features of {params['dataset']}")

    def on_shard(done: int, total: int) -> None:
        update_progress_artifact(artifact_id=artifact_id, progress=100.0 * done / max(total, 1))

    return pipeline.extract_stage(params, on_shard=on_shard)


@task(name="cluster")
def cluster(store: str, config: RunConfig, algorithm: str, staging: str) -> dict[str, Any]:
    """One clustering algorithm over the store."""
    return pipeline.cluster_stage(store, config, algorithm, staging)


@task(name="reduce")
def reduce_to_2d(store: str, config: RunConfig, staging: str) -> dict[str, Any]:
    """The 2-D map."""
    return pipeline.reduce_stage(store, config, staging)


@task(name="evaluate")
def evaluate(store: str, clusters: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Metrics per algorithm, published as a table artifact keyed so runs form a history."""
    metrics = pipeline.evaluate_stage(store, clusters)
    rows = [{"algorithm": name, **{k: (round(v, 4) if isinstance(v, float) else v)
                                   for k, v in m.items() if k != "cluster_sizes"}} for name, m in metrics.items()]
    create_table_artifact(table=rows, key="cluster-metrics", description="Clustering quality per algorithm")
    return metrics


@task(name="write-run")
def write_run(config: RunConfig, store: dict[str, Any], clusters: list[dict[str, Any]], reduced: dict[str, Any],
              metrics: dict[str, dict[str, Any]], staging: str, timings: dict[str, float]) -> dict[str, Any]:
    """The run directory's files (assignments, map, metrics, figures, config)."""
    return pipeline.finalize_run(config, store, clusters, reduced, metrics, staging, timings)


@task(name="report")
def build_report(staging: str, run_dir: str) -> dict[str, Any]:
    """report.html and its figures; a markdown artifact summarises the run and links the report."""
    from gpu_ops.report import build_report as build, summary_markdown

    result = build(Path(staging))
    markdown = summary_markdown(Path(staging), result).replace(str(Path(staging)), str(Path(run_dir)))
    create_markdown_artifact(markdown=markdown, key="run-report", description="Run summary and figures")
    return {"html": str(Path(run_dir) / result.html.name), "missing": [str(m) for m in result.missing]}
