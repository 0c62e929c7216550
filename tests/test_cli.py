"""The `gpuclust` command: real subprocesses, real data, against a real Prefect server and in
ephemeral mode (no server at all)."""

import json

import pytest

from gpu_ops.rundir import RunDir

from conftest import run_cli


def test_demo_default_in_ephemeral_mode(tmp_path):
    """What `make demo` runs: no server configured, no files, ACC >= 0.95 on digits (umap-graph:
    k-means on the UMAP space alone joins the 1s and 8s, ACC 0.88)."""
    result = run_cli(["run", "--out", str(tmp_path / "demo")], shared_server=False)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert metrics["dataset"] == "digits" and metrics["n"] == 1797
    assert metrics["algorithms"]["umap-graph"]["acc"] >= 0.95
    assert "umap-graph" in result.stdout and "ACC" in result.stdout


def test_deep_clustering_from_the_cli(data_dir, tmp_path):
    """`--algorithm n2d,idec`: the run directory holds both, in the store's order; the methods' own
    settings (one N2D start, a short IDEC phase) reach them through --algorithm-option."""
    import pandas as pd

    out = tmp_path / "deep"
    options = ["--algorithm-option", "n2d.n2d_starts=1", "--algorithm-option", "idec.n2d_starts=1",
               "--algorithm-option", "idec.dec_max_iter=150"]
    result = run_cli(["run", "--dataset", f"idx:{data_dir / 'mnist'}", "--split", "test", "--limit", "1000",
                      "--extractor", "raw", "--algorithm", "n2d,idec", "--k", "10", "--deep-epochs", "3", *options,
                      "--reducer", "none", "--backend", "cpu", "--out", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assignments = pd.read_parquet(out / "assignments.parquet")
    assert len(assignments) == 1000 and {"n2d", "idec"} <= set(assignments.columns)
    pretrained = []
    for algorithm in ("n2d", "idec"):
        entry = metrics["algorithms"][algorithm]
        assert entry["backend"] == "torch-cpu" and entry["k"] == 10
        history = json.loads(RunDir(out).history(algorithm).read_text())
        pretrained.append([h["epoch"] for h in history if h["phase"] == "pretrain"])
        # the ACC logged by training is the ACC the evaluate stage finds on the saved assignments
        assert history[-1]["acc"] == pytest.approx(entry["acc"], abs=1e-4)
    # one algorithm pretrains the autoencoder, the other reuses its checkpoint
    assert sorted(pretrained) == [[], [1, 2, 3]]
    idec_history = json.loads(RunDir(out).history("idec").read_text())
    idec_phases = [h["phase"] for h in idec_history]
    assert "manifold-init" in idec_phases and idec_phases[-1] == "idec"
    assert [h["phase"] for h in idec_history].count("n2d-start") == 1 and idec_history[-1]["iteration"] <= 150


def _unreadable_folder(tmp_path):
    folder = tmp_path / "unreadable"
    folder.mkdir()
    for name in ("a.jpg", "b.png"):
        (folder / name).write_text("plain text")
    return folder


BAD_INPUTS = [
    (["--dataset", "folder:/no/such/dir"], "gpuclust: error: /no/such/dir: image folder does not exist"),
    (["--dataset", "idx:/no/such/dir"], "gpuclust: error: /no/such/dir: IDX dataset directory does not exist"),
    (["--dataset", "cifar"], "gpuclust: error: unknown dataset 'cifar'; expected digits or KIND:PATH with KIND one of: idx, folder, npz, npy, usps, parquet"),
    (["--extractor", "vgg"], "gpuclust: error: unknown extractor 'vgg'; expected one of: autoencoder, efficientnet_lite0, "
     "efficientnet_lite1, efficientnet_lite2, raw, resnet18, resnet34, resnet50, timm:NAME, torchvision:NAME "
     "(or several backbones joined by +)"),
    (["--backend", "tpu"], "gpuclust: error: unknown backend 'tpu'; expected one of: auto, cpu, gpu"),
    (["--backend", "kmeans=nope"], "gpuclust: error: unknown kmeans backend 'nope'; expected one of: auto, cpu, cuml, faiss-cpu, faiss-gpu, gpu, sklearn"),
    (["--algorithm", "spectral"], "gpuclust: error: --algorithm: unknown algorithm 'spectral'; expected one of:"),
    (["--k", "5000"], "gpuclust: error: k=5000 is larger than the number of images (1797) in digits"),
    (["--k", "ten"], "gpuclust: error: --k must be a positive integer or auto; got 'ten'"),
    (["--config", "/no/such.yaml"], "gpuclust: error: /no/such.yaml: config file does not exist"),
]


@pytest.mark.parametrize("args, message", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    result = run_cli(["run", *args, "--out", str(tmp_path / "run")])
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr
    assert not (tmp_path / "run").exists()


def test_empty_folder_and_unreadable_folder(prefect_server, tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_cli(["run", "--dataset", f"folder:{tmp_path / 'empty'}", "--out", str(tmp_path / "r1")])
    assert result.returncode == 2
    assert result.stderr.strip() == f"gpuclust: error: {tmp_path / 'empty'}: no image files (.jpg, .jpeg, .png, .bmp, .gif, .tif, .tiff, .webp) in the folder"

    folder = _unreadable_folder(tmp_path)
    # kmeans and a PCA map run on 2 images (UMAP needs more): the run gets to extraction
    result = run_cli(["run", "--dataset", f"folder:{folder}", "--k", "2", "--algorithm", "kmeans", "--reducer", "pca",
                      "--out", str(tmp_path / "r2")],
                     api_url=prefect_server["url"])
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"gpuclust: error: folder:{folder}: no readable image among 2 files"), result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "r2").exists()


def test_yaml_config_with_flag_override(prefect_server, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("dataset: digits\nalgorithms: [kmeans]\nk: 8\nreducer: pca\nlimit: 500\n")
    result = run_cli(["run", "--config", str(cfg), "--k", "10", "--out", str(tmp_path / "run")],
                     api_url=prefect_server["url"])
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["n"] == 500 and metrics["algorithms"]["kmeans"]["k"] == 10
    assert "k: 10" in (tmp_path / "run" / "config.yaml").read_text()


def test_backends_lists_every_op_and_what_auto_picks():
    result = run_cli(["backends"])
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for line in ("kmeans: auto -> faiss-cpu", "agglomerative: auto -> sklearn", "tsne: auto -> opentsne",
                 "umap: auto -> umap-learn", "pca: auto -> sklearn"):
        assert line in out
    assert "- cuml" in out and "no CUDA device visible" in out
