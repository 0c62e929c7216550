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


# ------------------------------------------------------------------------------------------
# JPEG decoding: the batched call, and the one-by-one CPU fallback that finds a corrupt file


def test_jpeg_batches_decode_in_one_call_and_a_corrupt_file_falls_back_one_by_one(cifar_folder, caplog):
    import torch
    from PIL import Image

    from gpu_ops.features.jpeg import DecodeCounts, decode_batch

    paths = sorted(cifar_folder.rglob("*.jpg"))[:12]
    raw = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in paths]
    expected = [torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1) for p in paths]

    counts = DecodeCounts()
    images, reasons = decode_batch(["jpeg"] * 12, raw, "cpu", counts)
    assert counts == DecodeCounts(batched=12)
    assert reasons == [""] * 12
    for img, ref in zip(images, expected):
        assert img.dtype == torch.uint8 and img.shape == ref.shape
        assert (img.int() - ref.int()).abs().max() <= 2  # libjpeg builds may round the IDCT differently

    corrupt = torch.frombuffer(bytearray(paths[0].read_bytes()[:200]), dtype=torch.uint8)  # cut mid-scan
    pixels = torch.zeros((5, 7, 3), dtype=torch.uint8)
    counts = DecodeCounts()
    with caplog.at_level(logging.WARNING, logger="gpu_ops.features.jpeg"):
        images, reasons = decode_batch(["jpeg", "jpeg", "pixels", "jpeg"], [raw[1], corrupt, pixels, raw[2]], "cpu",
                                       counts)
    assert counts == DecodeCounts(batched=0, one_by_one=2, failed=1, pixels=1)
    assert images[1] is None and reasons[1].startswith("cannot decode JPEG (")
    assert torch.equal(images[0], decode_batch(["jpeg"], [raw[1]], "cpu")[0][0])
    assert torch.equal(images[3], decode_batch(["jpeg"], [raw[2]], "cpu")[0][0])
    assert images[2].shape == (3, 5, 7)
    assert "batched JPEG decoding on cpu failed" in caplog.text and "decoding 3 JPEG(s) one by one" in caplog.text


# ------------------------------------------------------------------------------------------
# Mixed precision: bf16 only where the hardware has it, loss scaling in fp16


@pytest.mark.parametrize("capability, expected", [
    (None, "fp32"),  # the CPU
    ((6, 1), "fp16"),  # Pascal (P100/P40)
    ((7, 0), "fp16"),  # V100: torch.cuda.is_bf16_supported() says True here (emulated bf16)
    ((7, 5), "fp16"),  # T4
    ((8, 0), "bf16"),  # A100
    ((8, 9), "bf16"),  # L4 / L40
    ((9, 0), "bf16"),  # H100 / H200
    ((12, 0), "bf16"),
])
def test_precision_follows_the_compute_capability(capability, expected):
    from gpu_ops.device import precision_for

    assert precision_for(capability) == expected


def test_precision_of_cpu_work_is_fp32():
    import torch

    from gpu_ops.deep._common import Amp
    from gpu_ops.device import autocast_dtype, precision_for_device
    from gpu_ops.features import create_extractor

    assert precision_for_device("cpu") == precision_for_device(torch.device("cpu")) == "fp32"
    assert create_extractor("resnet18", weights="none", image_size=32).precision() == "fp32"
    amp = Amp(torch.device("cpu"))
    assert (amp.precision, amp.scaler) == ("fp32", None)
    assert (autocast_dtype("bf16"), autocast_dtype("fp16"), autocast_dtype("fp32")) == (torch.bfloat16, torch.float16,
                                                                                         None)


def test_fp16_training_scales_the_loss_and_skips_steps_that_overflow():
    """fp16 training steps through a GradScaler: gradients are scaled up (no underflow), and a
    step whose gradients overflow is skipped and the scale halved, instead of writing inf into
    the weights (run on the CPU, whose autocast also has fp16)."""
    import torch

    from gpu_ops.deep._common import Amp

    torch.manual_seed(0)
    model = torch.nn.Linear(16, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    amp = Amp(torch.device("cpu"), precision="fp16")
    assert amp.scaler is not None and amp.scaler.is_enabled()
    x = torch.randn(32, 16)
    with amp.autocast():
        out = model(x)
    assert out.dtype == torch.float16
    before = model.weight.detach().clone()
    scale = amp.scaler.get_scale()
    opt.zero_grad()
    amp.step(out.float().pow(2).mean(), opt)
    assert not torch.equal(model.weight, before) and torch.isfinite(model.weight).all()
    assert amp.scaler.get_scale() == scale  # no overflow: the scale holds

    before = model.weight.detach().clone()
    with amp.autocast():
        out = model(x)
    opt.zero_grad()
    amp.step(out.float().sum() * float("inf"), opt)
    assert torch.equal(model.weight, before)  # the overflowing step was skipped
    assert amp.scaler.get_scale() == scale / 2


# ------------------------------------------------------------------------------------------
# A GPU merge tree without heights is cut on its own (the GPU dendrogram check needs no CPU tree)


def test_cutting_a_merge_tree_without_heights_gives_the_flat_clustering():
    from sklearn.cluster import AgglomerativeClustering
    from sklearn.datasets import load_digits
    from sklearn.metrics import adjusted_rand_score

    from gpu_ops.cluster.agglomerative import cut_merge_tree
    from gpu_ops.errors import InputError

    X = load_digits().data.astype(np.float32)
    n = len(X)
    tree = AgglomerativeClustering(n_clusters=1, linkage="single", compute_full_tree=True).fit(X)
    for k in (2, 10, 40):
        flat = AgglomerativeClustering(n_clusters=k, linkage="single").fit(X).labels_
        cut = cut_merge_tree(tree.children_, n, k)
        assert cut.dtype == np.int64 and cut.shape == (n,) and len(np.unique(cut)) == k
        assert adjusted_rand_score(flat, cut) == 1.0
    assert cut_merge_tree(np.array([[0, 1], [2, 3]]), 3, 3).tolist() == [0, 1, 2]
    assert cut_merge_tree(np.array([[0, 2], [1, 3]]), 3, 2).tolist() == [0, 1, 0]
    with pytest.raises(InputError, match=r"children must have shape \(2, 2\) for 3 samples; got \(1, 2\)"):
        cut_merge_tree(np.array([[0, 1]]), 3, 2)
