"""The k-means data interface and its driver: the in-memory, Parquet-streaming and Dask sources
assign MNIST test pixels alike, the Lloyd driver reaches the same objective over each, and the
package holds one Lloyd loop, one nearest-centre kernel per device kind and one per-cluster sum.

Real data throughout (MNIST test split, 10 000 x 784), a real Parquet store with several parts
and batch boundaries that do not line up with them, and a real Dask cluster (in-process workers).
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from gpu_ops.cluster.lloyd import lloyd
from gpu_ops.cluster.sources import ArraySource, DaskSource, KMeansSource, NearestCentre, StoreSource, cluster_sums
from gpu_ops.errors import InputError
from gpu_ops.store import EmbeddingStore, part_files

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mnist_store(mnist_test, tmp_path_factory) -> Path:
    """MNIST test pixels as an embedding store of 4 parts (3 000 rows each, the last 1 000)."""
    X, y = mnist_test
    directory = tmp_path_factory.mktemp("mnist-store") / "store"
    store = EmbeddingStore(directory, {"extractor": "raw-pixels", "store_key": "mnist-test-raw"}, len(X), 3000)
    for shard in store.pending_shards():
        rows = store.shard_range(shard)
        store.write_shard(shard, [str(i) for i in rows], [""] * len(rows), y[rows].astype(np.int32), X[rows], [])
    store.finish()
    return directory


@pytest.fixture(scope="module")
def dask_client():
    pytest.importorskip("distributed")
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        with Client(cluster) as client:
            yield client


@pytest.fixture(scope="module")
def sources(mnist_test, mnist_store, dask_client) -> dict[str, KMeansSource]:
    X, _ = mnist_test
    return {"array": ArraySource(X, batch_rows=2048),
            "store": StoreSource(mnist_store, batch_rows=1300),
            "dask": DaskSource.from_parts(dask_client, part_files(mnist_store))}


def test_the_three_sources_assign_mnist_alike(mnist_test, sources):
    X, _ = mnist_test
    for name, source in sources.items():
        assert isinstance(source, KMeansSource), name
        assert (source.count(), source.dim()) == (10_000, 784), name
    centroids = sources["array"].subset(10, seed=3)
    for name in ("store", "dask"):  # the same rows, wherever they live
        np.testing.assert_array_equal(sources[name].subset(10, seed=3), centroids)

    # ground truth in float64
    X64, C64 = X.astype(np.float64), centroids.astype(np.float64)
    d2 = (X64 ** 2).sum(1)[:, None] - 2 * X64 @ C64.T + (C64 ** 2).sum(1)[None, :]
    exact = d2.argmin(1)
    exact_sums = np.stack([X64[exact == j].sum(0) for j in range(10)])

    ref = sources["array"].assign_to(centroids)
    assert ref.labels.dtype == np.int64 and ref.distances.dtype == np.float32
    assert (ref.labels == exact).mean() == 1.0
    np.testing.assert_array_equal(ref.counts, np.bincount(exact, minlength=10))
    np.testing.assert_allclose(ref.sums, exact_sums, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ref.distances, d2[np.arange(len(X)), exact], rtol=1e-4, atol=1e-3)
    assert ref.inertia == pytest.approx(d2.min(1).sum(), rel=1e-5)
    for name in ("store", "dask"):
        got = sources[name].assign_to(centroids)
        np.testing.assert_array_equal(got.labels, ref.labels, err_msg=name)
        np.testing.assert_array_equal(got.counts, ref.counts, err_msg=name)
        np.testing.assert_allclose(got.sums, ref.sums, rtol=1e-4, err_msg=name)
        np.testing.assert_allclose(got.distances, ref.distances, rtol=1e-4, atol=1e-3, err_msg=name)
        assert got.inertia == pytest.approx(ref.inertia, rel=1e-4), name
        # the driver's iterations ask for no labels: none travel
        lean = sources[name].assign_to(centroids, with_labels=False)
        assert lean.labels is None and lean.distances is None
        np.testing.assert_array_equal(lean.counts, ref.counts)


def test_labels_go_to_a_memory_mapped_file(mnist_store, tmp_path):
    source = StoreSource(mnist_store, batch_rows=4096)
    centroids = source.subset(5, seed=0)
    out = np.lib.format.open_memmap(tmp_path / "labels.npy", mode="w+", dtype=np.int64, shape=(10_000,))
    a = source.assign_to(centroids, labels_out=out)
    assert a.labels is out and a.distances is None
    np.testing.assert_array_equal(np.load(tmp_path / "labels.npy"), source.assign_to(centroids).labels)
    with pytest.raises(InputError, match=r"labels_out must have shape \(10000,\); got \(9,\)"):
        source.assign_to(centroids, labels_out=np.empty(9, np.int64))
    with pytest.raises(InputError, match=r"centroids must have shape \(k, 784\); got \(5, 3\)"):
        source.assign_to(np.zeros((5, 3), np.float32))


def test_lloyd_reaches_the_same_objective_over_every_source(mnist_test, sources):
    """Same k-means++ seeding (the sources draw the same seeding rows), 8 iterations: the same
    objective at every iteration within 1e-4, never rising, and the final inertia is exact."""
    X, y = mnist_test
    runs = {name: lloyd(source, 10, seeding="k-means++", seed=0, max_iter=8, tol=0.0)
            for name, source in sources.items()}
    ref = runs["array"]
    assert ref.init == "k-means++" and ref.n_iter == 8
    objectives = [s.objective for s in ref.history]
    assert all(b <= a * (1 + 1e-6) for a, b in zip(objectives, objectives[1:])), objectives
    assert ref.inertia <= objectives[-1] * (1 + 1e-6)
    diff = X.astype(np.float64) - ref.centroids.astype(np.float64)[ref.labels]
    assert ref.inertia == pytest.approx(np.einsum("ij,ij->", diff, diff), rel=1e-4)
    np.testing.assert_array_equal(ref.counts, np.bincount(ref.labels, minlength=10))
    from gpu_ops.metrics import evaluate

    assert evaluate(y, ref.labels)["acc"] > 0.5  # k-means on raw MNIST pixels: ~0.55
    for name in ("store", "dask"):
        run = runs[name]
        assert run.n_iter == ref.n_iter, name
        np.testing.assert_allclose([s.objective for s in run.history], objectives, rtol=1e-4, err_msg=name)
        assert run.inertia == pytest.approx(ref.inertia, rel=1e-4), name
        assert (run.labels == ref.labels).mean() > 0.999, name


def test_lloyd_keeps_an_empty_centroid_and_reports_it(mnist_test):
    X, _ = mnist_test
    source = ArraySource(X)
    far = np.full((1, 784), 50.0, np.float32)  # pixels are in [0, 1]: nothing is nearest to it
    init = np.vstack([source.subset(4, seed=1), far])
    seen = []
    run = lloyd(source, 5, init_centroids=init, max_iter=3, tol=0.0, on_iteration=seen.append)
    assert [s.empty for s in run.history] == [1] * run.n_iter and seen == run.history
    np.testing.assert_array_equal(run.centroids[4], far[0])
    assert run.counts[4] == 0 and run.counts.sum() == 10_000
    np.testing.assert_array_equal(init[4], far[0])  # the caller's array is not moved
    only_assign = lloyd(source, 5, init_centroids=init, max_iter=0)
    assert only_assign.n_iter == 0 and np.array_equal(only_assign.centroids, init)
    with pytest.raises(InputError, match=r"init_centroids must have shape \(5, 784\); got \(4, 784\)"):
        lloyd(source, 5, init_centroids=init[:4])
    with pytest.raises(InputError, match=r"k=10001 is larger than the number of rows \(10000\)"):
        lloyd(source, 10_001)
    with pytest.raises(InputError, match="unknown seeding 'kmeans'; expected one of: k-means\\+\\+, random"):
        lloyd(source, 5, seeding="kmeans")


def test_cluster_sums_and_the_cpu_kernel_on_digits():
    from sklearn.datasets import load_digits

    X = load_digits().data.astype(np.float32)
    centroids = X[::180][:10]
    labels, dist = NearestCentre(centroids)(X)
    d2 = ((X[:, None, :].astype(np.float64) - centroids[None].astype(np.float64)) ** 2).sum(-1)
    np.testing.assert_array_equal(labels, d2.argmin(1))
    np.testing.assert_allclose(dist, d2.min(1), rtol=1e-5, atol=1e-2)
    sums, counts = cluster_sums(X, labels, 12)  # two clusters no row belongs to
    assert sums.dtype == np.float64 and counts.tolist()[-2:] == [0, 0] and counts.sum() == len(X)
    for j in range(10):
        np.testing.assert_allclose(sums[j], X[labels == j].astype(np.float64).sum(0), rtol=1e-12)


def test_faiss_estimator_labels_come_from_the_shared_kernel(mnist_test):
    pytest.importorskip("faiss")
    from gpu_ops.cluster.kmeans import FaissKMeans

    X, _ = mnist_test
    est = FaissKMeans(n_clusters=10, max_iter=10, seed=0).fit(X)
    labels, dist = NearestCentre(est.cluster_centers_)(X)
    np.testing.assert_array_equal(est.labels_, labels)
    assert est.inertia_ == pytest.approx(float(dist.sum(dtype=np.float64)), rel=1e-9)
    np.testing.assert_array_equal(est.predict(X[:500]), labels[:500])


# ---------------------------------------------------------------- structure

def _python_files() -> list[Path]:
    return sorted((REPO / "gpu_ops").rglob("*.py"))


def _functions(path: Path):
    """(qualified name, node) of every function and method in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))

    def walk(node: ast.AST, prefix: str):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                yield name, child
                yield from walk(child, f"{name}.")
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, f"{prefix}{child.name}.")

    yield from walk(tree, "")


