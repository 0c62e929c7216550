"""Which label-free score tracks accuracy? Curves over k on the labelled sets (BENCHMARKS.md).

For each set and each k in a range, several candidate partitions are scored without labels and
with Hungarian ACC:

- ``kmeans-silhouette``: k-means on the features, silhouette on the features (the old ``k=auto``);
- ``kmeans-modularity``: the same partitions, modularity on the features' 10-NN graph;
- ``merge-modularity``: k-means micro-clusters merged by modularity (:func:`merge_path`) on the
  features, the graph on the features (what ``k=auto`` now does);
- ``umap-silhouette`` / ``umap-ch`` / ``umap-db``: k-means on a 10-d UMAP of the features,
  silhouette, Calinski-Harabasz and (negated) Davies-Bouldin on that UMAP space;
- ``umap-merge-modularity``: micro-clusters on the UMAP space, merged on the features' graph
  (what the ``umap-graph`` algorithm does).

Usage::

    python -m bench.quality digits usps coil20 mnist-raw [npz:FILE ...] --rows 5000 --seed 0

``parquet:DIR`` takes a feature store (e.g. autoencoder codes). One table row per set and score:
the k it maximises, and ACC at that k.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np

warnings.filterwarnings("ignore")


def load(name: str, rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Features (float32) and labels of a named set, at most ``rows`` of them (a uniform sample)."""
    if name == "digits":
        from sklearn.datasets import load_digits

        X, y = load_digits(return_X_y=True)
        X = X / 16.0
    elif name == "usps":
        from gpu_ops.data import load_dataset

        ds = load_dataset("usps:/work/shared/data/usps/usps.h5", "all")
        X, y = np.asarray(ds.items).reshape(len(ds.labels), -1) / 255.0, np.asarray(ds.labels)
    elif name == "coil20":
        from scipy.io import loadmat

        mat = loadmat("/work/shared/data/coil20/COIL20.mat")
        X, y = mat["X"] / 255.0, mat["Y"].ravel() - 1
    elif name == "mnist-raw":
        from gpu_ops.data import load_dataset

        ds = load_dataset("idx:/work/shared/data/mnist", "test")
        X, y = np.asarray(ds.items).reshape(len(ds.labels), -1) / 255.0, np.asarray(ds.labels)
    elif name.startswith("parquet:"):
        from gpu_ops.store import read_embeddings

        t = read_embeddings(Path(name.partition(":")[2]))
        X, y = t.embeddings, t.labels
    else:
        raise SystemExit(f"unknown set {name}")
    X = np.asarray(X, dtype=np.float32)
    y = np.asarray(y)
    if len(y) > rows:
        keep = np.sort(np.random.default_rng(seed).choice(len(y), rows, replace=False))
        X, y = X[keep], y[keep]
    return X, y


def curves(X: np.ndarray, y: np.ndarray, ks: list[int], seed: int) -> dict[str, dict[int, tuple[float, float]]]:
    """score name -> {k: (score, ACC)}."""
    from sklearn.metrics import calinski_harabasz_score, davies_bouldin_score

    from gpu_ops.cluster.quality import knn_graph, merge_path, micro_clusters, modularity, silhouette
    from gpu_ops.metrics import evaluate
    from gpu_ops.registry import create_estimator

    def kmeans(Z: np.ndarray, k: int, n_init: int = 3) -> np.ndarray:
        est, _ = create_estimator("kmeans", "cpu", n_clusters=k, n_init=n_init, max_iter=100, seed=seed)
        return np.asarray(est.fit(Z).labels_)

    def acc(labels: np.ndarray) -> float:
        return float(evaluate(y, labels)["acc"])

    graph = knn_graph(X, 10, backend="cpu")
    reducer, _ = create_estimator("umap", "cpu", n_components=10, n_neighbors=15, min_dist=0.0, seed=seed)
    U = reducer.fit(X).embedding_
    out: dict[str, dict[int, tuple[float, float]]] = {s: {} for s in (
        "kmeans-silhouette", "kmeans-modularity", "merge-modularity", "umap-silhouette", "umap-ch", "umap-db",
        "umap-merge-modularity")}
    micro = micro_clusters(max(ks), len(y))
    paths = {"merge-modularity": (kmeans(X, micro), None), "umap-merge-modularity": (kmeans(U, micro), None)}
    paths = {name: (m, merge_path(graph, m, min(ks))) for name, (m, _) in paths.items()}
    for k in ks:
        lx = kmeans(X, k)
        out["kmeans-silhouette"][k] = (silhouette(X, lx, seed=seed), acc(lx))
        out["kmeans-modularity"][k] = (modularity(graph, lx), acc(lx))
        lu = kmeans(U, k)
        out["umap-silhouette"][k] = (silhouette(U, lu, seed=seed), acc(lu))
        out["umap-ch"][k] = (float(calinski_harabasz_score(U, lu)), acc(lu))
        out["umap-db"][k] = (-float(davies_bouldin_score(U, lu)), acc(lu))
        for name, (m, path) in paths.items():
            lm = path.labels(m, k)
            out[name][k] = (path.modularity[k], acc(lm))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sets", nargs="+")
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--k-range", type=int, nargs=2, default=(5, 15))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    ks = list(range(args.k_range[0], args.k_range[1] + 1))
    results = {}
    print("| set | true k | score | chosen k | ACC at chosen | best ACC (k) |\n|---|---|---|---|---|---|")
    for name in args.sets:
        t0 = time.perf_counter()
        X, y = load(name, args.rows, args.seed)
        res = curves(X, y, ks, args.seed)
        results[name] = {s: {str(k): v for k, v in c.items()} for s, c in res.items()}
        for score, c in res.items():
            chosen = max(c, key=lambda k: c[k][0])
            best = max(c, key=lambda k: c[k][1])
            print(f"| {name} (n={len(y)}) | {len(np.unique(y))} | {score} | {chosen} | {c[chosen][1]:.3f} | "
                  f"{c[best][1]:.3f} ({best}) |", flush=True)
        print(f"<!-- {name}: {time.perf_counter() - t0:.0f} s -->", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
