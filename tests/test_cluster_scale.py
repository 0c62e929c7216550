"""Clustering at scale on the CPU: k-means++ seeding, out-of-core k-means over a Parquet store,
micro-cluster hierarchies, HDBSCAN / Gaussian mixtures behind the registry, and their wiring into
the pipeline's cluster stage.

Objectives are compared within a tolerance, never bit-exact labels. The 2 000 000-row store test
(peak memory of a streaming k-means in a subprocess) is the slowest here: ~30-45 s on 2 cores.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from sklearn.datasets import make_blobs
from sklearn.metrics import adjusted_rand_score

from gpu_ops.cluster.kmeans import FaissKMeans, SklearnKMeans, import_faiss, kmeans_plusplus, seeding_rows
from gpu_ops.cluster.kmeans_ooc import StreamingKMeans, plan_memory
from gpu_ops.cluster.microcluster import (
    MicroClusterAgglomerative,
    cut_distance,
    cut_n_clusters,
    point_counts,
    weighted_linkage,
)
from gpu_ops.cluster.synthetic import write_blob_store
from gpu_ops.errors import InputError
from gpu_ops.registry import create_estimator, list_backends, resolve_backend
from gpu_ops.store import iter_tables

REPO = Path(__file__).resolve().parents[1]
try:
    import_faiss()
except ImportError:
    pytest.skip("faiss is not installed", allow_module_level=True)


def _inertia(X: np.ndarray, centers: np.ndarray, labels: np.ndarray) -> float:
    diff = X.astype(np.float64) - centers.astype(np.float64)[labels]
    return float(np.einsum("ij,ij->", diff, diff))


@pytest.fixture(scope="module")
def blobs100() -> np.ndarray:
    """30 000 x 32 float32 with 100 well-separated centres: random init fails here, k-means++ does not."""
    X, _ = make_blobs(n_samples=30_000, n_features=32, centers=100, random_state=0)
    return X.astype(np.float32)


# ---------------------------------------------------------------- k-means++ and FaissKMeans


def test_kmeans_plusplus_returns_data_rows_and_their_potential():
    X = np.random.default_rng(0).normal(size=(2000, 8)).astype(np.float32)
    centers, pot = kmeans_plusplus(X, 25, seed=3)
    assert centers.shape == (25, 8) and centers.dtype == np.float32
    rows = {tuple(r) for r in X}
    assert all(tuple(c) in rows for c in centers)
    d2 = ((X[:, None, :].astype(np.float64) - centers[None].astype(np.float64)) ** 2).sum(-1).min(1)
    assert pot == pytest.approx(d2.sum(), rel=1e-4)
    again, _ = kmeans_plusplus(X, 25, seed=3)
    np.testing.assert_array_equal(centers, again)


def test_kmeans_plusplus_weights_steer_the_seeds():
    X = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]], dtype=np.float32)
    w = np.array([1.0, 0.0, 0.0, 0.0])
    centers, pot = kmeans_plusplus(X, 1, seed=0, sample_weight=w)
    np.testing.assert_array_equal(centers[0], X[0])
    assert pot == 0.0


def test_faiss_kmeans_plusplus_does_not_trade_objective_for_speed(blobs100):
    X = blobs100
    ref = SklearnKMeans(n_clusters=100, n_init=1, max_iter=20, seed=0).fit(X)
    for seed in (0, 1):
        fast = FaissKMeans(n_clusters=100, max_iter=20, seed=seed).fit(X)
        assert fast.init_ == "k-means++"
        assert fast.inertia_ <= 1.01 * ref.inertia_, (seed, fast.inertia_, ref.inertia_)
        assert fast.inertia_ == pytest.approx(_inertia(X, fast.cluster_centers_, fast.labels_), rel=1e-4)
    # FAISS's own random init leaves centres doubled up on these blobs: what k-means++ fixes
    rnd = FaissKMeans(n_clusters=100, max_iter=20, seed=0, init="random").fit(X)
    assert rnd.init_ == "random"
    assert rnd.inertia_ > 1.5 * fast.inertia_


def test_faiss_kmeans_validates_init_and_weights():
    X = np.random.default_rng(0).normal(size=(100, 3)).astype(np.float32)
    with pytest.raises(InputError, match=r"unknown init 'kmeans\+\+'; expected one of: k-means\+\+, random"):
        FaissKMeans(n_clusters=3, init="kmeans++").fit(X)
    with pytest.raises(InputError, match="n_seedings must be a positive integer; got 0"):
        FaissKMeans(n_clusters=3, n_seedings=0).fit(X)
    with pytest.raises(InputError, match=r"sample_weight must be 100 non-negative values; got shape \(99,\)"):
        FaissKMeans(n_clusters=3).fit(X, sample_weight=np.ones(99))
    w = np.ones(100)
    w[:50] = 0
    km = FaissKMeans(n_clusters=2, seed=0).fit(X, sample_weight=w)
    assert km.inertia_ == pytest.approx(_inertia(X[50:], km.cluster_centers_, km.labels_[50:]), rel=1e-4)


def test_seeding_falls_back_to_random_only_for_huge_k():
    assert seeding_rows(100_000, 100, 128, 3, None, 20) == (10_000, 3)
    assert seeding_rows(1_000_000, 20_000, 256, 3, None, 25) == (0, 0)
    assert seeding_rows(5000, 7, 32, 3, None, 100) == (5000, 3)  # cheap: the whole training set
    assert seeding_rows(25_600, 100, 64, 3, 20_000, 20) == (20_000, 3)  # init_sample caps


def test_faiss_kmeans_with_ten_thousand_centres(caplog):
    X = np.random.default_rng(0).normal(size=(30_000, 8)).astype(np.float32)
    with caplog.at_level(logging.INFO, logger="gpu_ops.cluster.kmeans"):
        km = FaissKMeans(n_clusters=10_000, max_iter=5, seed=0).fit(X)
    assert km.init_ == "random" and "using FAISS random initialisation" in caplog.text
    assert km.cluster_centers_.shape == (10_000, 8)
    assert len(np.unique(km.labels_)) > 9000


# ---------------------------------------------------------------- out-of-core k-means


@pytest.fixture(scope="module")
def small_store(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("store") / "blobs"
    write_blob_store(directory, 60_000, 16, n_centers=20, seed=1, shard_rows=25_000)
    return directory


def _store_arrays(directory: Path) -> tuple[list[str], np.ndarray]:
    from gpu_ops.store import read_embeddings

    table = read_embeddings(directory)
    return table.image_ids, table.embeddings


def test_streaming_kmeans_assigns_every_row_and_matches_in_memory(small_store, tmp_path):
    ids, X = _store_arrays(small_store)
    est = StreamingKMeans(n_clusters=20, memory_mb=16, max_iter=20, max_points_per_centroid=64, seed=0,
                          batch_rows=7000)
    est.fit(small_store, labels_path=tmp_path / "labels.npy", assignments_path=tmp_path / "assign.parquet")
    n = len(ids)
    assert est.plan_.sample_rows == 20 * 64 < n  # really fitted on a sample
    assert est.counts_.sum() == n and isinstance(est.labels_, np.memmap)
    labels = np.load(tmp_path / "labels.npy")
    assert labels.shape == (n,) and labels.min() >= 0 and labels.max() < 20
    # labels and inertia belong to the final centres, over all rows
    assert est.inertia_ == pytest.approx(_inertia(X, est.cluster_centers_, labels), rel=1e-4)
    table = pq.read_table(tmp_path / "assign.parquet")
    assert table.column("image_id").to_pylist() == ids
    np.testing.assert_array_equal(table.column("label").to_numpy(), labels)
    assert not list(tmp_path.glob(".*tmp*"))
    full = FaissKMeans(n_clusters=20, max_iter=20, seed=0).fit(X)
    assert est.inertia_ <= 1.01 * full.inertia_, (est.inertia_, full.inertia_)
    # the refinement pass does not make things worse
    assert est.pass_objectives_[-1] <= est.pass_objectives_[0] * (1 + 1e-6)
    np.testing.assert_array_equal(est.predict(X[:100]), labels[:100])


def test_streaming_kmeans_on_arrays_and_memmaps(tmp_path):
    X, _ = make_blobs(n_samples=20_000, n_features=8, centers=10, random_state=0)
    X = X.astype(np.float32)
    mm = np.lib.format.open_memmap(tmp_path / "X.npy", mode="w+", dtype=np.float32, shape=X.shape)
    mm[:] = X
    mm.flush()
    a = StreamingKMeans(n_clusters=10, memory_mb=16, seed=0).fit(X)
    b = StreamingKMeans(n_clusters=10, memory_mb=16, seed=0).fit(np.load(tmp_path / "X.npy", mmap_mode="r"))
    assert a.inertia_ == pytest.approx(b.inertia_, rel=1e-6)
    assert adjusted_rand_score(a.labels_, b.labels_) == 1.0


def test_streaming_kmeans_big_k(tmp_path):
    directory = tmp_path / "bigk"
    write_blob_store(directory, 40_000, 8, n_centers=500, seed=2, shard_rows=15_000)
    est = StreamingKMeans(n_clusters=10_000, memory_mb=64, max_iter=5, refine_iter=1, seed=0).fit(directory)
    assert est.cluster_centers_.shape == (10_000, 8)
    assert est.counts_.sum() == 40_000
    assert (est.counts_ > 0).sum() > 9000


def test_streaming_kmeans_memory_errors_quote_the_values(small_store):
    with pytest.raises(InputError, match="memory_mb=1 is too small for k=5000 centres of 16 dimensions; need at least"):
        StreamingKMeans(n_clusters=5000, memory_mb=1).fit(small_store)
    with pytest.raises(InputError, match="memory_mb must be a positive integer; got 0"):
        StreamingKMeans(n_clusters=5, memory_mb=0).fit(small_store)
    with pytest.raises(InputError, match=r"k=70000 is larger than the number of images \(60000\)"):
        StreamingKMeans(n_clusters=70_000).fit(small_store)
    plan = plan_memory(10**9, 64, 100, 256, 256)
    assert plan.sample_rows == 25_600 and plan.batch_rows >= 1024


BIG_N, BIG_D = 2_000_000, 64

PEAK_SCRIPT = textwrap.dedent("""
    import json, re, sys, time
    t0 = time.perf_counter()
    from gpu_ops.cluster.kmeans_ooc import StreamingKMeans
    est = StreamingKMeans(n_clusters=100, memory_mb=256, max_iter=20, seed=0)
    est.fit(sys.argv[1], labels_path=sys.argv[2])
    status = open("/proc/self/status").read()
    print(json.dumps({"vmhwm_kb": int(re.search(r"VmHWM:\\s+(\\d+)", status).group(1)),
                      "rows": int(est.counts_.sum()), "nonempty": int((est.counts_ > 0).sum()),
                      "inertia": est.inertia_, "seconds": time.perf_counter() - t0,
                      "timings": est.timings_, "torch": "torch" in sys.modules}))
