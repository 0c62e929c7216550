"""N2D (McConville et al., 2020): autoencoder embedding -> UMAP manifold -> Gaussian mixture.

UMAP runs through the backend registry (cuML on a GPU, umap-learn on the CPU); the mixture is
scikit-learn's ``GaussianMixture`` with full covariances, or k-means through the registry.

Which manifold a seed gives decides most of the final accuracy (on MNIST-test one seed's UMAP put
200 of the 9s with the 4s, and IDEC, which only sharpens its start, ended below it). So
:func:`best_manifold_partition` makes several starts (UMAP + mixture, each with its own seed) and
keeps the one with the best label-free score: the silhouette of its partition on its own manifold.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock

from gpu_ops.deep._common import quick_kmeans, torch_threads_kept
from gpu_ops.fsutil import atomic_path

log = logging.getLogger("gpu_ops.deep")

N2D_CLUSTERERS = ("gmm", "kmeans")


#: Rows the silhouette of a start is computed on (a seeded sample; the same rows for every start).
SILHOUETTE_SAMPLE = 4000
#: Seed offset between two starts.
START_SEED_STEP = 1000


@dataclass(frozen=True)
class Start:
    """One N2D start: its seed, partition, manifold and label-free scores."""

    seed: int
    labels: np.ndarray
    manifold: np.ndarray
    silhouette: float
    info: dict[str, Any]
    agreement: float | None = None  #: mean ARI with the other starts' partitions

    def record(self) -> dict[str, Any]:
        """The start's scores, as the history keeps them."""
        return {"seed": self.seed, "silhouette": self.silhouette, "agreement": self.agreement}


def partition_silhouette(manifold: np.ndarray, labels: np.ndarray, seed: int = 0,
                         sample: int = SILHOUETTE_SAMPLE) -> float:
    """Silhouette of ``labels`` on ``manifold`` over a seeded sample of ``sample`` rows; -1 for a
    partition with fewer than two clusters in the sample (nothing separated)."""
    from sklearn.metrics import silhouette_score

    n = len(labels)
    rows = np.sort(np.random.default_rng(seed).choice(n, size=min(n, sample), replace=False))
    if len(np.unique(labels[rows])) < 2 or len(np.unique(labels[rows])) >= len(rows):
        return -1.0
    return float(silhouette_score(manifold[rows], labels[rows]))


def select_start(starts: list[Start]) -> int:
    """Index of the start with the highest silhouette (the first of equals)."""
    if not starts:
        raise ValueError("select_start needs at least one start")
    return int(np.argmax([s.silhouette for s in starts]))


def best_manifold_partition(z: np.ndarray, n_clusters: int, *, starts: int = 1, seed: int = 0,
                            **options: Any) -> tuple[int, list[Start]]:
    """``starts`` N2D partitions of ``z`` (start i seeded ``seed + i * START_SEED_STEP``), each scored
    by :func:`partition_silhouette`; returns (index of the chosen one, every start).

    ``options``: :func:`manifold_cluster`'s keywords.
    """
    made: list[Start] = []
    for i in range(max(1, int(starts))):
        s = int(seed) + i * START_SEED_STEP
        labels, manifold, info = manifold_cluster(z, n_clusters, seed=s, **options)
        made.append(Start(seed=s, labels=labels, manifold=manifold,
                          silhouette=partition_silhouette(manifold, labels, seed=int(seed)), info=info))
    if len(made) > 1:
        from sklearn.metrics import adjusted_rand_score

        made = [dataclasses.replace(a, agreement=float(np.mean(
            [adjusted_rand_score(a.labels, b.labels) for b in made if b is not a]))) for a in made]
    chosen = select_start(made)
    if len(made) > 1:
        log.info("N2D: %d starts, silhouettes %s; keeping start %d (seed %d)", len(made),
                 ", ".join(f"{m.silhouette:.4f}" for m in made), chosen + 1, made[chosen].seed)
    return chosen, made


