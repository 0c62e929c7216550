"""The GPU paths' CPU-side decisions, checked without a GPU: when k-means may run as cuML on Dask
and why not, the environment dask-cuda workers get, the precision picked for a device capability,
the JPEG decoder's CPU fallback, and cutting a GPU merge tree without merge heights."""

from __future__ import annotations

import importlib.util
import logging
import os

import numpy as np
import pytest

from gpu_ops import distributed as gd


def _status(device: str | None, usable: bool = True, reason: str = "ok") -> dict:
    return {"usable": usable, "reason": reason, "host": "node1", "device": device}


# ------------------------------------------------------------------------------------------
# cuML on Dask: taken only when every worker has cuML, raft-dask and a GPU of its own


def test_cuml_dask_route_needs_a_device_per_worker():
    ok, why = gd.cuml_dask_route({"tcp://a:1": _status("node1/0000:3B:00.0"), "tcp://a:2": _status("node1/0000:5E:00.0")})
    assert ok, why
    assert why == "2 worker(s), each with its own GPU"
    # a LocalCluster whose two workers both see GPU 0: NCCL would refuse two ranks on one device
    ok, why = gd.cuml_dask_route({"tcp://a:1": _status("node1/0000:3B:00.0"), "tcp://a:2": _status("node1/0000:3B:00.0")})
    assert not ok
    assert why.startswith("2 workers share the GPU node1/0000:3B:00.0 (tcp://a:1, tcp://a:2)")
    # the same bus id on two hosts is two devices
    ok, _ = gd.cuml_dask_route({"tcp://a:1": {**_status("node1/0000:3B:00.0")},
                                "tcp://b:1": {**_status("node2/0000:3B:00.0"), "host": "node2"}})
    assert ok
    ok, why = gd.cuml_dask_route({"tcp://a:1": _status(None, False, "raft_dask not importable on node1 (...)"),
                                  "tcp://a:2": _status("node1/0000:5E:00.0")})
    assert not ok and why == "worker tcp://a:1: raft_dask not importable on node1 (...)"


def _first_missing_module() -> str:
    for module in gd.CUML_DASK_MODULES:
        try:
            if importlib.util.find_spec(module) is None:
                return module
        except ModuleNotFoundError:  # a parent package (cuml) is missing
            return module
    pytest.skip("every cuML-on-Dask package is installed here")


def test_dask_kmeans_logs_why_cuml_was_not_used(tmp_path, caplog):
    """The worker probe names the first package it cannot import (raft_dask is checked on its
    own, never hidden behind cuML's import), and the CPU route logs and records that reason."""
    from distributed import LocalCluster

    from gpu_ops.cluster.synthetic import write_blob_store

    missing = _first_missing_module()
    status = gd.cuml_dask_worker_status()
    assert not status["usable"]
    assert status["reason"].startswith(f"{missing} not importable on ")
    assert "raft_dask" in gd.CUML_DASK_MODULES

    write_blob_store(tmp_path / "store", 3000, 8, n_centers=5, seed=0, shard_rows=1000)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            caplog.at_level(logging.INFO, logger="gpu_ops.distributed"):
        result = gd.dask_kmeans(cluster.scheduler_address, tmp_path / "store", 5, n_init=1, seed=0, backend="gpu")
    assert result["kind"] == "cpu" and result["backend"].startswith("dask-lloyd+")
    assert result["fallback"].startswith("worker inproc://") and f": {missing} not importable on " in result["fallback"]
    assert result["fallback"].endswith("(and 1 more worker(s))")
    assert result["reason"].startswith(f"cuml-dask not used: {result['fallback']}: initial fit with ")
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(result["fallback"] in m and "CPU Lloyd" in m for m in warned), caplog.text


# ------------------------------------------------------------------------------------------
# dask-cuda: the workers' environment survives LocalCUDACluster's own env


def test_dask_cuda_workers_keep_the_run_environment(monkeypatch):
    """dask-cuda's ``LocalCUDACluster.new_worker_spec`` replaces each worker's ``env`` option with
    ``{"CUDA_VISIBLE_DEVICES": ...}``. A LocalCluster that does the same stands in for it here:
    PREFECT_API_URL and the logging level must still reach its worker processes."""
    from distributed import Client, LocalCluster

    class EnvReplacingCluster(LocalCluster):
        def new_worker_spec(self):  # what dask-cuda does to every worker spec
            spec = super().new_worker_spec()
            for worker in spec.values():
                worker["options"].update({"env": {"CUDA_VISIBLE_DEVICES": "0"}})
            return spec

    env = {"PREFECT_API_URL": "http://10.0.0.2:4200/api", "PREFECT_LOGGING_LEVEL": "DEBUG"}
    monkeypatch.delenv("PREFECT_API_URL", raising=False)  # workers must get them from the cluster, not inherit them
    monkeypatch.delenv("PREFECT_LOGGING_LEVEL", raising=False)
    kwargs = gd.cluster_kwargs("dask-cuda", env=env)
    assert "env" not in kwargs  # LocalCUDACluster would drop it
    assert gd.worker_env_config("dask-cuda", env) == {"distributed.nanny.environ": env}
    assert gd.worker_env_config("dask", env) == {}  # LocalCluster takes env itself

    import dask

    with dask.config.set(gd.worker_env_config("dask-cuda", env)), \
            EnvReplacingCluster(**kwargs, n_workers=0, processes=True, dashboard_address=None) as cluster, \
            Client(cluster, set_as_default=False) as client:
        cluster.scale(1)  # as LocalCUDACluster does: its workers come from new_worker_spec
        client.wait_for_workers(1)
        seen = client.run(lambda: {k: os.environ.get(k) for k in ("PREFECT_API_URL", "PREFECT_LOGGING_LEVEL",
                                                                   "CUDA_VISIBLE_DEVICES")})
    assert list(seen.values()) == [{**env, "CUDA_VISIBLE_DEVICES": "0"}]
