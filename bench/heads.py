"""Clustering heads across seeds on a labelled store: k-means, the SCAN head kept by its loss, and
the consensus of the same heads (one training per seed and setting gives both).

    python -m bench.heads --store <store dir> --seeds 0 1 2 3 4 5 --hidden 0 256

Prints one row per seed and setting, then the minimum and mean, as Markdown.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import gpu_ops  # noqa: F401  (the OpenMP wait policy, before torch)
from gpu_ops.heads import fit_head
from gpu_ops.metrics import evaluate
from gpu_ops.registry import create_estimator
from gpu_ops.store import read_embeddings


def kmeans_acc(X: np.ndarray, y: np.ndarray, k: int, seed: int) -> float:
    """ACC of the pipeline's k-means (10 restarts, 100 iterations) on ``X`` (n, d)."""
    est, _ = create_estimator("kmeans", "cpu", n_clusters=k, n_init=10, max_iter=100, seed=seed)
    est.fit(X)
    return evaluate(y, est.labels_)["acc"]


def heads_accs(X: np.ndarray, y: np.ndarray, k: int, seed: int, hidden: int) -> tuple[float, float, float]:
    """(ACC of the lowest-loss head alone, ACC of the consensus, training seconds) of one SCAN run."""
    t0 = time.perf_counter()
    res = fit_head("scan", X, k, seed=seed, device="cpu", labels=y, hidden=hidden, consensus=True)
    kept_alone = [h["acc"] for h in res.history if h["phase"] == "scan"][-1]
    return kept_alone, res.metrics["acc"], time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True, help="an embedding store with labels (gpuclust's cache or parquet:DIR)")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--hidden", type=int, nargs="+", default=[256], help="hidden units of the heads (0: linear)")
    args = parser.parse_args()
    table = read_embeddings(args.store)
    X, y = np.ascontiguousarray(table.embeddings, dtype=np.float32), np.asarray(table.labels)
    rows = []
    print("| seed | k-means | hidden | kept by SCAN loss | consensus | consensus - k-means | training s |")
    print("|---|---|---|---|---|---|---|")
    for seed in args.seeds:
        km = kmeans_acc(X, y, args.k, seed)
        for hidden in args.hidden:
            kept, consensus, seconds = heads_accs(X, y, args.k, seed, hidden)
            rows.append((hidden, km, kept, consensus))
            print(f"| {seed} | {km:.4f} | {hidden} | {kept:.4f} | {consensus:.4f} | {consensus - km:+.3f} | {seconds:.0f} |",
                  flush=True)
    for hidden in args.hidden:
        got = np.array([r[1:] for r in rows if r[0] == hidden])
        margin = got[:, 2] - got[:, 0]
        print(f"| min / mean | {got[:, 0].min():.3f} / {got[:, 0].mean():.3f} | {hidden} | {got[:, 1].min():.3f} / "
              f"{got[:, 1].mean():.3f} | {got[:, 2].min():.3f} / {got[:, 2].mean():.3f} | {margin.min():+.3f} / "
              f"{margin.mean():+.3f} | |")


if __name__ == "__main__":
    main()
