"""Benchmark the similar-image index: exact (the ``knn`` op's flat search) against IVF-Flat.

For each n x d: build time, the time of ``--queries`` held-out queries (k=10) in one batch and of
single queries (``ms_one_query``, the ``gpuclust similar`` case) for the exact
index and for FAISS ``IndexIVFFlat`` with ``nlist = 4 sqrt(n)`` at several ``nprobe``, and the IVF
recall@10 against the exact answer. The vectors are synthetic embeddings with structure: points of
100 Gaussian clusters in a 32-d latent space, mapped linearly to d dimensions, plus isotropic noise
(so that d = 1280 is not 1280 independent coordinates, as real CNN features are not). Prints a
Markdown table; ``--jsonl FILE`` appends one JSON line per row. The switch point in
:data:`gpu_ops.explore.search.APPROX_MIN_ROWS` was chosen from these figures (BENCHMARKS.md).

    .venv/bin/python bench/similar.py --n 10000,50000,200000 --d 64,1280
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.cluster import emit, env_info

LATENT = 32
CLUSTERS = 100


def embeddings(n: int, d: int, seed: int = 0) -> np.ndarray:
    """(n, d) float32: 100 clusters in a 32-d latent space, mapped to d dimensions, plus noise."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=3.0, size=(CLUSTERS, LATENT))
    mixing = np.random.default_rng(12345).normal(size=(LATENT, d)) / np.sqrt(LATENT)
    out = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, 50_000):
        m = min(50_000, n - s)
        z = centres[rng.integers(CLUSTERS, size=m)] + rng.normal(size=(m, LATENT))
        out[s:s + m] = z @ mixing + rng.normal(scale=0.3, size=(m, d))
    return out


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of the true k neighbours among the k found."""
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def _one_at_a_time(search: Any, Q: np.ndarray, repeats: int = 20) -> float:
    """Milliseconds per query when queries come one at a time (``gpuclust similar``)."""
    t0 = time.perf_counter()
    for i in range(repeats):
        search(Q[i:i + 1])
    return round(1000 * (time.perf_counter() - t0) / repeats, 3)


def bench_one(n: int, d: int, queries: int, nprobes: list[int], backend: str, k: int = 10) -> list[dict[str, Any]]:
    from gpu_ops.explore.search import build_ivf, nlist_for
    from gpu_ops.registry import create_estimator

    data = embeddings(n + queries, d)
    X, Q = data[:n], data[n:]
    create_estimator("knn", backend, metric="euclidean")[0].fit(X[:100]).kneighbors(Q[:2], n_neighbors=1)  # imports
    t0 = time.perf_counter()
    knn, res = create_estimator("knn", backend, metric="euclidean")
    knn.fit(X)
    t1 = time.perf_counter()
    _, truth = knn.kneighbors(Q, n_neighbors=k)
    t2 = time.perf_counter()
    rows = [{"n": n, "d": d, "index": f"exact ({res.backend})", "nlist": "", "nprobe": "",
             "build_s": round(t1 - t0, 3), "query_s": round(t2 - t1, 3), "ms_per_query": round(1000 * (t2 - t1) / queries, 3),
             "ms_one_query": _one_at_a_time(lambda q: knn.kneighbors(q, n_neighbors=k), Q), "recall@10": 1.0}]
    print(rows[-1], flush=True)
    nlist = nlist_for(n)
    t0 = time.perf_counter()
    index = build_ivf(X, nlist, seed=0, gpu=res.kind == "gpu")
    build = time.perf_counter() - t0
    for nprobe in nprobes:
        index.nprobe = min(nprobe, nlist)
        t0 = time.perf_counter()
        _, found = index.search(Q, k)
        took = time.perf_counter() - t0
        rows.append({"n": n, "d": d, "index": "ivf-flat", "nlist": nlist, "nprobe": index.nprobe,
                     "build_s": round(build, 3), "query_s": round(took, 3),
                     "ms_per_query": round(1000 * took / queries, 3),
                     "ms_one_query": _one_at_a_time(lambda q: index.search(q, k), Q),
                     "recall@10": round(recall(found, truth), 4)})
        print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", default="10000,50000,200000")
    parser.add_argument("--d", default="64,1280")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--nprobe", default="8,16,32,64")
    parser.add_argument("--backend", default="auto", help="knn backend of the exact search (auto, cpu, gpu, a name)")
    parser.add_argument("--jsonl")
    args = parser.parse_args(argv)
    env = env_info()
    print(f"# {env}", flush=True)
    rows = []
    for d in (int(v) for v in args.d.split(",")):
        for n in (int(v) for v in args.n.split(",")):
            rows += bench_one(n, d, args.queries, [int(v) for v in args.nprobe.split(",")], args.backend)
    emit(rows, ["n", "d", "index", "nlist", "nprobe", "build_s", "query_s", "ms_per_query", "ms_one_query",
                "recall@10"], args.jsonl, env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
