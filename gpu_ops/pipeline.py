"""The pipeline's stages as plain functions: each takes paths and configs and returns a small
JSON-friendly dict. :mod:`flows.tasks` wraps each one in a Prefect task; nothing here knows Prefect."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import yaml

from gpu_ops.cluster.choose_k import choose_k
from gpu_ops.config import DEEP_ALGORITHMS, RunConfig
from gpu_ops.data import load_dataset
from gpu_ops.errors import InputError
from gpu_ops.features.autoencoder import RECONSTRUCTIONS
from gpu_ops.features.extract import (
    build_extractor,
    dataset_directory,
    extract_options,
    extract_to_store,
    open_dataset,
)
from gpu_ops.metrics import evaluate
from gpu_ops.placement import placement_for
from gpu_ops.registry import create_estimator
from gpu_ops.store import atomic_write_json, atomic_write_table, read_embeddings

log = logging.getLogger(__name__)


def extract_params(cfg: RunConfig) -> dict[str, Any]:
    """The settings that decide a store's content: the extract stage's (cacheable) inputs."""
    keys = ("dataset", "split", "limit", "extractor", "weights", "image_size", "batch_size", "num_workers", "seed",
            "shard_rows", "decode_on_device", "latent_dim", "ae_epochs")
    params = {k: getattr(cfg, k) for k in keys}
    params["device"] = placement_for(cfg, "extract").torch_device
    params["cache_root"] = str(cfg.cache_root())
    return params


def dataset_fingerprint(params: dict[str, Any]) -> str:
    """Content hash of the dataset selection an extract run would read."""
    return open_dataset(params).fingerprint()


def extract_stage(params: dict[str, Any], on_shard: Callable[[int, int], None] | None = None,
                  progress: bool = True) -> dict[str, Any]:
    """Embed the dataset into the Parquet store (resuming a partial one); return its summary."""
    t0 = time.perf_counter()
    dataset = open_dataset(params)
    extractor = build_extractor(params, dataset, progress=progress)
    summary = extract_to_store(dataset, extractor, Path(params["cache_root"]) / "stores", on_shard=on_shard,
                               progress=progress, **extract_options(params, params["device"]))
    return {"store": summary.directory, "rows": summary.rows, "dim": summary.dim,
            "quarantined": summary.quarantined, "device": params["device"], "extractor": params["extractor"],
            "seconds": round(time.perf_counter() - t0, 3)}


def _k_for(cfg: RunConfig, X: np.ndarray, staging: Path) -> int:
    if cfg.k != "auto":
        return int(cfg.k)
    saved = staging / "k_selection.json"
    if saved.is_file():  # chosen once per run, shared by every algorithm
        return int(json.loads(saved.read_text())["chosen_k"])
    selection = choose_k(X, *cfg.k_range, backend=cfg.backend_for("kmeans"), seed=cfg.seed)
    atomic_write_json(saved, selection.as_dict())
    log.info("k=auto chose k=%d (silhouette); elbow at k=%d", selection.chosen_k, selection.elbow_k)
    return selection.chosen_k


def images_for_ids(dataset: Any, image_ids: list[str], size: int) -> np.ndarray:
    """The dataset's images in the order of ``image_ids`` as one uint8 array (n, h, w[, c]).

    In-memory datasets are indexed directly; image folders are decoded and resized to ``size``.
    """
    position = {image_id: i for i, image_id in enumerate(dataset.image_ids)}
    index = np.array([position[i] for i in image_ids])
    items = getattr(dataset, "items", None)
    if items is not None and items.ndim >= 3:
        return np.asarray(items[index])
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(dataset.load(int(i))).convert("RGB").resize((size, size)))
                     for i in index])


def deep_cluster_stage(store: str, cfg: RunConfig, algorithm: str, staging: str) -> dict[str, Any]:
    """Deep clustering (``dkm``, ``dec``, ``idec``, ``n2d``) of the dataset's images, in store order.

    The autoencoder is pretrained once per data + settings and reused (checkpoints beside the stores).
    """
    from gpu_ops.deep import fit_deep

    t0 = time.perf_counter()
    table = read_embeddings(Path(store))
    dataset = load_dataset(cfg.dataset, cfg.split, cfg.limit)
    if dataset.item_kind != "image":
        raise InputError(f"{algorithm} clusters images; {cfg.dataset} holds vectors (use kmeans or umap-kmeans)")
    images = images_for_ids(dataset, table.image_ids, cfg.image_size or 32)
    k = int(cfg.k) if cfg.k != "auto" else _k_for(cfg, table.embeddings, Path(staging))
    placed = placement_for(cfg, algorithm)
    overrides: dict[str, Any] = {"latent_dim": cfg.latent_dim}
    if cfg.deep_epochs is not None:
        overrides["pretrain_epochs"] = cfg.deep_epochs
    result = fit_deep(algorithm, images, k, seed=cfg.seed, device=placed.torch_device, labels=table.labels,  # type: ignore[arg-type]
                      checkpoint_dir=dataset_directory(Path(cfg.cache_root()) / "stores", dataset) / "deep",
                      backend=cfg.backend_for("kmeans"), **overrides)
    labels_path = Path(staging) / f"labels-{algorithm}.npy"
    np.save(labels_path, result.labels.astype(np.int64))
    atomic_write_json(Path(staging) / f"history-{algorithm}.json", result.history, sort_keys=False)
    backend = f"torch-{result.device}"
    resolution = {"op": algorithm, "requested": placed.requested, "backend": backend,
                  "kind": "gpu" if "cuda" in backend else "cpu", "reason": f"deep clustering in torch on {result.device}; "
                  f"{placed.reason}", "fallbacks": list(placed.fallbacks), "skipped": [], "stage": algorithm}
    return {"algorithm": algorithm, "labels": str(labels_path), "k": k, "backend": backend,
            "resolutions": [resolution], "seconds": round(time.perf_counter() - t0, 3)}


def cluster_stage(store: str, cfg: RunConfig, algorithm: str, staging: str) -> dict[str, Any]:
    """Cluster the store's embeddings with ``algorithm``; labels go to ``staging/labels-<algo>.npy``."""
    if algorithm in DEEP_ALGORITHMS:
        return deep_cluster_stage(store, cfg, algorithm, staging)
    t0 = time.perf_counter()
    if algorithm == "kmeans" and cfg.memory_mb is not None:  # out-of-core: stream the store
        from gpu_ops.cluster.kmeans_ooc import cluster_store_stage

        return cluster_store_stage(store, cfg, staging)
    X = read_embeddings(Path(store)).embeddings
    k = _k_for(cfg, X, Path(staging)) if algorithm != "hdbscan" else 0  # HDBSCAN finds k itself
    if k > X.shape[0]:
        raise InputError(f"k={k} is larger than the number of images ({X.shape[0]})")
    resolutions = []
    space = X
    if algorithm == "umap-kmeans":
        reducer, res = create_estimator("umap", cfg.backend_for("umap"), n_components=min(cfg.umap_dims, X.shape[1]),
                                        n_neighbors=min(15, X.shape[0] - 1), min_dist=0.0, seed=cfg.seed)
        resolutions.append({**res.as_dict(), "stage": algorithm})
        space = reducer.fit(X).embedding_
    if algorithm in ("kmeans", "umap-kmeans"):
        est, res = create_estimator("kmeans", cfg.backend_for("kmeans"), n_clusters=k, n_init=cfg.n_init,
                                    max_iter=cfg.max_iter, seed=cfg.seed)
    elif algorithm == "hdbscan":
        est, res = create_estimator("hdbscan", cfg.backend_for("hdbscan"), min_cluster_size=cfg.min_cluster_size)
    elif algorithm == "gmm":
        est, res = create_estimator("gmm", cfg.backend_for("gmm"), n_clusters=k, covariance_type=cfg.covariance_type,
                                    max_iter=cfg.max_iter, seed=cfg.seed)
    else:
        cut = {"n_clusters": k} if cfg.distance_threshold is None else {"n_clusters": None,
                                                                         "distance_threshold": cfg.distance_threshold}
        est, res = create_estimator("agglomerative", cfg.backend_for("agglomerative"), linkage=cfg.linkage,
                                    seed=cfg.seed, **cut)
    resolutions.append({**res.as_dict(), "stage": algorithm})
    est.fit(space)
    k = int(getattr(est, "n_clusters_", k))  # found by HDBSCAN or a distance cut
    labels_path = Path(staging) / f"labels-{algorithm}.npy"
    np.save(labels_path, est.labels_.astype(np.int64))
    extra = {}
    if getattr(est, "linkage_matrix_", None) is not None:
        np.save(Path(staging) / f"linkage-{algorithm}.npy", est.linkage_matrix_)
        extra["linkage"] = str(Path(staging) / f"linkage-{algorithm}.npy")
    return {"algorithm": algorithm, "labels": str(labels_path), "k": k, "backend": res.backend,
            "resolutions": resolutions, "seconds": round(time.perf_counter() - t0, 3), **extra}


