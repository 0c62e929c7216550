"""Scale-out orchestration: which Dask cluster a run uses, extraction sharded over its workers as
Prefect tasks (Prefect's DaskTaskRunner), and the stage helpers the flows call whichever way they run.

``config.task_runner.kind``:

- ``local`` (default): every stage runs in the flow's process (GPU stages tagged ``gpu``).
- ``dask``: a ``distributed.LocalCluster`` (``n_workers``, ``processes``) started for the run, or
  the running cluster at ``address``.
- ``dask-cuda``: a ``dask_cuda.LocalCUDACluster``, one worker per visible GPU.
- ``slurm`` / ``pbs``: a dask-jobqueue ``SLURMCluster`` / ``PBSCluster``; ``n_workers`` jobs,
  ``cluster_kwargs`` for queue, account, cores, memory, walltime, job_extra_directives.

One cluster lives for the whole run (:func:`scale_out`); the extraction subflow reaches it through
``DaskTaskRunner(address=...)`` and the k-means driver through a plain Dask client.

(Not ``flows/distributed.py``: Prefect puts an entrypoint's directory on ``sys.path``, and that
name would hide Dask's ``distributed`` package from every flow run a worker starts.)
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Iterator
from urllib.parse import urlparse

from prefect import flow, get_run_logger, task
from prefect.futures import wait

from flows.tasks import (
    cluster,
    cluster_on_dask,
    configured,
    extract_features,
    retry_unless_bad_input,
    uses_gpu,
)
from gpu_ops import distributed, pipeline
from gpu_ops.config import RunConfig
from gpu_ops.placement import place
from gpu_ops.stages import ClusterResult, StoreRef
from gpu_ops.store import cached_store_ok
from gpu_ops.store_lock import StoreLock, new_run_id


def _worker_env() -> dict[str, str]:
    """What Dask worker processes need to report their task runs to this run's Prefect API
    (in ephemeral mode the API is a temporary server in this process: workers get its URL)."""
    from prefect.client.orchestration import get_client

    env = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    with get_client(sync_client=True) as client:
        env["PREFECT_API_URL"] = str(client.api_url).rstrip("/")
    for name in ("PREFECT_API_KEY", "GPUCLUST_CACHE", "PYTHONPATH"):
        if os.environ.get(name):
            env[name] = os.environ[name]
    return env


@contextlib.contextmanager
def scale_out(config: RunConfig) -> Iterator[str | None]:
    """The scheduler address of this run's Dask cluster (None for ``local``): started here and
    closed on exit, or the running one at ``task_runner.address``."""
    tr = config.task_runner
    if tr.kind == "local":
        yield None
        return
    logger = get_run_logger()
    from prefect.settings import PREFECT_LOGGING_LEVEL

    if logging.getLevelName(str(PREFECT_LOGGING_LEVEL.value()).upper()) in (logging.WARNING, logging.ERROR):
        import distributed as _dask_distributed  # noqa: F401 - its import sets its loggers to INFO: first

        logging.getLogger("distributed").setLevel(logging.WARNING)  # Dask's start/stop chatter only with -v
    env = _worker_env()
    env["PREFECT_LOGGING_LEVEL"] = str(PREFECT_LOGGING_LEVEL.value())
    host = urlparse(env["PREFECT_API_URL"]).hostname
    if tr.kind in ("slurm", "pbs") and host in ("127.0.0.1", "localhost"):
        logger.warning("Prefect API %s is local to this machine: batch jobs on other nodes cannot reach it (jobs on "
                       "this node can); run against a `prefect server` they reach (PREFECT_API_URL)",
                       env["PREFECT_API_URL"])
    with distributed.dask_cluster(tr.kind, address=tr.address, n_workers=tr.n_workers,
                                  threads_per_worker=tr.threads_per_worker, processes=tr.processes, env=env,
                                  extra=tr.cluster_kwargs, log_directory=config.cache_root() / "jobs") as address:
        logger.info("task runner %s: Dask scheduler %s", tr.kind, address)
        yield address


# ------------------------------------------------------------------------------------------
# Extraction sharded over the cluster


@task(name="plan-shards")
def plan_shards(params: dict[str, Any], n_workers: int | None, address: str) -> dict[str, Any]:
    """The store's layout and its pending shards (runs in the flow's process)."""
    workers = n_workers or distributed.worker_count(address)
    return distributed.plan_shards(params, n_workers=max(1, workers))


@task(name="extract-shard", retries=2, retry_delay_seconds=5, retry_condition_fn=retry_unless_bad_input)
def extract_shard(params: dict[str, Any], store: str, shards: list[int], shard_rows: int, backend: str) -> dict[str, Any]:
    """Embed some shards on a Dask worker; the device is resolved on the worker itself."""
    device = place("extract", backend).torch_device
    get_run_logger().info("extract shards %s: %s on %s", shards, params["extractor"], distributed.device_label(device))
    return distributed.extract_shards(params, store, shards, shard_rows, device)


@task(name="merge-shards")
def merge_shards(store: str) -> dict[str, Any]:
    """Fold the workers' per-shard manifest entries into manifest.json; mark the store complete."""
    summary = distributed.merge_shards(store)
    return {"rows": summary.rows, "dim": summary.dim, "quarantined": summary.quarantined}


