"""The cluster stage's one shape: every path (in memory, streamed, on Dask, hierarchical, deep)
returns a typed ClusterResult whose labels file the run directory names, and k=auto is chosen
once per run by one rule, whichever path asks first."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import make_blobs

from gpu_ops import pipeline
from gpu_ops.config import make_config
from gpu_ops.rundir import RunDir
from gpu_ops.stages import K_AUTO_SAMPLE_ROWS, ClusterResult, ResolutionRecord

ROOT = Path(__file__).resolve().parents[1]


def _store(npz: Path, cache: Path) -> str:
    cfg = make_config(dataset=f"npz:{npz}", extractor="raw", cache_dir=cache)
    return pipeline.extract_stage(pipeline.extract_params(cfg), progress=False).store


@pytest.fixture(scope="module")
def blobs4(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, np.ndarray]:
    """A 1,200-row store of 4 blobs: (npz, store, true labels)."""
    X, y = make_blobs(n_samples=1200, n_features=8, centers=4, cluster_std=1.0, random_state=0)
    tmp = tmp_path_factory.mktemp("blobs4")
    np.savez(tmp / "blobs.npz", X=X.astype(np.float32), y=y)
    return tmp / "blobs.npz", _store(tmp / "blobs.npz", tmp / "cache"), y


@pytest.fixture(scope="module")
def blobs7(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A store of 7 blobs larger than k=auto's sample: (npz, store)."""
    X, y = make_blobs(n_samples=K_AUTO_SAMPLE_ROWS + 5000, n_features=8, centers=7, cluster_std=1.0, random_state=1)
    tmp = tmp_path_factory.mktemp("blobs7")
    np.savez(tmp / "blobs.npz", X=X.astype(np.float32), y=y)
    return tmp / "blobs.npz", _store(tmp / "blobs.npz", tmp / "cache")


@pytest.fixture(scope="module")
def dask_address():
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster:
        yield cluster.scheduler_address


def test_run_file_names_are_formed_in_one_module():
    """``labels-``, ``linkage-`` and ``history-`` names appear only in gpu_ops/rundir.py (MNIST's own
    ``t10k-labels-idx1-ubyte`` file names are not run files: a ``-`` before them)."""
    sources = sorted((ROOT / "gpu_ops").rglob("*.py")) + sorted((ROOT / "flows").rglob("*.py"))
    assert len(sources) > 30
    for prefix in ("labels-", "linkage-", "history-"):
        pattern = re.compile(rf"(?<![\w-]){prefix}")
        holders = {str(p.relative_to(ROOT)) for p in sources if pattern.search(p.read_text())}
        assert holders == {"gpu_ops/rundir.py"}, (prefix, holders)


def _check(result: ClusterResult, staging: Path, algorithm: str, rows: int) -> np.ndarray:
    """The result is typed, and its labels file is the run directory's, one int label per row."""
    assert isinstance(result, ClusterResult) and result.algorithm == algorithm
    assert result.resolutions and all(isinstance(r, ResolutionRecord) for r in result.resolutions)
    assert result.resolutions[-1].backend == result.backend and result.resolutions[-1].stage == algorithm
    assert Path(result.labels) == RunDir(staging).labels(algorithm)
    labels = np.load(result.labels)
    assert labels.dtype == np.int64 and labels.shape == (rows,)
    # Prefect hands results between tasks and persists them: a JSON round trip keeps them whole
    assert ClusterResult.model_validate_json(result.model_dump_json()) == result
    return labels


@pytest.mark.parametrize("algorithm,settings", [
    ("kmeans", {"k": 4}),
    ("kmeans", {"k": 4, "memory_mb": 32}),
    ("agglomerative", {"k": 4}),
], ids=["in-memory", "streaming", "agglomerative"])
def test_every_local_cluster_path_returns_a_typed_result(blobs4, tmp_path, algorithm, settings):
    npz, store, y = blobs4
    cfg = make_config(dataset=f"npz:{npz}", extractor="raw", algorithms=algorithm, reducer="none",
                      cache_dir=tmp_path / "cache", backend="cpu", **settings)
    result = pipeline.cluster_stage(store, cfg, algorithm, str(tmp_path))
    labels = _check(result, tmp_path, algorithm, 1200)
    assert result.k == 4 and len(np.unique(labels)) == 4
    if "memory_mb" in settings:
        assert result.streaming is not None and result.streaming.memory_mb == 32
    if algorithm == "agglomerative":
        assert result.linkage == str(RunDir(tmp_path).linkage(algorithm))
        assert np.load(result.linkage).shape == (1199, 4)
    metrics = pipeline.evaluate_stage(store, [result])[algorithm]
    assert metrics.ari > 0.95 and sum(metrics.cluster_sizes) == 1200


