"""What ``umap-graph`` adds to ``umap-kmeans`` on digits (seed 0), side by side in one process.

Usage: ``PYTHONPATH=. python bench/umap_graph_cost.py`` (figures: BENCHMARKS.md, "The demo").
"""

from __future__ import annotations

import time
import warnings

import numpy as np
from sklearn.datasets import load_digits

from gpu_ops.cluster.quality import GRAPH_NEIGHBORS, knn_graph, merge_path, micro_clusters
from gpu_ops.registry import create_estimator


def main() -> None:
    warnings.filterwarnings("ignore")
    X = (load_digits().data / 16).astype(np.float32)
    reducer, _ = create_estimator("umap", "cpu", n_components=10, n_neighbors=15, min_dist=0.0, seed=0)
    reducer.fit(X[:300])  # numba compilation, not part of the comparison
    t = time.perf_counter()
    U = reducer.fit(X).embedding_
    t_umap = time.perf_counter() - t
    t = time.perf_counter()
    kmeans, _ = create_estimator("kmeans", "cpu", n_clusters=10, n_init=10, seed=0)
    kmeans.fit(U)
    t_kmeans = time.perf_counter() - t
    t = time.perf_counter()
    graph = knn_graph(X, GRAPH_NEIGHBORS, backend="cpu")
    micro, _ = create_estimator("kmeans", "cpu", n_clusters=micro_clusters(10, len(X)), n_init=3, seed=0)
    labels = np.asarray(micro.fit(U).labels_)
    merge_path(graph, labels, 10).labels(labels, 10)
    t_graph = time.perf_counter() - t
    print(f"umap fit {t_umap:.2f} s; k-means k=10 n_init=10 {t_kmeans:.2f} s; "
          f"graph + micro-clusters + merges {t_graph:.2f} s")


if __name__ == "__main__":
    main()