@flow(name="extract-on-dask")
def extract_on_dask(config: RunConfig, params: dict[str, Any], address: str) -> StoreRef:
    """One ``extract-shard`` task per pending shard on the Dask cluster; the store's manifest is
    merged here. An image folder's store is refreshed in place instead, its new and changed images
    embedded on the workers and written here (:func:`gpu_ops.distributed.refresh_on_dask`).
    Fails when the shards are not done within ``config.timeouts.extract``."""
    import time

    from flows import stopping

    stopping.reclaim_sigterm()

    t0 = time.perf_counter()
    if distributed.refreshes_in_place(params):
        done = distributed.refresh_on_dask(params, address, backend=config.backend_for("extract"),
                                           wait=config.wait_for_store, timeout=config.timeouts.extract)
        return StoreRef(store=done["store"], rows=done["rows"], dim=done["dim"], quarantined=done["quarantined"],
                        device="+".join(done["devices"] or [params["device"]]), extractor=params["extractor"],
                        shard_rows=done["shard_rows"], writers=done["writers"], revision=done["revision"],
                        extracted=done["items"], seconds=round(time.perf_counter() - t0, 3))
    # the driver is the store's one writer for the whole sharded extraction (workers write parts only)
    with StoreLock(distributed.sharded_store_directory(params), new_run_id(), wait=config.wait_for_store):
        plan = plan_shards(params, config.task_runner.n_workers, address)
        backend = config.backend_for("extract")
        futures = [extract_shard.submit(params, plan["store"], [s], plan["shard_rows"], backend)
                   for s in plan["pending"]]
        _, not_done = wait(futures, timeout=config.timeouts.extract)
        if not_done:
            raise TimeoutError(f"{len(not_done)} of {len(futures)} shard(s) unfinished after the extract stage's "
                               f"{config.timeouts.extract} s")
        results = [f.result() for f in futures]
        merged = merge_shards(plan["store"])
        devices = sorted({r["device"] for r in results}) or [params["device"]]
        writers = sorted({r["writer"] for r in results})
        get_run_logger().info("%d shard(s) written by %d worker process(es) on %s", len(results), len(writers),
                              ", ".join(sorted({r["device_label"] for r in results})) or "-")
        return StoreRef(store=str(plan["store"]), rows=merged["rows"], dim=merged["dim"],
                        quarantined=merged["quarantined"], device="+".join(devices), extractor=params["extractor"],
                        shard_rows=plan["shard_rows"], writers=writers, seconds=round(time.perf_counter() - t0, 3))


# ------------------------------------------------------------------------------------------
# Stage helpers: the same call whether the run is local or on a Dask cluster


def extract_store(config: RunConfig, address: str | None) -> StoreRef:
    """The extract stage: the cached ``extract`` task here, or sharded over the Dask cluster."""
    params = pipeline.extract_params(config)
    if address is not None and params["extractor"] == "autoencoder":
        get_run_logger().info("the autoencoder extractor trains on the whole dataset first: extracting in this "
                              "process, not on the Dask cluster")
        address = None
    if address is None:
        # params["device"] is the extract placement's torch device
        extract = configured(extract_features, config, "extract", gpu=params["device"] == "cuda")
        result = extract(params)
        if not cached_store_ok(result.store, result.revision):
            # a cached result whose store was deleted or altered since: a cache miss (the stage
            # verifies the store and re-extracts what it must)
            result = extract.with_options(refresh_cache=True)(params)
        return result
    from prefect_dask import DaskTaskRunner

    return extract_on_dask.with_options(task_runner=DaskTaskRunner(address=address))(config, params, address)


def cluster_store(store: str, config: RunConfig, algorithm: str, staging: str, address: str | None) -> ClusterResult:
    """One clustering algorithm: in this process, or driven from here over the Dask cluster."""
    if address is None:
        return configured(cluster, config, "cluster", gpu=uses_gpu(config, algorithm))(store, config, algorithm,
                                                                                        staging)
    return configured(cluster_on_dask, config, "cluster")(store, config, algorithm, staging, address)