def _own_nodes(fn: ast.AST):
    """The nodes of ``fn``'s body, not of functions defined inside it."""
    stack = list(ast.iter_child_nodes(fn))
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def _call_name(call: ast.Call) -> str:
    f = call.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""


def _is_nearest_centre(call: ast.Call) -> bool:
    """``argmin`` along axis 1 of a rows x centres block, or a FAISS 1-nearest ``search(X, 1)``."""
    name = _call_name(call)
    consts = [a.value for a in call.args if isinstance(a, ast.Constant)]
    consts += [k.value.value for k in call.keywords if k.arg == "axis" and isinstance(k.value, ast.Constant)]
    if name == "argmin":
        return 1 in consts
    return name == "search" and len(call.args) == 2 and consts == [1]


def _is_cluster_sum(call: ast.Call) -> bool:
    """A scatter-add of rows by label: a one-hot sparse matrix, ``np.add.at``, ``index_add``."""
    f = call.func
    if isinstance(f, ast.Attribute) and f.attr == "at" and isinstance(f.value, ast.Attribute) and f.value.attr == "add":
        return True
    return _call_name(call) in ("csr_matrix", "csc_matrix", "coo_matrix", "index_add", "index_add_", "scatter_add_")


def _places(test) -> set[str]:
    return {f"{path.relative_to(REPO)}:{name}" for path in _python_files() for name, fn in _functions(path)
            if any(isinstance(n, ast.Call) and test(n) for n in _own_nodes(fn))}


