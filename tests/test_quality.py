"""Label-free quality: modularity on the neighbour graph, the merge path, ``k=auto`` and the
``umap-graph`` default, on real data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.datasets import load_digits

from gpu_ops.cluster.choose_k import choose_k
from gpu_ops.cluster.quality import KnnGraph, knn_graph, merge_path, modularity
from gpu_ops.errors import InputError

from conftest import REPO, run_cli


def two_triangles() -> KnnGraph:
    """Triangles {0, 1, 2} and {3, 4, 5} joined by the edge 2-3: 7 edges."""
    edges = [(0, 1), (0, 2), (1, 2), (3, 4), (3, 5), (4, 5), (2, 3)]
    rows, cols = zip(*edges)
    A = sp.coo_matrix((np.ones(7), (rows, cols)), shape=(6, 6)).tocsr()
    return KnnGraph((A + A.T).tocsr(), 2)


def test_modularity_of_two_triangles_is_newmans():
    g = two_triangles()
    # each triangle: 3 of the 7 edges inside, degree sum 7 of 14
    assert modularity(g, np.array([0, 0, 0, 1, 1, 1])) == pytest.approx(2 * (3 / 7 - 0.25))
    assert modularity(g, np.zeros(6, int)) == pytest.approx(0.0)
    assert modularity(g, np.array([0, 0, 1, 1, 2, 2])) < modularity(g, np.array([0, 0, 0, 1, 1, 1]))


def test_merge_path_joins_the_halves_of_each_triangle():
    g = two_triangles()
    micro = np.array([0, 1, 2, 3, 4, 5])
    path = merge_path(g, micro, 1)
    assert sorted(path.partitions) == [1, 2, 3, 4, 5, 6]
    two = path.labels(micro, 2)
    assert len(set(two[:3])) == 1 and len(set(two[3:])) == 1 and two[0] != two[3]
    assert max(path.modularity, key=path.modularity.get) == 2
    with pytest.raises(InputError, match=r"k=7 is outside the merge path \(k from 1 to 6\)"):
        path.labels(micro, 7)


@pytest.fixture(scope="module")
def coil20(data_dir) -> tuple[np.ndarray, np.ndarray]:
    from scipy.io import loadmat

    mat = loadmat(data_dir / "coil20" / "COIL20.mat")
    return (mat["X"] / 255.0).astype(np.float32), mat["Y"].ravel().astype(int) - 1


def test_k_auto_finds_the_twenty_objects_of_coil20(coil20):
    """COIL-20 (1440 images of 20 objects, raw pixels): the modularity of merged micro-clusters
    peaks at 20 and k=auto takes 18-20 (the fewest within the tolerance of the peak); the
    silhouette of k-means, the former choice, peaks at 25."""
    X, _ = coil20
    sel = choose_k(X, 15, 25, backend="cpu", seed=0)
    assert sel.method == "modularity" and sel.ks == list(range(15, 26))
    assert sel.best_k == 20 and 18 <= sel.chosen_k <= 20, sel.modularity
    assert sel.ks[int(np.argmax(sel.silhouette))] == 25


def test_umap_graph_keeps_the_ones_and_eights_apart(tmp_path):
    """digits, seed 3: k-means on the 10-d UMAP space gives ACC 0.88 (1s and 8s joined);
    umap-graph reaches 0.95."""
    from gpu_ops import pipeline
    from gpu_ops.config import make_config

    cfg = make_config(algorithms="umap-graph,umap-kmeans", reducer="none", seed=3, backend="cpu",
                      cache_dir=tmp_path / "cache")
    store = pipeline.extract_stage(pipeline.extract_params(cfg), progress=False)
    staging = tmp_path / "staging"
    staging.mkdir()
    results = [pipeline.cluster_stage(store.store, cfg, a, str(staging)) for a in cfg.algorithms]
    metrics = pipeline.evaluate_stage(store.store, results)
    assert metrics["umap-graph"].acc >= 0.95 and metrics["umap-graph"].k == 10
    assert metrics["umap-kmeans"].acc < 0.9
    assert [r.op for r in results[0].resolutions] == ["umap", "knn", "kmeans"]


def test_k_auto_writes_its_curve_metrics_and_report(tmp_path):
    out = tmp_path / "run"
    result = run_cli(["run", "--algorithm", "kmeans", "--k", "auto", "--k-range", "8,12", "--reducer", "none",
                      "--out", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    sel = json.loads((out / "k_selection.json").read_text())
    assert sel["method"] == "modularity" and sel["ks"] == [8, 9, 10, 11, 12]
    within = [k for k, q in zip(sel["ks"], sel["modularity"]) if q >= max(sel["modularity"]) - sel["tolerance"]]
    assert len(sel["modularity"]) == 5 and sel["tolerance"] == 0.001 and sel["chosen_k"] == within[0]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["k_selection"] == {"chosen_k": sel["chosen_k"], "method": "modularity", "ks": [8, 9, 10, 11, 12],
                                      "score": sel["modularity"], "elbow_k": sel["elbow_k"], "rows": 1797}
    assert metrics["algorithms"]["kmeans"]["k"] == sel["chosen_k"]
    html = (out / "report.html").read_text()
    assert f"k={sel['chosen_k']}: the highest modularity chose it without labels (1797 rows)." in html
    assert (out / "figures" / "k-selection.png").is_file()


@pytest.mark.parametrize("args, line", [
    (["--k", "auto", "--k-range", "9,3"],
     "--k-range must be two integers [low, high] with 2 <= low <= high; got [9, 3]"),
    (["--k", "auto", "--k-range", "1,5"],
     "--k-range must be two integers [low, high] with 2 <= low <= high; got [1, 5]"),
    (["--k", "auto", "--k-range", "5"], "--k-range must be two integers [low, high] with 2 <= low <= high; got [5]"),
    (["--k", "auto", "--k-range", "five,9"],
     "--k-range must be two integers [low, high] with 2 <= low <= high; got 'five,9'"),
    (["--k-range", "5,9"], "--k-range does not apply to k=10; it is for k=auto (the range k is chosen from)"),
])
def test_a_bad_k_range_is_one_line(args, line, tmp_path, capsys):
    from flows.cli import main

    assert main(["run", *args, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"gpuclust: error: {line}"]
    assert not (tmp_path / "r").exists()


def test_knn_graph_is_symmetric_without_self_loops():
    X = load_digits().data[:300].astype(np.float32)
    g = knn_graph(X, 5, backend="cpu")
    A = g.adjacency
    assert (A != A.T).nnz == 0 and A.diagonal().sum() == 0
    assert (np.asarray(A.sum(axis=1)).ravel() >= 5).all()


def test_the_handwriting_preset_loads_and_takes_the_acceptance_flags(data_dir):
    """configs/handwriting.yaml validates as it is, and with the only flags its runs add."""
    from flows.cli import build_parser, run_config_from_args

    preset = REPO / "configs" / "handwriting.yaml"
    args = build_parser().parse_args(["run", "--config", str(preset), "--dataset", f"idx:{data_dir / 'mnist'}",
                                      "--split", "test", "--k", "auto", "--seed", "4"])
    cfg = run_config_from_args(args)
    assert (cfg.algorithms, cfg.extractor, cfg.k, cfg.seed, cfg.split) == (["idec"], "raw", "auto", 4, "test")
    plain = run_config_from_args(build_parser().parse_args(["run", "--config", str(preset)]))
    assert (plain.dataset, plain.algorithms, plain.k) == ("digits", ["idec"], 10)


def test_the_photos_preset_loads_and_takes_the_acceptance_flags(tmp_path):
    """configs/photos.yaml: two packaged ImageNet backbones and a SCAN head (one hidden layer) beside k-means; the
    acceptance runs add only --dataset, --k and --seed."""
    from flows.cli import build_parser, run_config_from_args

    preset = REPO / "configs" / "photos.yaml"
    args = build_parser().parse_args(["run", "--config", str(preset), "--dataset", f"folder:{tmp_path}",
                                      "--k", "auto", "--seed", "2"])
    cfg = run_config_from_args(args)
    assert (cfg.extractor, cfg.image_size, cfg.algorithms, cfg.k, cfg.seed) == (
        "efficientnet_lite0+efficientnet_lite2", 192, ["scan", "kmeans"], "auto", 2)
    assert cfg.weights is None  # the packaged ImageNet weights: nothing to download
    assert cfg.options_for("scan") == {"hidden": 256, "consensus": True}  # BENCHMARKS.md, "A consensus of heads"