""")


def test_streaming_kmeans_over_two_million_rows_stays_under_1gb(tmp_path):
    """Acceptance (b): 2 000 000 x 64 float32 (512 MB of embeddings) with memory_mb=256 in a fresh
    process: every row assigned, peak RSS (VmHWM) < 1 GB."""
    directory = tmp_path / "big"
    t0 = time.perf_counter()
    write_blob_store(directory, BIG_N, BIG_D, n_centers=100, seed=0, shard_rows=100_000)
    write_s = time.perf_counter() - t0
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(directory), str(tmp_path / "labels.npy")],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print({"write_store_s": round(write_s, 1), **result})
    assert result["rows"] == BIG_N and result["nonempty"] == 100
    assert result["vmhwm_kb"] < 1024 * 1024, result
    assert not result["torch"]  # the CUDA probe must not pull torch (~600 MB) into a small budget
    labels = np.load(tmp_path / "labels.npy", mmap_mode="r")
    assert labels.shape == (BIG_N,) and int(labels.max()) < 100
    # blobs of unit variance: the optimum is ~ n * d; allow 2 %
    assert result["inertia"] < 1.02 * BIG_N * BIG_D


# ---------------------------------------------------------------- hierarchies


@pytest.mark.parametrize("method", ["ward", "average", "complete", "single"])
def test_weighted_linkage_with_unit_weights_is_scipys(method):
    from scipy.cluster.hierarchy import fcluster, is_valid_linkage, linkage

    X = np.random.default_rng(0).normal(size=(200, 5))
    Z = weighted_linkage(X, None, method)
    ref = linkage(X, method)
    assert is_valid_linkage(Z)
    np.testing.assert_allclose(Z[:, 2], ref[:, 2], rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(Z[:, 3], ref[:, 3])
    for k in (2, 7, 30):
        assert adjusted_rand_score(cut_n_clusters(Z, k), fcluster(ref, k, "maxclust")) == 1.0


@pytest.mark.parametrize("method", ["ward", "average"])
def test_weighted_linkage_equals_the_tree_of_the_repeated_points(method):
    """A centroid of weight w behaves exactly like w identical points: the merges above height 0
    of scipy's tree over the repeated points are the weighted tree's merges."""
    from scipy.cluster.hierarchy import linkage

    rng = np.random.default_rng(1)
    C = rng.normal(size=(60, 4))
    w = rng.integers(1, 7, size=60)
    Zw = weighted_linkage(C, w, method)
    ref = linkage(np.repeat(C, w, axis=0), method)
    np.testing.assert_allclose(np.sort(Zw[:, 2]), np.sort(ref[ref[:, 2] > 1e-9, 2]), rtol=1e-9)
    np.testing.assert_array_equal(point_counts(Zw, w)[-1], w.sum())


def test_distance_cut_follows_scikit_learn():
    from sklearn.cluster import AgglomerativeClustering

    X, _ = make_blobs(n_samples=300, n_features=4, centers=5, random_state=0)
    Z = weighted_linkage(X, None, "ward")
    heights = np.sort(Z[:, 2])
    t = float((heights[-5] + heights[-4]) / 2)  # the top 4 merges stay undone: 5 clusters
    ref = AgglomerativeClustering(n_clusters=None, distance_threshold=t, linkage="ward").fit(X)
    labels = cut_distance(Z, t)
    assert len(np.unique(labels)) == ref.n_clusters_ == 5
    assert adjusted_rand_score(labels, ref.labels_) == 1.0
    with pytest.raises(InputError, match="distance_threshold must be a non-negative number; got -1.0"):
        cut_distance(Z, -1.0)


def _merged_prefix(Z: np.ndarray, n_merges: int) -> np.ndarray:
    """Reference cut: replay the first ``n_merges`` merges on explicit member lists."""
    m = Z.shape[0] + 1
    members = {i: [i] for i in range(m)}
    for step in range(n_merges):
        members[m + step] = members.pop(int(Z[step, 0])) + members.pop(int(Z[step, 1]))
    labels = np.empty(m, dtype=np.int64)
    for c, leaves in enumerate(sorted(members.values(), key=min)):
        labels[leaves] = c
    return labels


@pytest.mark.parametrize("method", ["ward", "average", "complete", "single"])
def test_tree_cuts_replay_the_merges_on_digits(method):
    """The micro-cluster tree of real data (digits, 300 leaves) cut at every k and at merge heights
    gives the clusters of replaying the first merges, numbered by first leaf; with tied heights
    (each digit three times) a cut still gives exactly k clusters."""
    from sklearn.datasets import load_digits

    X = load_digits().data.astype(np.float32)
    Z = MicroClusterAgglomerative(n_clusters=10, linkage=method, n_micro=300, seed=0).fit(X).linkage_matrix_
    m = Z.shape[0] + 1
    for k in range(1, m + 1):
        np.testing.assert_array_equal(cut_n_clusters(Z, k), _merged_prefix(Z, m - k))
    heights = np.maximum.accumulate(Z[:, 2])
    for t in heights[::13]:  # merges at or above the threshold stay undone
        np.testing.assert_array_equal(cut_distance(Z, float(t)), _merged_prefix(Z, int((heights < t).sum())))
    tied = weighted_linkage(np.repeat(X[:60], 3, axis=0), None, method)
    assert (tied[:, 2] == 0).sum() == 120
    for k in (100, 60, 59, 10):
        labels = cut_n_clusters(tied, k)
        assert labels.max() + 1 == k
        np.testing.assert_array_equal(labels, _merged_prefix(tied, 180 - k))


def test_microcluster_ward_recovers_blobs_and_cuts_both_ways():
    X, y = make_blobs(n_samples=20_000, n_features=16, centers=8, random_state=3)
    est = MicroClusterAgglomerative(n_clusters=8, n_micro=200, seed=0).fit(X)
    assert est.linkage_matrix_.shape == (199, 4)
    assert est.micro_sizes_.sum() == 20_000 and est.node_point_counts_[-1] == 20_000
    assert adjusted_rand_score(y, est.labels_) > 0.99
    cut = float(np.sort(est.linkage_matrix_[:, 2])[-7] + 1e-6)  # just above the 7th-highest merge
    by_height = MicroClusterAgglomerative(n_clusters=None, distance_threshold=cut, n_micro=200, seed=0).fit(X)
    assert by_height.n_clusters_ == 7  # the top 6 merges stay undone
    assert adjusted_rand_score(by_height.labels_, est.labels_) > 0.8
    with pytest.raises(InputError, match="give exactly one of n_clusters and distance_threshold"):
        MicroClusterAgglomerative(n_clusters=3, distance_threshold=1.0).fit(X)
    with pytest.raises(InputError, match="n_clusters=300 exceeds the 200 micro-clusters; raise n_micro"):
        MicroClusterAgglomerative(n_clusters=300, n_micro=200).fit(X)


def test_sklearn_backend_switches_to_microclusters_above_the_limit(caplog):
    X, y = make_blobs(n_samples=3000, n_features=8, centers=4, random_state=0)
    spec, res = resolve_backend("agglomerative", "cpu", {"linkage": "ward"})
    assert spec.name == "sklearn"
    with caplog.at_level(logging.WARNING, logger="gpu_ops.cluster.agglomerative"):
        est = spec.factory(n_clusters=4, linkage="ward", max_exact_n=1000, n_micro=100).fit(X)
    assert est.method_ == "microcluster" and "micro-clusters" in caplog.text and "n=3000 > max_exact_n=1000" in caplog.text
    assert est.linkage_matrix_.shape == (99, 4)
    assert adjusted_rand_score(y, est.labels_) > 0.99
    exact = spec.factory(n_clusters=None, distance_threshold=50.0, linkage="ward").fit(X[:500])
    assert exact.method_ == "exact" and exact.n_clusters_ >= 1


def test_dendrogram_of_100k_embeddings_within_two_minutes():
    """Acceptance (d): 100 000 x 64 embeddings -> 1 000 micro-clusters -> full ward tree."""
    X, y = make_blobs(n_samples=100_000, n_features=64, centers=12, cluster_std=2.0, random_state=0)
    t0 = time.perf_counter()
    est, res = create_estimator("agglomerative", "cpu", n_clusters=12, linkage="ward")
    est.fit(X)
    seconds = time.perf_counter() - t0
    print({"dendrogram_100k_s": round(seconds, 1), "kmeans_backend": est.kmeans_resolution_["backend"]})
    assert seconds < 120
    assert est.method_ == "microcluster" and est.linkage_matrix_.shape == (999, 4)
    assert adjusted_rand_score(y, est.labels_) > 0.99


# ---------------------------------------------------------------- HDBSCAN and GMM


def test_hdbscan_and_gmm_are_registered_ops():
    assert [s.name for s in list_backends("hdbscan")] == ["cuml", "sklearn"]
    assert [s.name for s in list_backends("gmm")] == ["sklearn"]
    spec, res = resolve_backend("gmm", "gpu")
    assert spec.name == "sklearn" and res.kind == "cpu"


def test_hdbscan_marks_noise_and_finds_the_clusters():
    X, y = make_blobs(n_samples=1500, n_features=2, centers=3, cluster_std=0.5, random_state=0)
    X = np.vstack([X, np.random.default_rng(0).uniform(-30, 30, size=(30, 2))])
    est, res = create_estimator("hdbscan", "cpu", min_cluster_size=25)
    est.fit(X)
    assert est.n_clusters_ == 3 and est.n_noise_ > 0
    assert est.labels_.dtype == np.int64 and est.labels_.min() == -1
    core = est.labels_[:1500] >= 0
    assert adjusted_rand_score(y[core], est.labels_[:1500][core]) > 0.99
    with pytest.raises(InputError, match="min_cluster_size must be an integer >= 2; got 1"):
        create_estimator("hdbscan", "cpu", min_cluster_size=1)[0].fit(X)


def test_gmm_fits_blobs_and_validates():
    X, y = make_blobs(n_samples=2000, n_features=5, centers=4, random_state=1)
    est, _ = create_estimator("gmm", "auto", n_clusters=4, seed=0)
    est.fit(X)
    assert est.cluster_centers_.shape == (4, 5) and est.converged_
    assert adjusted_rand_score(y, est.labels_) > 0.99
    assert np.isfinite(est.bic_) and (est.probabilities_ > 0.2).all()
    with pytest.raises(InputError, match="unknown covariance_type 'diagonal'"):
        create_estimator("gmm", "cpu", n_clusters=2, covariance_type="diagonal")[0].fit(X)
    with pytest.raises(InputError, match="unknown init 'kmeans\\+\\+'"):
        create_estimator("gmm", "cpu", n_clusters=2, init="kmeans++")[0].fit(X)


def test_gmm_started_from_kmeans_separates_what_kmeans_plusplus_seeds_merge():
    X, y = make_blobs(n_samples=5000, n_features=32, centers=7, cluster_std=2.0, random_state=0)
    est, _ = create_estimator("gmm", "cpu", n_clusters=7, seed=0)
    assert adjusted_rand_score(y, est.fit(X).labels_) == 1.0
    assert est.kmeans_resolution_["op"] == "kmeans"


# ---------------------------------------------------------------- pipeline wiring


@pytest.fixture(scope="module")
def blob_npz(tmp_path_factory) -> Path:
    X, y = make_blobs(n_samples=3000, n_features=8, centers=4, cluster_std=1.0, random_state=0)
    path = tmp_path_factory.mktemp("npz") / "blobs.npz"
    np.savez(path, X=X.astype(np.float32), y=y)
    return path


def _run_cluster(npz: Path, tmp: Path, algorithm: str, **cfg_values):
    from gpu_ops import pipeline
    from gpu_ops.config import make_config

    cfg = make_config(dataset=f"npz:{npz}", extractor="raw", algorithms=algorithm, reducer="none",
                      cache_dir=tmp / "cache", **cfg_values)
    store = pipeline.extract_stage(pipeline.extract_params(cfg), progress=False).store
    staging = tmp / f"staging-{algorithm}"
    staging.mkdir(exist_ok=True)
    out = pipeline.cluster_stage(store, cfg, algorithm, str(staging))
    return store, out


@pytest.mark.parametrize("algorithm,values", [
    ("hdbscan", {"min_cluster_size": 30}),
    ("gmm", {"k": 4}),
    ("kmeans", {"k": 4, "memory_mb": 32}),
    ("agglomerative", {"distance_threshold": 60.0}),
])
def test_pipeline_cluster_stage_runs_the_new_algorithms(blob_npz, tmp_path, algorithm, values):
    from gpu_ops import pipeline

    store, out = _run_cluster(blob_npz, tmp_path, algorithm, **values)
    labels = np.load(out.labels)
    assert labels.shape == (3000,)
    assert out.k == 4, out
    metrics = pipeline.evaluate_stage(store, [out])[algorithm].as_json()
    assert metrics["ari"] > 0.95, metrics
    assert sum(metrics["cluster_sizes"]) + metrics.get("noise", 0) == 3000
    if algorithm == "kmeans":
        assert out.streaming.memory_mb == 32 and out.backend == "faiss-cpu"


def test_config_rejects_unknown_algorithm_and_accepts_new_ones():
    from gpu_ops.config import ALGORITHMS, make_config

    assert {"hdbscan", "gmm"} <= set(ALGORITHMS)
    cfg = make_config(algorithms="kmeans,hdbscan,gmm,agglomerative", memory_mb=256, distance_threshold=3.5)
    assert cfg.algorithms == ["kmeans", "hdbscan", "gmm", "agglomerative"]
    with pytest.raises(InputError, match="unknown algorithm 'dbscan'"):
        make_config(algorithms="dbscan")
    with pytest.raises(InputError, match="memory_mb"):
        make_config(memory_mb=1)


def test_iter_tables_and_streaming_agree_on_row_order(small_store):
    """Labels are written in the store's shard order, the order iter_tables / read_embeddings use."""
    n = sum(t.num_rows for t in iter_tables(small_store, columns=["image_id"]))
    assert n == 60_000


