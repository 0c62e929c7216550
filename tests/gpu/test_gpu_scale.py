"""GPU at scale: cuML and FAISS-GPU k-means on 1M x 256 with k=20 000 (25 iterations), the GPU
backends behind the out-of-core and micro-cluster paths, and cuML HDBSCAN against scikit-learn.

Every test is marked ``gpu`` and skips cleanly without CUDA, cuML or a GPU build of faiss.
Written without a GPU at hand (the CPU session that wrote them had none): the cuML / FAISS calls
follow the documented APIs (cuml.cluster.KMeans: init="scalable-k-means++", n_init, max_iter;
cuml.cluster.hdbscan.HDBSCAN(min_cluster_size=..., output_type="numpy"); faiss.Kmeans(..., gpu=True)).
Tolerances are quality, never bits:

- k-means at scale: the objective of cuML and FAISS-GPU within 2% of each other on unstructured
  data (1M standard-normal rows: no basin is much better than another), and each equal to the
  objective recomputed from its labels and centres (1e-3: cuML sums in float32);
- the same k-means with cuML / FAISS-GPU on 100k x 64 blobs, k=1000: objective within
  ``BLOBS_OBJECTIVE_BAR`` of the objective at the generating centres, ARI >= 0.95 against the blobs;
- cuML HDBSCAN vs scikit-learn on separated blobs: ARI >= 0.95 on the points both call clustered.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from gpu_ops.device import cuda_available

pytestmark = pytest.mark.gpu

N_SCALE, D_SCALE, K_SCALE, ITERS_SCALE = 1_000_000, 256, 20_000, 25


@pytest.fixture(scope="module")
def scale_data() -> np.ndarray:
    """1 000 000 x 256 float32 standard normal (1 GB on the host)."""
    if not cuda_available():
        pytest.skip("no CUDA device visible")
    return np.random.default_rng(0).standard_normal((N_SCALE, D_SCALE), dtype=np.float32)


def _objective(X: np.ndarray, centers: np.ndarray, labels: np.ndarray, step: int = 100_000) -> float:
    total = 0.0
    for s in range(0, len(X), step):
        diff = X[s:s + step].astype(np.float64) - centers.astype(np.float64)[labels[s:s + step]]
        total += float(np.einsum("ij,ij->", diff, diff))
    return total


_results: dict[str, float] = {}


def _check_scale_model(est, X: np.ndarray) -> None:
    assert est.labels_.shape == (N_SCALE,) and est.labels_.dtype == np.int64
    assert est.cluster_centers_.shape == (K_SCALE, D_SCALE) and est.cluster_centers_.dtype == np.float32
    assert 0 <= est.labels_.min() and est.labels_.max() < K_SCALE
    assert (np.bincount(est.labels_, minlength=K_SCALE) > 0).mean() > 0.99
    assert est.inertia_ == pytest.approx(_objective(X, est.cluster_centers_, est.labels_), rel=1e-3)


def test_cuml_kmeans_1m_x_256_k20000(cuml_gpu, scale_data):
    from gpu_ops.cluster.kmeans import CumlKMeans

    t0 = time.perf_counter()
    est = CumlKMeans(n_clusters=K_SCALE, max_iter=ITERS_SCALE, n_init=1, seed=0).fit(scale_data)
    seconds = time.perf_counter() - t0
    print({"backend": "cuml", "seconds": round(seconds, 1), "objective": est.inertia_, "n_iter": est.n_iter_})
    _check_scale_model(est, scale_data)
    _results["cuml"] = est.inertia_


def test_faiss_gpu_kmeans_1m_x_256_k20000(faiss_gpu, scale_data):
    from gpu_ops.cluster.kmeans import FaissKMeans

    t0 = time.perf_counter()
    est = FaissKMeans(n_clusters=K_SCALE, max_iter=ITERS_SCALE, n_init=1, seed=0, gpu=True).fit(scale_data)
    seconds = time.perf_counter() - t0
    print({"backend": "faiss-gpu", "seconds": round(seconds, 1), "objective": est.inertia_, "init": est.init_})
    # k-means++ seeding of 20 000 centres on the CPU would dwarf the GPU's Lloyd iterations
    assert est.init_ == "random"
    _check_scale_model(est, scale_data)
    _results["faiss-gpu"] = est.inertia_


def test_cuml_and_faiss_gpu_agree_at_scale():
    if len(_results) < 2:
        pytest.skip(f"needs both GPU backends; ran: {sorted(_results) or 'none'}")
    a, b = _results["cuml"], _results["faiss-gpu"]
    assert max(a, b) <= 1.02 * min(a, b), _results


@pytest.fixture(scope="module")
def blobs_100k_labelled() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """100 000 x 64 points around 1000 blob centres (unit variance): X, the blob of each point,
    the centres."""
    from gpu_ops.cluster.synthetic import blob_centers

    rng = np.random.default_rng(0)
    C = blob_centers(1000, 64, seed=0)
    y = rng.integers(1000, size=100_000)
    X = C[y] + rng.normal(size=(100_000, 64)).astype(np.float32)
    return X.astype(np.float32), y, C


@pytest.fixture(scope="module")
def blobs_100k(blobs_100k_labelled) -> np.ndarray:
    return blobs_100k_labelled[0]


#: Bar for k = 1000 on the 1000 blobs, as a multiple of the objective at the generating centres.
#: A k-means that leaves a blob without a centre (one centre on two blobs, two on another) pays
#: ~2-3 % per such blob here; faiss-cpu with k-means++ seeding (25 iterations) measured 1.071
#: and 1.108 for seeds 0 and 1 on the CPU. One CPU run is no stable reference (the old bar,
#: 1.01 x one faiss-cpu run, failed whenever the CPU run happened to place its seeds well).
BLOBS_OBJECTIVE_BAR = 1.15


@pytest.mark.parametrize("backend", ["cuml", "faiss-gpu"])
def test_gpu_kmeans_k1000_recovers_the_blobs(backend, request):
    from sklearn.metrics import adjusted_rand_score

    from gpu_ops.registry import create_estimator, list_backends

    names = {s.name for s in list_backends("kmeans") if s.usable()[0]}
    if backend not in names:
        pytest.skip(f"{backend} is not usable here")
    X, y, C = request.getfixturevalue("blobs_100k_labelled")
    reference = _objective(X, C, y)  # stable: no seeding involved
    gpu, res = create_estimator("kmeans", backend, n_clusters=1000, max_iter=25, n_init=1, seed=0)
    assert res.kind == "gpu"
    gpu.fit(X)
    print({"backend": backend, "objective_vs_generating_centres": round(gpu.inertia_ / reference, 4)})
    assert gpu.inertia_ <= BLOBS_OBJECTIVE_BAR * reference, (gpu.inertia_, reference)
    assert adjusted_rand_score(y, gpu.labels_) >= 0.95


def test_streaming_kmeans_fits_its_sample_on_the_gpu(cuml_gpu, tmp_path):
    from gpu_ops.cluster.kmeans_ooc import StreamingKMeans
    from gpu_ops.cluster.synthetic import write_blob_store

    write_blob_store(tmp_path / "store", 300_000, 64, n_centers=100, seed=0, shard_rows=50_000)
    est = StreamingKMeans(n_clusters=100, memory_mb=128, backend="auto", seed=0).fit(tmp_path / "store")
    assert est.resolution_["kind"] == "gpu"
    assert est.counts_.sum() == 300_000
    assert est.inertia_ < 1.02 * 300_000 * 64  # unit-variance blobs: the optimum is ~ n * d


def test_microcluster_tree_uses_gpu_kmeans(cuml_gpu, blobs_100k):
    from gpu_ops.cluster.microcluster import MicroClusterAgglomerative

    t0 = time.perf_counter()
    est = MicroClusterAgglomerative(n_clusters=50, n_micro=1000, kmeans_backend="auto", seed=0).fit(blobs_100k)
    print({"microcluster_100k_s": round(time.perf_counter() - t0, 1)})
    assert est.kmeans_resolution_["kind"] == "gpu"
    assert est.linkage_matrix_.shape == (est.n_leaves_ - 1, 4)


def test_cuml_hdbscan_agrees_with_sklearn(cuml_gpu):
    from sklearn.datasets import make_blobs
    from sklearn.metrics import adjusted_rand_score

    from gpu_ops.cluster.hdbscan import CumlHDBSCAN, SklearnHDBSCAN

    X, _ = make_blobs(n_samples=5000, n_features=8, centers=6, cluster_std=0.6, random_state=0)
    cpu = SklearnHDBSCAN(min_cluster_size=50).fit(X)
    gpu = CumlHDBSCAN(min_cluster_size=50).fit(X)
    assert gpu.labels_.dtype == np.int64 and gpu.labels_.shape == (5000,)
    assert gpu.n_clusters_ == cpu.n_clusters_ == 6
    both = (gpu.labels_ >= 0) & (cpu.labels_ >= 0)
    assert both.mean() > 0.9
    assert adjusted_rand_score(cpu.labels_[both], gpu.labels_[both]) >= 0.95


def test_gmm_on_a_gpu_machine_runs_on_the_cpu_backend(cuml_gpu):
    from gpu_ops.registry import resolve_backend

    spec, res = resolve_backend("gmm", "gpu")
    assert spec.name == "sklearn" and res.kind == "cpu"


def test_tsne_three_components_fall_back_with_the_reason(cuml_gpu, caplog):
    import logging

    from gpu_ops.registry import resolve_backend

    with caplog.at_level(logging.WARNING, logger="gpu_ops.registry"):
        spec, res = resolve_backend("tsne", "auto", {"n_components": 3})
    assert spec.name == "opentsne"
    assert any("supports 2 components only" in r.getMessage() for r in caplog.records)


def test_gpu_nearest_centre_kernel_matches_the_cpu_kernel():
    """The GPU kernel (FAISS GPU flat index of the centroids) assigns as the CPU kernel does, and
    the streaming source with ``gpu=True`` reaches the CPU objective (written against faiss's
    ``StandardGpuResources`` / ``index_cpu_to_gpu``; not yet run on a GPU)."""
    from gpu_ops.cluster.lloyd import lloyd
    from gpu_ops.cluster.sources import ArraySource, NearestCentre, faiss_gpu_usable

    if not faiss_gpu_usable():
        pytest.skip("no GPU build of faiss that sees a GPU")
    X = np.random.default_rng(0).standard_normal((200_000, 64), dtype=np.float32)
    centroids = X[:1000]
    gpu = NearestCentre(centroids, gpu=True)
    assert gpu.device == "gpu"
    g_labels, g_dist = gpu(X)
    c_labels, c_dist = NearestCentre(centroids)(X)
    assert (g_labels == c_labels).mean() > 0.999  # float32 near-ties may differ
    np.testing.assert_allclose(g_dist, c_dist, rtol=1e-3, atol=1e-3)
    on_gpu = lloyd(ArraySource(X, gpu=True), 1000, init_centroids=centroids, max_iter=5, tol=0.0)
    on_cpu = lloyd(ArraySource(X), 1000, init_centroids=centroids, max_iter=5, tol=0.0)
    assert on_gpu.inertia == pytest.approx(on_cpu.inertia, rel=1e-3)
