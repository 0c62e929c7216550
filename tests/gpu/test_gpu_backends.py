"""GPU backends against their CPU counterparts: equal QUALITY on real data, never equal bits.

Every test is marked ``gpu`` and skips cleanly (not errors) without a CUDA device, without cuML,
or, for FAISS, without a GPU build of faiss. Tolerances:

- k-means: objective (inertia) no more than 1% above the best CPU run, and Hungarian ACC within
  0.01 of the CPU runs. On MNIST, k-means optima whose inertia differs by < 0.1% differ by up to
  ~0.02 in ACC (measured with scikit-learn over seeds 0-4: 0.542-0.554), so ACC is compared with
  the range the CPU runs span, widened by 0.01, rather than with one CPU run.
- agglomerative (single linkage, exact pairwise graph): ARI >= 0.99 against scikit-learn.
- t-SNE / UMAP: k-means ACC on the 2-D map within 0.05 of the CPU backend's map.
- PCA: explained variance ratios within 1e-3.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

from gpu_ops.metrics import evaluate

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn digits: X (1797, 64) float32, y (1797,)."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    return X.astype(np.float32), y


def _acc(y: np.ndarray, labels: np.ndarray) -> float:
    return evaluate(y, labels)["acc"]


def _inertia(X: np.ndarray, centers: np.ndarray, labels: np.ndarray) -> float:
    diff = X.astype(np.float64) - centers.astype(np.float64)[labels]
    return float(np.einsum("ij,ij->", diff, diff))


def _map_acc(embedding: np.ndarray, y: np.ndarray) -> float:
    """Hungarian ACC of k-means (k = number of classes) on a 2-D map."""
    from sklearn.cluster import KMeans

    k = len(np.unique(y))
    labels = KMeans(n_clusters=k, n_init=10, random_state=0).fit_predict(embedding)
    return _acc(y, labels)


def _check_against_cpu(gpu_model, cpu_models, X: np.ndarray, y: np.ndarray) -> None:
    n, d = X.shape
    k = gpu_model.cluster_centers_.shape[0]
    assert isinstance(gpu_model.labels_, np.ndarray) and gpu_model.labels_.dtype == np.int64
    assert gpu_model.labels_.shape == (n,)
    assert isinstance(gpu_model.cluster_centers_, np.ndarray) and gpu_model.cluster_centers_.dtype == np.float32
    assert gpu_model.cluster_centers_.shape == (k, d)
    assert isinstance(gpu_model.inertia_, float)
    # inertia_ is the objective of the labels and centres it came with
    assert gpu_model.inertia_ == pytest.approx(_inertia(X, gpu_model.cluster_centers_, gpu_model.labels_), rel=1e-3)

    best_cpu = min(m.inertia_ for m in cpu_models)
    assert gpu_model.inertia_ <= 1.01 * best_cpu, (gpu_model.inertia_, [m.inertia_ for m in cpu_models])

    cpu_accs = [_acc(y, m.labels_) for m in cpu_models]
    gpu_acc = _acc(y, gpu_model.labels_)
    assert min(cpu_accs) - 0.01 <= gpu_acc <= max(cpu_accs) + 0.01, (gpu_acc, cpu_accs)


def test_cuml_kmeans_matches_sklearn_on_mnist(cuml_gpu, mnist_test):
    from gpu_ops.cluster.kmeans import CumlKMeans, SklearnKMeans

    X, y = mnist_test
    cpu = [SklearnKMeans(n_clusters=10, n_init=1, seed=s).fit(X) for s in range(3)]
    gpu = CumlKMeans(n_clusters=10, n_init=3, seed=0).fit(X)
    _check_against_cpu(gpu, cpu, X, y)
    assert gpu.n_iter_ >= 1
    # predict on the training points reproduces the labels (ties aside)
    assert (gpu.predict(X) == gpu.labels_).mean() > 0.999


def test_cuml_kmeans_matches_faiss_cpu_on_mnist(cuml_gpu, mnist_test):
    pytest.importorskip("faiss")
    from gpu_ops.cluster.kmeans import CumlKMeans, FaissKMeans

    X, y = mnist_test
    cpu = [FaissKMeans(n_clusters=10, max_iter=100, n_init=1, seed=s, gpu=False).fit(X) for s in range(3)]
    gpu = CumlKMeans(n_clusters=10, n_init=3, seed=1).fit(X)
    _check_against_cpu(gpu, cpu, X, y)


def test_faiss_gpu_kmeans_matches_faiss_cpu_on_mnist(faiss_gpu, mnist_test):
    from gpu_ops.cluster.kmeans import FaissKMeans

    X, y = mnist_test
    cpu = [FaissKMeans(n_clusters=10, max_iter=100, n_init=1, seed=s, gpu=False).fit(X) for s in range(3)]
    gpu = FaissKMeans(n_clusters=10, max_iter=100, n_init=3, seed=0, gpu=True).fit(X)
    _check_against_cpu(gpu, cpu, X, y)


def test_auto_and_gpu_pick_cuml_when_usable(cuml_gpu):
    from gpu_ops.registry import create_estimator

    for backend in ("auto", "gpu", "cuml"):
        for op in ("kmeans", "tsne", "umap", "pca"):
            _, res = create_estimator(op, backend)
            assert (res.backend, res.kind) == ("cuml", "gpu"), (op, backend, res.as_dict())
        _, res = create_estimator("agglomerative", backend, linkage="single")
        assert (res.backend, res.kind) == ("cuml", "gpu"), res.as_dict()


def test_cuml_agglomerative_ward_falls_back_to_cpu_with_a_warning(cuml_gpu, caplog):
    from gpu_ops.cluster.agglomerative import _cuml_linkage_unsupported
    from gpu_ops.registry import resolve_backend

    with caplog.at_level(logging.INFO, logger="gpu_ops.registry"):
        spec, res = resolve_backend("agglomerative", "gpu", {"linkage": "ward"})
    assert spec.name == "sklearn"
    reason = f"cuml: {_cuml_linkage_unsupported({'linkage': 'ward'})}"
    assert res.fallbacks == [reason]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(reason in m for m in warnings), caplog.text


def test_cuml_single_linkage_agrees_with_sklearn_on_digits(cuml_gpu, digits):
    from scipy.cluster.hierarchy import fcluster
    from sklearn.metrics import adjusted_rand_score

    from gpu_ops.cluster.agglomerative import CumlAgglomerative, SklearnAgglomerative, cut_merge_tree

    X, _ = digits
    n = X.shape[0]
    cpu = SklearnAgglomerative(n_clusters=10, linkage="single").fit(X)
    gpu = CumlAgglomerative(n_clusters=10, linkage="single").fit(X)

    assert gpu.connectivity_ == "pairwise"
    assert gpu.labels_.shape == (n,) and gpu.labels_.dtype == np.int64
    assert len(np.unique(gpu.labels_)) == 10
    assert adjusted_rand_score(cpu.labels_, gpu.labels_) >= 0.99

    # children_: a binary tree over n leaves, every node merged exactly once
    assert gpu.children_.shape == (n - 1, 2) and gpu.children_.dtype == np.int64
    merged = gpu.children_.ravel()
    assert merged.min() >= 0 and merged.max() < 2 * n - 2
    assert len(np.unique(merged)) == 2 * (n - 1)

    # the GPU's own merge tree, cut at 10 clusters without heights, is the CPU's partition (and
    # cuML's labels): a check of the tree cuML built, not of a CPU recomputation
    gpu_cut = cut_merge_tree(gpu.children_, n, 10)
    assert adjusted_rand_score(cpu.labels_, gpu_cut) >= 0.99
    assert adjusted_rand_score(gpu.labels_, gpu_cut) >= 0.99

    # the dendrogram: from cuML's merge heights when it gives them, else recomputed on the CPU
    assert gpu.linkage_matrix_ is not None and gpu.linkage_matrix_.shape == (n - 1, 4)
    assert gpu.linkage_source_ == ("cuml" if gpu.distances_ is not None else "scipy-cpu")
    if gpu.linkage_source_ == "cuml":
        cut = fcluster(gpu.linkage_matrix_, t=10, criterion="maxclust")
        assert adjusted_rand_score(cpu.labels_, cut) >= 0.99
        # the GPU's merge heights are the CPU's (single linkage: the sorted MST edge lengths)
        from scipy.cluster.hierarchy import linkage as scipy_linkage

        np.testing.assert_allclose(np.sort(gpu.distances_), scipy_linkage(X, "single")[:, 2], rtol=1e-4, atol=1e-4)


def test_cuml_single_linkage_skips_the_cpu_dendrogram_above_the_limit(cuml_gpu, digits):
    from gpu_ops.cluster.agglomerative import CumlAgglomerative

    X, _ = digits
    gpu = CumlAgglomerative(n_clusters=10, linkage="single", linkage_matrix_max_n=100).fit(X)
    if gpu.distances_ is None:  # cuML did not give merge distances: no CPU fallback above the limit
        assert gpu.linkage_matrix_ is None
    assert gpu.children_.shape == (X.shape[0] - 1, 2)


def test_cuml_tsne_map_clusters_as_well_as_opentsne(cuml_gpu, digits):
    pytest.importorskip("openTSNE")
    from gpu_ops.reduce.tsne import CumlTSNE, OpenTSNE

    X, y = digits
    cpu = OpenTSNE(n_components=2, perplexity=30.0, seed=0).fit(X)
    gpu = CumlTSNE(n_components=2, perplexity=30.0, seed=0).fit(X)
    assert isinstance(gpu.embedding_, np.ndarray)
    assert gpu.embedding_.shape == (X.shape[0], 2) and gpu.embedding_.dtype == np.float32
    assert np.isfinite(gpu.embedding_).all()
    acc_cpu, acc_gpu = _map_acc(cpu.embedding_, y), _map_acc(gpu.embedding_, y)
    assert abs(acc_gpu - acc_cpu) <= 0.05, (acc_gpu, acc_cpu)


def test_cuml_umap_map_clusters_as_well_as_umap_learn(cuml_gpu, digits):
    pytest.importorskip("umap")
    from gpu_ops.reduce.umap import CumlUMAP, UmapLearn

    X, y = digits
    cpu = UmapLearn(n_components=2, n_neighbors=15, min_dist=0.1, seed=0).fit(X)
    gpu = CumlUMAP(n_components=2, n_neighbors=15, min_dist=0.1, seed=0).fit(X)
    assert isinstance(gpu.embedding_, np.ndarray)
    assert gpu.embedding_.shape == (X.shape[0], 2) and gpu.embedding_.dtype == np.float32
    assert np.isfinite(gpu.embedding_).all()
    acc_cpu, acc_gpu = _map_acc(cpu.embedding_, y), _map_acc(gpu.embedding_, y)
    assert abs(acc_gpu - acc_cpu) <= 0.05, (acc_gpu, acc_cpu)


def test_cuml_pca_explains_the_same_variance_as_sklearn(cuml_gpu, digits):
    from gpu_ops.reduce.pca import CumlPCA, SklearnPCA

    X, _ = digits
    cpu = SklearnPCA(n_components=10).fit(X)
    gpu = CumlPCA(n_components=10).fit(X)
    assert isinstance(gpu.explained_variance_ratio_, np.ndarray)
    assert gpu.explained_variance_ratio_.shape == (10,)
    np.testing.assert_allclose(gpu.explained_variance_ratio_, cpu.explained_variance_ratio_, atol=1e-3)

    assert gpu.embedding_.shape == (X.shape[0], 10) and gpu.embedding_.dtype == np.float32
    # the same projections up to the sign of each component (leading, well-separated ones)
    for j in range(5):
        a, b = gpu.embedding_[:, j].astype(np.float64), cpu.embedding_[:, j].astype(np.float64)
        cos = abs(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b))
        assert cos > 0.999, (j, cos)
    np.testing.assert_allclose(gpu.transform(X), gpu.embedding_, rtol=1e-3, atol=1e-2)
