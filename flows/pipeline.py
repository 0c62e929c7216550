"""The ``cluster-images`` flow: extract -> cluster -> reduce -> evaluate -> write the run -> report."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from prefect import flow

from flows.tasks import build_report, cluster, evaluate, extract_features, reduce_to_2d, write_run
from gpu_ops import pipeline
from gpu_ops.config import RunConfig
from gpu_ops.rundir import commit_run, default_run_dir, start_run


@flow(name="cluster-images")
def cluster_images(config: RunConfig = RunConfig()) -> dict[str, Any]:
    """Cluster a dataset and write ``config.out`` (metrics.json's content is returned)."""
    out = Path(config.out or default_run_dir(config.dataset))
    staging = start_run(out)
    try:
        t0 = time.perf_counter()
        store = extract_features(pipeline.extract_params(config))
        timings = {"extract": round(time.perf_counter() - t0, 3)}
        clusters = []
        for algorithm in config.algorithms:
            clusters.append(cluster(store["store"], config, algorithm, str(staging)))
            timings[f"cluster:{algorithm}"] = clusters[-1]["seconds"]
        reduced = reduce_to_2d(store["store"], config, str(staging))
        timings["reduce"] = reduced["seconds"]
        metrics = evaluate(store["store"], clusters)
        doc = write_run(config, store, clusters, reduced, metrics, str(staging), timings)
        report = build_report(str(staging), str(out.absolute()))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    commit_run(staging, out)
    return {**doc, "run_dir": str(out.absolute()), "report": report["html"]}