def reused_manifold_partition(z: np.ndarray, n_clusters: int, cache_dir: Path | str | None, *, starts: int = 1,
                              seed: int = 0, **options: Any) -> tuple[int, list[Start], Path | None]:
    """:func:`best_manifold_partition`, kept in ``cache_dir`` (beside the autoencoder checkpoints)
    and reused when the same embedding ``z`` (n, d), k, seed and options come again: a run of
    ``n2d`` and ``idec`` on one autoencoder makes the UMAP starts once, and so does a rerun.
    Returns (chosen, starts, the file reused or None). Without ``cache_dir`` nothing is kept."""
    if cache_dir is None:
        return (*best_manifold_partition(z, n_clusters, starts=starts, seed=seed, **options), None)
    z = np.ascontiguousarray(z, dtype=np.float32)
    key = hashlib.sha256(z.tobytes() + json.dumps([list(z.shape), int(n_clusters), int(starts), int(seed), options],
                                                   sort_keys=True, default=str).encode()).hexdigest()[:24]
    path = Path(cache_dir) / f"n2d-starts-{key}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path.with_suffix(".lock")), thread_local=False):  # a concurrent task waits, then reuses
        return _reuse_or_make(path, z, n_clusters, starts, seed, options)


def _reuse_or_make(path: Path, z: np.ndarray, n_clusters: int, starts: int, seed: int,
                   options: dict[str, Any]) -> tuple[int, list[Start], Path | None]:
    if path.exists():
        with np.load(path, allow_pickle=False) as saved:
            meta = json.loads(str(saved["meta"]))
            made = [Start(seed=m["seed"], labels=saved[f"labels{i}"], manifold=saved[f"manifold{i}"],
                          silhouette=m["silhouette"], info=m["info"], agreement=m["agreement"])
                    for i, m in enumerate(meta["starts"])]
        log.info("N2D: the %d start(s) of this embedding reused from %s", len(made), path)
        return int(meta["chosen"]), made, path
    chosen, made = best_manifold_partition(z, n_clusters, starts=starts, seed=seed, **options)
    meta = {"chosen": chosen, "starts": [{**m.record(), "info": m.info} for m in made]}
    arrays = {f"{kind}{i}": getattr(m, kind) for i, m in enumerate(made) for kind in ("labels", "manifold")}
    with atomic_path(path) as tmp:
        np.savez(tmp, meta=np.asarray(json.dumps(meta, default=str)), **arrays)
    return chosen, made, None


def manifold_cluster(z: np.ndarray, n_clusters: int, *, seed: int = 0, n_components: int = 10,
                     n_neighbors: int = 20, min_dist: float = 0.0, clusterer: str = "gmm",
                     backend: str = "auto", gmm_n_init: int = 1) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """UMAP ``z`` (n, d) to ``n_components`` dims, then cluster it.

    Returns (labels (n,) int64, manifold (n, n_components) float32, info with the backends used).
    torch's CPU thread count is left as it was (see :func:`torch_threads_kept`).
    """
    with torch_threads_kept():
        return _umap_then_cluster(z, n_clusters, seed=seed, n_components=n_components, n_neighbors=n_neighbors,
                                  min_dist=min_dist, clusterer=clusterer, backend=backend, gmm_n_init=gmm_n_init)


def _umap_then_cluster(z: np.ndarray, n_clusters: int, *, seed: int, n_components: int, n_neighbors: int,
                       min_dist: float, clusterer: str, backend: str,
                       gmm_n_init: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    from gpu_ops.registry import create_estimator

    if clusterer not in N2D_CLUSTERERS:
        from gpu_ops.errors import choice_error

        raise choice_error("N2D clusterer", clusterer, N2D_CLUSTERERS)
    n_neighbors = int(min(n_neighbors, max(2, len(z) - 1)))
    est, res = create_estimator("umap", backend, n_components=int(n_components), n_neighbors=n_neighbors,
                                min_dist=float(min_dist), seed=int(seed))
    manifold = np.asarray(est.fit(np.ascontiguousarray(z, dtype=np.float32)).embedding_, dtype=np.float32)
    info: dict[str, Any] = {"umap_backend": res.as_dict()}
    if clusterer == "gmm":
        from sklearn.mixture import GaussianMixture

        gmm = GaussianMixture(n_components=int(n_clusters), covariance_type="full", random_state=int(seed),
                              n_init=int(gmm_n_init))
        labels = gmm.fit(manifold).predict(manifold).astype(np.int64)
        info["clusterer"] = "sklearn GaussianMixture(full)"
    else:
        labels, _ = quick_kmeans(manifold, n_clusters, seed, n_init=10, max_iter=100, backend=backend)
        info["clusterer"] = "kmeans"
    return labels, manifold, info
