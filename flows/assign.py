"""Reusing a finished run: the task that equips every run for ``similar`` and ``assign``, and the
``assign-images`` flow (embed new images with the run's extractor -> assign them -> write the file)."""

# No `from __future__ import annotations`: see flows/pipeline.py (flows served in spawned processes).
from typing import Any

from prefect import flow, task

from flows import stopping
from flows.tasks import retry_unless_bad_input
from gpu_ops.config import RunConfig
from gpu_ops.explore import assign


@task(name="save-for-reuse")
def save_for_reuse(staging: str, config: RunConfig, store: str) -> dict[str, Any]:
    """The similar-image index, how the run embedded its images, and each algorithm's model with
    its novelty threshold, into the run's staging directory."""
    return assign.save_for_reuse(staging, config, store)


@task(name="embed-new", retries=2, retry_delay_seconds=5, retry_condition_fn=retry_unless_bad_input)
def embed_new(run_dir: str, dataset: str, split: str, limit: int | None) -> str:
    """Embed the new images with the run's extractor into a store in the cache (reused by a rerun)."""
    return assign.embed_new(run_dir, dataset, split, limit)


@task(name="assign")
def assign_new(run_dir: str, store: str, dataset: str, split: str, limit: int | None, out: str) -> dict[str, Any]:
    """Predict every algorithm's cluster, distance and novelty; write the assignment file whole."""
    return assign.assign_new(run_dir, store, dataset, split, limit, out)


@flow(name="assign-images")
def assign_images(run_dir: str, dataset: str, split: str = "all", limit: int | None = None,
                  out: str | None = None) -> dict[str, Any]:
    """Assign a dataset of new images to the clusters of the finished run ``run_dir``."""
    stopping.reclaim_sigterm()
    assign.open_run(run_dir)
    target = str(assign.check_out_file(out or assign.default_out(dataset)))
    store = embed_new(run_dir, dataset, split, limit)
    return assign_new(run_dir, store, dataset, split, limit, target)
