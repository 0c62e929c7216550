"""The ``cluster-images`` flow: extract -> cluster -> reduce -> evaluate -> explore -> write the run -> report."""

# No `from __future__ import annotations` here: `flow.serve()` runs each flow run in a spawned
# process that receives the flow function by value (cloudpickle), and string annotations such as
# "RunConfig" cannot be resolved there ("Cluster_ImagesModel is not fully defined").
import shutil
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from prefect import flow

from flows import stopping
from flows.assign import save_for_reuse
from flows.scaleout import cluster_store, extract_store, scale_out
from flows.tasks import build_report, configured, evaluate, explore, reduce_to_2d, uses_gpu, write_run
from gpu_ops.config import RunConfig
from gpu_ops.pipeline import record_stage_time
from gpu_ops.rundir import check_out_dir, commit_run, default_run_dir, release_run_dir, start_run
from gpu_ops.store_lock import StoreReaders


@flow(name="cluster-images")
def cluster_images(config: RunConfig = RunConfig()) -> dict[str, Any]:
    """Cluster a dataset and write ``config.out`` (metrics.json's content is returned)."""
    stopping.reclaim_sigterm()
    out = config.out or default_run_dir(config.dataset)
    staging = None
    try:
        out = check_out_dir(out, config.dataset, config.cache_root())
        staging = start_run(out)
        with ExitStack() as reading:
            with scale_out(config) as dask_address:  # None: every stage in this process
                t0 = time.perf_counter()
                store = extract_store(config, dask_address)
                timings = {"extract": round(time.perf_counter() - t0, 3)}
                # every stage from here to the report reads the same rows: another run's refresh waits
                reading.enter_context(StoreReaders(Path(store.store)))
                clusters = []
                for algorithm in config.algorithms:
                    clusters.append(cluster_store(store.store, config, algorithm, str(staging), dask_address))
                    timings[f"cluster:{algorithm}"] = clusters[-1].seconds
            reduced = configured(reduce_to_2d, config, "reduce", gpu=uses_gpu(config, config.reducer))(
                store.store, config, str(staging))
            timings["reduce"] = reduced.seconds
            evaluation = configured(evaluate, config, "evaluate")(store.store, clusters)
            timings["evaluate"] = evaluation.seconds
            explored = configured(explore, config, "explore")(store.store, config, str(staging), clusters) \
                if config.explore else None
            if explored is not None:
                timings["explore"] = explored.seconds
            doc = configured(write_run, config, "write")(config, store, clusters, reduced, evaluation.metrics,
                                                         str(staging), timings, explored)
            configured(save_for_reuse, config, "write")(str(staging), config, store.store)
            report = configured(build_report, config, "report")(str(staging), str(out))
            doc = record_stage_time(str(staging), "report", report["seconds"])
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        if config.out is None:
            release_run_dir(out)
        raise
    commit_run(staging, out)
    stopping.ignore_from_now()  # the run is whole on disk: a late Ctrl-C must not report it as stopped
    return {**doc, "run_dir": str(out), "report": report["html"]}


@flow(name="extract-images")
def extract_images(config: RunConfig = RunConfig()) -> dict[str, Any]:
    """Only embed the dataset into its Parquet store (no clustering): e.g. a nightly refresh of a
    growing folder's features, sharded over a Dask cluster when ``config.task_runner`` says so.
    A later ``cluster-images`` run of the same data and extractor finds the store finished."""
    stopping.reclaim_sigterm()
    with scale_out(config) as dask_address:
        return extract_store(config, dask_address).model_dump()
