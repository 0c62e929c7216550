"""Deep clustering that does not depend on luck: a dead autoencoder start is detected and restarted,
a degenerate result is flagged (in the result and in metrics.json), the N2D start that DKM/DEC/IDEC
refine is chosen by a label-free score, and OpenMP threads sleep instead of spinning.

Small on purpose (1,000 MNIST test images or fewer, one or two short epochs).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, run_cli

from gpu_ops.deep import build_autoencoder, fit_deep
from gpu_ops.deep._common import degenerate_reasons, images_to_tensor
from gpu_ops.deep.autoencoder import (
    DEAD_CHECK_STEPS,
    DEAD_VARIANCE_RATIO,
    AutoencoderConfig,
    derived_seed,
    fit_autoencoder_tensor,
    reconstruction_probe,
)
from gpu_ops.deep.n2d import (
    Start,
    partition_silhouette,
    select_start,
)
from gpu_ops.report.metrics_doc import read_metrics

MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


@pytest.fixture(scope="module")
def mnist_1000():
    if not MNIST.is_dir():
        pytest.skip(f"MNIST not found at {MNIST}")
    from gpu_ops.data import load_dataset

    ds = load_dataset(f"idx:{MNIST}", "test")
    return np.asarray(ds.items)[:1000], np.asarray(ds.labels)[:1000]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_a_dead_autoencoder_is_detected_after_100_steps_and_restarted(mnist_1000, caplog):
    """Every decoder ReLU off: the output ignores the input; the check fires mid-epoch and the
    network is re-initialised with the derived seed, as the history records."""
    X = images_to_tensor(mnist_1000[0], image_size=16)  # 16 x 16: a quarter of the work
    torch.manual_seed(0)
    model = build_autoencoder("conv", X.shape[1:], 10)
    with torch.no_grad():
        model.fc_dec.bias.fill_(-100.0)
    cpu = torch.device("cpu")
    assert reconstruction_probe(model, X, cpu)["output_variance_ratio"] == 0.0
    cfg = AutoencoderConfig(arch="conv", epochs=2, batch_size=8, seed=5)  # 125 steps an epoch
    with caplog.at_level(logging.WARNING, logger="gpu_ops.deep"):
        hist = fit_autoencoder_tensor(model, X, cfg, cpu, progress=False)
    assert f"after {DEAD_CHECK_STEPS} steps" in caplog.text
    assert f"the network started dead; re-initialising with seed {derived_seed(5, 1)} (restart 1 of 3)" in caplog.text
    assert [h["phase"] for h in hist] == ["pretrain-restart", "pretrain", "pretrain"]
    dead = hist[0]
    assert dead["init_seed"] == 5 and dead["next_seed"] == derived_seed(5, 1) == 5 + 7919
    assert dead["check_step"] == DEAD_CHECK_STEPS and dead["output_variance_ratio"] < DEAD_VARIANCE_RATIO
    assert dead["probe_mse"] > dead["mean_image_mse"]  # a constant output is no better than the mean image
    first, last = hist[1], hist[2]
    assert first["restarts"] == 1 and first["init_seed"] == 5 + 7919
    assert first["output_variance_ratio"] >= DEAD_VARIANCE_RATIO  # the new network is alive
    assert [first["epoch"], last["epoch"]] == [1, 2] and last["loss"] < first["loss"]
    assert last["final_probe_mse"] < 0.9 * last["mean_image_mse"]
    assert degenerate_reasons(np.arange(1000) % 10, 10, hist) == []


def test_a_healthy_start_is_not_restarted(mnist_1000, caplog):
    X = images_to_tensor(mnist_1000[0][:500])
    torch.manual_seed(0)
    model = build_autoencoder("conv", X.shape[1:], 10)
    with caplog.at_level(logging.WARNING, logger="gpu_ops.deep"):
        hist = fit_autoencoder_tensor(model, X, AutoencoderConfig(arch="conv", epochs=1, batch_size=5, seed=0),
                                      torch.device("cpu"), progress=False)
    assert "started dead" not in caplog.text
    assert [h["phase"] for h in hist] == ["pretrain"] and hist[0]["restarts"] == 0 and hist[0]["init_seed"] == 0


def test_degenerate_partitions_are_described():
    labels = np.zeros(1000, dtype=np.int64)
    labels[:30] = 1
    labels[30:50] = 2
    reasons = degenerate_reasons(labels, 10)
    assert reasons == ["one cluster holds 95% of the images (more than 50% with k=10)", "7 of 10 clusters are empty"]
    assert degenerate_reasons(np.arange(1000) % 10, 10) == []
    assert degenerate_reasons(np.r_[np.zeros(80), np.ones(20)].astype(int), 2) == []  # 80% of two is allowed
    dead_ae = [{"phase": "pretrain", "epoch": 1, "loss": 0.101, "final_probe_mse": 0.1073,
                "mean_image_mse": 0.0673, "final_output_variance_ratio": 0.0}]
    assert degenerate_reasons(np.arange(1000) % 10, 10, dead_ae) == [
        "the autoencoder's reconstructions do not depend on the input (they vary 0.00000 as much as the images)"]
    idle_ae = [{**dead_ae[0], "final_output_variance_ratio": 0.3, "final_probe_mse": 0.065}]
    assert degenerate_reasons(np.arange(1000) % 10, 10, idle_ae) == [
        "the autoencoder never reconstructed much better than the mean image (MSE 0.0650, mean image 0.0673)"]


def test_start_selection_keeps_the_best_silhouette():
    """Three clean blobs: the right partition against one that merges two blobs and splits the third."""
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    truth = np.repeat(np.arange(3), 200)
    manifold = (centres[truth] + rng.normal(scale=0.5, size=(600, 2))).astype(np.float32)
    wrong = np.where(truth == 1, 0, truth)
    wrong[400:500] = 1  # half of blob 2 becomes its own cluster
    good_score = partition_silhouette(manifold, truth)
    bad_score = partition_silhouette(manifold, wrong)
    assert good_score > 0.8 and bad_score < good_score - 0.2
    starts = [Start(seed=s, labels=lab, manifold=manifold, silhouette=partition_silhouette(manifold, lab), info={})
              for s, lab in ((0, wrong), (1000, truth), (2000, wrong))]
    assert select_start(starts) == 1
    assert starts[1].record() == {"seed": 1000, "silhouette": good_score, "agreement": None}
    assert partition_silhouette(manifold, np.zeros(600, dtype=np.int64)) == -1.0  # one cluster: nothing separated


def test_idec_starts_from_the_n2d_start_with_the_best_score(mnist_1000):
    """Every N2D start is in the history with its label-free score; IDEC refines the chosen one."""
    images, labels = mnist_1000[0][:400], mnist_1000[1][:400]
    res = fit_deep("idec", images, 10, seed=0, device="cpu", labels=labels, pretrain_epochs=2, n2d_starts=3,
                   dec_max_iter=5, update_interval=5, progress=False)
    starts = [h for h in res.history if h["phase"] == "n2d-start"]
    assert [h["seed"] for h in starts] == [0, 1000, 2000]
    assert [h["chosen"] for h in starts].count(True) == 1
    chosen = next(h for h in starts if h["chosen"])
    assert chosen["silhouette"] == max(h["silhouette"] for h in starts)
    assert all(-1.0 <= h["silhouette"] <= 1.0 and -1.0 <= h["agreement"] <= 1.0 for h in starts)
    init = next(h for h in res.history if h["phase"] == "manifold-init")
    assert init["acc"] == chosen["acc"]  # IDEC started from the chosen partition
    assert res.info["init"]["chosen_start"] == starts.index(chosen)
    assert [s["silhouette"] for s in res.info["init"]["starts"]] == [h["silhouette"] for h in starts]


def test_an_autoencoder_that_cannot_learn_makes_a_degenerate_result(mnist_1000, caplog):
    images = mnist_1000[0][:300]
    with caplog.at_level(logging.WARNING, logger="gpu_ops.deep"):
        res = fit_deep("n2d", images, 10, seed=0, device="cpu", pretrain_epochs=1, lr=1e-9, n2d_starts=1,
                       progress=False)
    assert any(r.startswith("the autoencoder never reconstructed much better than the mean image")
               for r in res.degenerate), res.degenerate
    assert "n2d: degenerate result: the autoencoder never reconstructed much better" in caplog.text


def test_degenerate_result_reaches_metrics_json(data_dir, tmp_path):
    """One epoch on 300 images (5 steps) cannot teach the autoencoder: metrics.json says so."""
    out = tmp_path / "run"
    result = run_cli(["run", "--dataset", f"idx:{data_dir / 'mnist'}", "--split", "test", "--limit", "300",
                      "--extractor", "raw", "--algorithm", "n2d,kmeans", "--k", "10", "--deep-epochs", "1",
                      "--algorithm-option", "n2d.n2d_starts=1", "--reducer", "none", "--backend", "cpu",
                      "--out", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    flagged = metrics["algorithms"]["n2d"]["degenerate"]
    assert any(r.startswith("the autoencoder never reconstructed much better than the mean image") for r in flagged)
    assert "degenerate" not in metrics["algorithms"]["kmeans"]  # only the deep algorithms are checked
    assert read_metrics(out / "metrics.json")["algorithms"]["n2d"]["degenerate"] == flagged
    assert "n2d: degenerate result: the autoencoder never reconstructed" in result.stderr + result.stdout
    assert f"degenerate n2d: {flagged[0]}" in result.stdout  # under the table the run prints
    assert "Degenerate results" in (out / "report.html").read_text()


def _openmp_settings(env: dict[str, str]) -> tuple[str, str]:
    """(OMP_WAIT_POLICY in os.environ, torch's libgomp spin count) after ``import gpu_ops, torch``.

    libgomp reports its spin count with ``OMP_DISPLAY_ENV=VERBOSE``: 300000 by default (threads
    spin that long at a barrier), 0 with a passive wait policy.
    """
    code = ("import os, gpu_ops, torch; torch.set_num_threads(2); torch.ones(256, 256).sum(); "
            "print(os.environ.get('OMP_WAIT_POLICY'))")
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GPUCLUST_OMP_WAIT")}
    done = subprocess.run([sys.executable, "-c", code], env={**base, "OMP_DISPLAY_ENV": "VERBOSE",
                                                             "PYTHONPATH": str(REPO), **env},
                          capture_output=True, text=True, timeout=300, check=True)
    spins = [line.split("=")[1].strip().strip("'") for line in (done.stdout + done.stderr).splitlines()
             if line.strip().startswith("GOMP_SPINCOUNT =")]
    return done.stdout.strip().splitlines()[-1], spins[0] if spins else "?"


def test_openmp_threads_sleep_unless_told_to_spin():
    assert _openmp_settings({}) == ("PASSIVE", "0")
    assert _openmp_settings({"GPUCLUST_OMP_WAIT": "spin"}) == ("None", "300000")  # the runtime's default
    assert _openmp_settings({"OMP_WAIT_POLICY": "ACTIVE"})[0] == "ACTIVE"  # the user's choice wins