def test_the_dask_path_returns_a_typed_result(blobs4, dask_address, tmp_path):
    from gpu_ops.distributed import cluster_stage_dask

    npz, store, _ = blobs4
    cfg = make_config(dataset=f"npz:{npz}", extractor="raw", algorithms="kmeans", k=4, reducer="none",
                      cache_dir=tmp_path / "cache", backend="cpu")
    result = cluster_stage_dask(store, cfg, "kmeans", str(tmp_path), dask_address)
    _check(result, tmp_path, "kmeans", 1200)
    assert result.backend.startswith("dask-lloyd+") and result.inertia is not None and result.n_iter is not None
    assert pipeline.evaluate_stage(store, [result])["kmeans"].ari > 0.95


def test_a_deep_algorithm_returns_a_typed_result(tmp_path):
    cfg = make_config(dataset="digits", limit=200, extractor="raw", algorithms="dkm", k=10, deep_epochs=1,
                      reducer="none", cache_dir=tmp_path / "cache", backend="cpu")
    store = pipeline.extract_stage(pipeline.extract_params(cfg), progress=False).store
    result = pipeline.cluster_stage(store, cfg, "dkm", str(tmp_path))
    _check(result, tmp_path, "dkm", 200)
    assert result.backend == "torch-cpu" and result.resolutions[0].kind == "cpu"
    assert json.loads(RunDir(tmp_path).history("dkm").read_text())


def test_k_auto_is_chosen_once_by_one_rule_on_every_path(blobs7, dask_address, tmp_path):
    """In memory, streamed and on Dask: the same 20,000-row sample, the same k_selection.json,
    the same k; a second algorithm of the run reuses the saved choice."""
    from gpu_ops.distributed import cluster_stage_dask

    npz, store = blobs7
    common = dict(dataset=f"npz:{npz}", extractor="raw", k="auto", k_range=(5, 9), reducer="none",
                  cache_dir=tmp_path / "cache", backend="cpu")
    paths = {"in-memory": tmp_path / "memory", "streaming": tmp_path / "streaming", "dask": tmp_path / "dask"}
    for path in paths.values():
        path.mkdir()
    results = {
        "in-memory": pipeline.cluster_stage(store, make_config(**common, algorithms="kmeans,gmm"), "kmeans",
                                            str(paths["in-memory"])),
        "streaming": pipeline.cluster_stage(store, make_config(**common, algorithms="kmeans", memory_mb=64), "kmeans",
                                            str(paths["streaming"])),
        "dask": cluster_stage_dask(store, make_config(**common, algorithms="kmeans"), "kmeans", str(paths["dask"]),
                                   dask_address),
    }
    assert {name: r.k for name, r in results.items()} == {"in-memory": 7, "streaming": 7, "dask": 7}
    saved = {name: RunDir(path).k_selection.read_bytes() for name, path in paths.items()}
    assert saved["in-memory"] == saved["streaming"] == saved["dask"]
    selection = json.loads(saved["in-memory"])
    assert selection["chosen_k"] == 7 and selection["n_fit"] == K_AUTO_SAMPLE_ROWS

    selection_file = RunDir(paths["in-memory"]).k_selection
    stamp = selection_file.stat().st_mtime_ns
    gmm = pipeline.cluster_stage(store, make_config(**common, algorithms="kmeans,gmm"), "gmm", str(paths["in-memory"]))
    assert gmm.k == 7 and selection_file.stat().st_mtime_ns == stamp
    assert sorted(p.name for p in paths["in-memory"].iterdir()) == ["k_selection.json", "labels-gmm.npy",
                                                                    "labels-kmeans.npy", "model-gmm.npz",
                                                                    "model-kmeans.npz"]