#: Places that match the patterns but are not k-means: kept here with the reason.
NOT_KMEANS = {
    "gpu_ops/cluster/microcluster.py:weighted_linkage": "nearest neighbour among clusters (linkage)",
    "gpu_ops/metrics.py:contingency": "counts of (predicted, true) label pairs",
    "gpu_ops/cluster/quality.py:knn_graph": "the sparse k-nearest-neighbour graph (an adjacency matrix)",
    "gpu_ops/cluster/quality.py:merge_path": "edge weights between clusters of the neighbour graph (modularity)",
    "gpu_ops/explore/duplicates.py:group_duplicates": "the sparse graph of duplicate pairs (connected components)",
}


def _mentions(node: ast.AST, word: str) -> bool:
    return any((isinstance(n, ast.Name) and word in n.id) or (isinstance(n, ast.Attribute) and word in n.attr)
               for n in ast.walk(node))


def _is_lloyd_loop(loop: ast.AST) -> bool:
    """A loop that moves centres to the means of their rows: ``sums / counts`` (Lloyd's update
    step), or :func:`gpu_ops.deep.api.cluster_means`, inside it."""
    for n in ast.walk(loop):
        if isinstance(n, ast.Call) and _call_name(n) == "cluster_means":
            return True
        if isinstance(n, ast.BinOp) and isinstance(n.op, ast.Div) and _mentions(n.left, "sums") \
                and _mentions(n.right, "counts"):
            return True
    return False


def lloyd_loops(root: Path) -> set[str]:
    """Every function under ``root/gpu_ops`` that holds a Lloyd loop."""
    return {f"{path.relative_to(root)}:{name}" for path in sorted((root / "gpu_ops").rglob("*.py"))
            for name, fn in _functions(path)
            if any(isinstance(n, (ast.For, ast.While)) and _is_lloyd_loop(n) for n in _own_nodes(fn))}


def test_one_lloyd_loop_one_kernel_per_device_one_cluster_sum():
    """Fails when a second Lloyd loop, nearest-centre kernel or per-cluster sum appears in gpu_ops."""
    kernels = _places(_is_nearest_centre) - set(NOT_KMEANS)
    assert kernels == {"gpu_ops/cluster/sources.py:NearestCentre._cpu",
                       "gpu_ops/cluster/sources.py:NearestCentre._gpu"}, kernels
    sums = _places(_is_cluster_sum) - set(NOT_KMEANS)
    assert sums == {"gpu_ops/cluster/sources.py:cluster_sums"}, sums

    assert lloyd_loops(REPO) == {"gpu_ops/cluster/lloyd.py:lloyd"}
    # ... and the streaming and Dask k-means run it
    callers = {f"{path.relative_to(REPO)}:{name}" for path in _python_files() for name, fn in _functions(path)
               if any(isinstance(n, ast.Call) and _call_name(n) == "lloyd" for n in _own_nodes(fn))}
    assert {"gpu_ops/cluster/kmeans_ooc.py:StreamingKMeans.fit", "gpu_ops/distributed.py:dask_kmeans"} <= callers