# ---------------------------------------------------------------- maps


def test_tsne_perplexity_sweep_maps_each_usable_perplexity(tmp_path, caplog):
    pytest.importorskip("openTSNE")
    from sklearn.datasets import load_digits

    from gpu_ops.reduce.tsne import perplexity_sweep

    X = load_digits().data[:400]
    with caplog.at_level(logging.WARNING, logger="gpu_ops.reduce.tsne"):
        out = perplexity_sweep(X, [5, 30, 200], seed=0)
    assert out.perplexities == [5.0, 30.0] and out.skipped == [200.0]
    assert "skipping perplexities [200.0]" in caplog.text
    assert [e.shape for e in out.embeddings] == [(400, 2), (400, 2)]
    assert out.backends == ["opentsne", "opentsne"]
    ids = [f"digits/{i:07d}" for i in range(400)]
    with np.load(out.save(tmp_path / "sweep.npz", ids), allow_pickle=False) as saved:
        assert saved["perplexities"].tolist() == [5.0, 30.0] and saved["skipped"].tolist() == [200.0]
        np.testing.assert_array_equal(saved["embeddings"], np.stack(out.embeddings))
        assert saved["image_ids"].tolist() == ids and saved["backends"].tolist() == ["opentsne", "opentsne"]
    with pytest.raises(InputError, match="no perplexity in \\[500\\] is usable with 400 samples"):
        perplexity_sweep(X, [500])


def test_import_umap_caches_every_kernel_and_restores_numba():
    """In a fresh process: after import_umap(), numba's decorators are the originals again and umap's
    own kernels (which umap-learn does not mark cache=True) have an on-disk cache."""
    pytest.importorskip("umap")
    code = textwrap.dedent("""
        import numba
        njit, jit = numba.njit, numba.jit
        from gpu_ops.reduce.umap import import_umap
        umap = import_umap()
        import umap.umap_ as m
        assert numba.njit is njit and numba.jit is jit
        print(type(m.smooth_knn_dist._cache).__name__)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[0] == "FunctionCache", out.stdout
