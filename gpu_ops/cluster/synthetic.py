"""Synthetic embedding stores for tests and benchmarks: Gaussian blobs written shard by shard."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gpu_ops.store import EmbeddingStore, StoreSummary


def blob_centers(n_centers: int, dim: int, seed: int = 0, spread: float = 10.0) -> np.ndarray:
    """Centres drawn uniformly in [-spread, spread]^dim, like ``make_blobs``; (n_centers, dim) float32."""
    rng = np.random.default_rng(seed)
    return rng.uniform(-spread, spread, size=(n_centers, dim)).astype(np.float32)


def write_blob_store(directory: str | Path, n: int, dim: int, n_centers: int = 100, *, seed: int = 0,
                     shard_rows: int = 100_000, cluster_std: float = 1.0) -> StoreSummary:
    """Write ``n`` rows of ``dim``-d Gaussian blobs as an embedding store without ever holding
    more than one shard (``shard_rows`` rows) in memory. Labels are the blob ids."""
    centers = blob_centers(n_centers, dim, seed)
    meta = {"extractor": "synthetic-blobs", "store_key": f"blobs-{n}-{dim}-{n_centers}-{seed}-{cluster_std}"}
    store = EmbeddingStore(Path(directory), meta, n, shard_rows)
    for shard in store.pending_shards():
        rows = store.shard_range(shard)
        rng = np.random.default_rng([seed, shard])
        y = rng.integers(n_centers, size=len(rows))
        X = centers[y] + rng.normal(scale=cluster_std, size=(len(rows), dim)).astype(np.float32)
        ids = [str(i) for i in rows]
        store.write_shard(shard, ids, [""] * len(rows), y.astype(np.int32), X, [])
    return store.finish()