def reduce_stage(store: str, cfg: RunConfig, staging: str) -> dict[str, Any]:
    """2-D map of the store's embeddings with ``cfg.reducer``; saved to ``staging/map2d.npy``."""
    t0 = time.perf_counter()
    if cfg.reducer == "none":
        return {"map": None, "backend": None, "resolutions": [], "seconds": 0.0}
    X = read_embeddings(Path(store)).embeddings
    params: dict[str, Any] = {"n_components": 2, "seed": cfg.seed}
    if cfg.reducer == "umap":
        params.update(n_neighbors=min(15, X.shape[0] - 1), min_dist=0.1)
    elif cfg.reducer == "tsne":
        params.update(perplexity=min(30.0, max(2.0, (X.shape[0] - 1) / 3.5)))
    est, res = create_estimator(cfg.reducer, cfg.backend_for(cfg.reducer), **params)
    xy = est.fit(X).embedding_
    path = Path(staging) / "map2d.npy"
    np.save(path, xy.astype(np.float32))
    if cfg.reducer == "tsne" and cfg.tsne_perplexities:  # several perplexities: the report draws them
        from gpu_ops.reduce.tsne import SWEEP_FILE, perplexity_sweep

        sweep = perplexity_sweep(X, cfg.tsne_perplexities, backend=cfg.backend_for("tsne"), seed=cfg.seed)
        sweep.save(Path(staging) / SWEEP_FILE, read_embeddings(Path(store)).image_ids)
    return {"map": str(path), "backend": res.backend, "resolutions": [{**res.as_dict(), "stage": "map"}],
            "seconds": round(time.perf_counter() - t0, 3)}


def evaluate_stage(store: str, clusters: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """ACC / NMI / ARI per algorithm when the store has labels; k, backend and cluster sizes always."""
    labels_true = read_embeddings(Path(store)).labels
    out: dict[str, dict[str, Any]] = {}
    for c in clusters:
        pred = np.load(c["labels"])
        entry: dict[str, Any] = {"k": c["k"], "backend": c["backend"],
                                 "cluster_sizes": np.bincount(pred[pred >= 0]).tolist()}  # -1: HDBSCAN noise
        if (pred < 0).any():
            entry["noise"] = int((pred < 0).sum())
        if labels_true is not None and (labels_true >= 0).all():
            entry = {**evaluate(labels_true, pred), **entry}
        out[c["algorithm"]] = entry
    return out


def finalize_run(cfg: RunConfig, store: dict[str, Any], clusters: list[dict[str, Any]], reduced: dict[str, Any],
                 metrics: dict[str, dict[str, Any]], staging: str, timings: dict[str, float]) -> dict[str, Any]:
    """Write the run directory's files into ``staging``; return metrics.json's content."""
    stage = Path(staging)
    table = read_embeddings(Path(store["store"]))
    columns: dict[str, Any] = {"image_id": pa.array(table.image_ids, pa.string())}
    for c in clusters:
        columns[c["algorithm"]] = pa.array(np.load(c["labels"]).astype(np.int32))
    atomic_write_table(stage / "assignments.parquet", pa.table(columns))
    xy = np.load(reduced["map"]) if reduced["map"] else np.zeros((len(table.image_ids), 2), np.float32)
    atomic_write_table(stage / "map2d.parquet", pa.table({"image_id": pa.array(table.image_ids, pa.string()),
                                                           "x": pa.array(xy[:, 0]), "y": pa.array(xy[:, 1])}))
    (stage / "config.yaml").write_text(yaml.safe_dump(json.loads(cfg.model_dump_json()), sort_keys=False))
    resolutions = [r for c in clusters for r in c["resolutions"]] + reduced["resolutions"]
    doc = {
        "dataset": cfg.dataset,
        "n": len(table.image_ids),
        "quarantined": store["quarantined"],
        "store": store["store"],
        "extract": {"extractor": cfg.extractor, "device": store["device"], "dim": store["dim"]},
        "algorithms": metrics,
        "reducer": {"name": cfg.reducer, "backend": reduced["backend"]},
        "backends": resolutions,
        "fallbacks": [f"{r['op']}: {f}" for r in resolutions for f in r["fallbacks"]],
        "timings_s": timings,
    }
    atomic_write_json(stage / "metrics.json", doc, sort_keys=False)
    recon = Path(store["store"]).parent / "autoencoder" / RECONSTRUCTIONS
    if cfg.extractor == "autoencoder" and recon.is_file():
        shutil.copyfile(recon, stage / RECONSTRUCTIONS)
    for tmp in list(stage.glob("labels-*.npy")) + list(stage.glob("map2d.npy")):
        tmp.unlink()
    return doc
