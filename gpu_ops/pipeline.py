"""The pipeline's stages as plain functions: each takes paths and configs and returns a typed result
(:mod:`gpu_ops.stages`). :mod:`flows.tasks` wraps each one in a Prefect task; nothing here knows Prefect."""

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

from gpu_ops.config import DEEP_ALGORITHMS, HEAD_ALGORITHMS, UMAP_ALGORITHMS, RunConfig
from gpu_ops.data import load_dataset
from gpu_ops.errors import InputError
from gpu_ops.explore.stage import ExploreResult
from gpu_ops.explore.models import save_deep_model, save_model
from gpu_ops.features.extract import (
    build_extractor,
    dataset_directory,
    extract_options,
    extract_to_store,
    open_dataset,
)
from gpu_ops.incremental import store_revision
from gpu_ops.metrics import evaluate
from gpu_ops.placement import placement_for
from gpu_ops.registry import Resolution, create_estimator
from gpu_ops.rundir import RunDir
from gpu_ops.stages import (
    AlgorithmMetrics,
    ClusterResult,
    MapResult,
    ResolutionRecord,
    StoreRef,
    StreamingStats,
    batch_rows_for,
    k_for,
    k_selection_summary,
    write_cluster_result,
)
from gpu_ops.store import atomic_write_json, read_embeddings, store_labels

log = logging.getLogger(__name__)


def extract_params(cfg: RunConfig) -> dict[str, Any]:
    """The settings that decide a store's content: the extract stage's (cacheable) inputs."""
    keys = ("dataset", "split", "limit", "extractor", "weights", "image_size", "batch_size", "num_workers", "seed",
            "shard_rows", "decode_on_device", "latent_dim", "ae_epochs", "flip_average", "wait_for_store")
    params = {k: getattr(cfg, k) for k in keys}
    params["device"] = placement_for(cfg, "extract").torch_device
    params["cache_root"] = str(cfg.cache_root())
    return params


def dataset_fingerprint(params: dict[str, Any]) -> str:
    """Content hash of the dataset selection an extract run would read."""
    return open_dataset(params).fingerprint()


def extract_stage(params: dict[str, Any], on_shard: Callable[[int, int], None] | None = None,
                  progress: bool = True) -> StoreRef:
    """Embed the dataset into the Parquet store (resuming a partial one); return its summary."""
    t0 = time.perf_counter()
    dataset = open_dataset(params)
    extractor = build_extractor(params, dataset, progress=progress)
    summary = extract_to_store(dataset, extractor, Path(params["cache_root"]) / "stores", on_shard=on_shard,
                               progress=progress, wait=params.get("wait_for_store", True),
                               **extract_options(params, params["device"]))
    return StoreRef(store=str(summary.directory), rows=summary.rows, dim=summary.dim,
                    quarantined=summary.quarantined, device=params["device"], extractor=params["extractor"],
                    seconds=round(time.perf_counter() - t0, 3), revision=store_revision(Path(summary.directory)),
                    extracted=summary.items)


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


def cluster_stage(store: str, cfg: RunConfig, algorithm: str, staging: str) -> ClusterResult:
    """Cluster the store's rows with ``algorithm``; labels go to the run directory ``staging``.

    Deep algorithms cluster the dataset's images in torch; clustering heads (``scan``, ``temi``)
    train in torch on the store's embeddings; ``kmeans`` with ``cfg.memory_mb`` streams the
    store; every other algorithm clusters the embeddings in memory (refused when they do not fit
    ``cfg.memory_mb``: :func:`check_fits_in_memory`).
    """
    t0 = time.perf_counter()
    run = RunDir(staging)
    if algorithm in DEEP_ALGORITHMS:
        return _deep_cluster(store, cfg, algorithm, run, t0)
    if algorithm in HEAD_ALGORITHMS:
        return _head_cluster(store, cfg, algorithm, run, t0)
    if algorithm == "kmeans" and cfg.memory_mb is not None:
        return _streaming_kmeans(store, cfg, run, t0)
    return _in_memory_cluster(store, cfg, algorithm, run, t0)


#: Share of ``memory_mb`` the embeddings of an algorithm that holds them all in memory may take.
IN_MEMORY_SHARE = 0.5


def check_fits_in_memory(store: str, cfg: RunConfig, algorithm: str) -> None:
    """Refuse, before loading anything, an algorithm that holds every embedding in memory when
    they take more than :data:`IN_MEMORY_SHARE` of ``cfg.memory_mb`` (k-means streams instead)."""
    if cfg.memory_mb is None:
        return
    from gpu_ops.cluster.sources import StoreSource

    source = StoreSource(store)
    n, d = source.count(), source.dim()
    needed_mb = n * d * 4 / 2**20
    if needed_mb > IN_MEMORY_SHARE * cfg.memory_mb:
        raise InputError(f"{algorithm} holds all {n:,} x {d} embeddings in memory ({needed_mb:,.0f} MB), more than "
                         f"half of memory_mb={cfg.memory_mb}; kmeans streams within it, or raise memory_mb")


def _deep_cluster(store: str, cfg: RunConfig, algorithm: str, run: RunDir, t0: float) -> ClusterResult:
    """Deep clustering (``dkm``, ``dec``, ``idec``, ``n2d``) of the dataset's images, in store order.

    The autoencoder is pretrained once per data + settings and reused (checkpoints beside the stores).
    """
    from gpu_ops.deep import fit_deep

    check_fits_in_memory(store, cfg, algorithm)
    table = read_embeddings(Path(store))
    dataset = load_dataset(cfg.dataset, cfg.split, cfg.limit)
    if dataset.item_kind != "image":
        raise InputError(f"{algorithm} clusters images; {cfg.dataset} holds vectors (use kmeans or umap-kmeans)")
    images = images_for_ids(dataset, table.image_ids, cfg.image_size or 32)
    k = k_for(cfg, table.embeddings, run)
    placed = placement_for(cfg, algorithm)
    overrides: dict[str, Any] = {"latent_dim": cfg.latent_dim}
    if cfg.deep_epochs is not None:
        overrides["pretrain_epochs"] = cfg.deep_epochs
    overrides.update(cfg.options_for(algorithm))
    result = fit_deep(algorithm, images, k, seed=cfg.seed, device=placed.torch_device, labels=table.labels,  # type: ignore[arg-type]
                      checkpoint_dir=dataset_directory(Path(cfg.cache_root()) / "stores", dataset) / "deep",
                      backend=cfg.backend_for("kmeans"), **overrides)
    atomic_write_json(run.history(algorithm), result.history, sort_keys=False)
    save_deep_model(run, algorithm, result)
    ran = Resolution(algorithm, placed.requested, f"torch-{result.device}", "gpu" if "cuda" in result.device else "cpu",
                     f"deep clustering in torch on {result.device}; {placed.reason}", list(placed.fallbacks))
    return write_cluster_result(run, algorithm, k=k, resolutions=[ResolutionRecord.of(ran, algorithm)], started=t0,
                                labels=result.labels, degenerate=result.degenerate)


def _head_cluster(store: str, cfg: RunConfig, algorithm: str, run: RunDir, t0: float) -> ClusterResult:
    """A clustering head (``scan``, ``temi``, ``turtle``) trained on the store's embeddings, streamed from the
    store; the kept head goes to ``model-<algorithm>.pt``, the per-epoch history beside it."""
    from gpu_ops.cluster.sources import StoreSource
    from gpu_ops.heads import fit_head

    source = StoreSource(store)
    k = k_for(cfg, source, run)
    if k > source.count():
        raise InputError(f"k={k} is larger than the number of images ({source.count()})")
    placed = placement_for(cfg, algorithm)
    result = fit_head(algorithm, store, k, seed=cfg.seed, device=placed.torch_device, labels=store_labels(store),
                      knn_backend=cfg.backend_for("knn"), memory_mb=cfg.memory_mb, scratch=run.path / ".head-scratch",
                      **cfg.options_for(algorithm))
    shutil.rmtree(run.path / ".head-scratch", ignore_errors=True)
    result.save(run.head(algorithm))
    atomic_write_json(run.history(algorithm), result.history, sort_keys=False)
    ran = Resolution(algorithm, placed.requested, f"torch-{result.device}", "gpu" if "cuda" in result.device else "cpu",
                     f"{algorithm} head in torch on {result.device}; {placed.reason}", list(placed.fallbacks))
    mined = [ResolutionRecord(**result.knn_backend, stage=algorithm)] if result.knn_backend else []  # turtle mines none
    return write_cluster_result(run, algorithm, k=k, resolutions=[*mined, ResolutionRecord.of(ran, algorithm)],
                                started=t0, labels=result.labels)


def _streaming_kmeans(store: str, cfg: RunConfig, run: RunDir, t0: float) -> ClusterResult:
    """k-means within ``cfg.memory_mb``: the store is streamed and the labels memory-mapped
    straight into the run directory (see :class:`~gpu_ops.cluster.kmeans_ooc.StreamingKMeans`)."""
    from gpu_ops.cluster.kmeans_ooc import StreamingKMeans, plan_memory
    from gpu_ops.cluster.sources import StoreSource

    source = StoreSource(store)
    source.batch_rows = plan_memory(source.count(), source.dim(), 2, int(cfg.memory_mb), 256).batch_rows
    k = k_for(cfg, source, run)
    est = StreamingKMeans(n_clusters=k, memory_mb=int(cfg.memory_mb), max_iter=int(cfg.max_iter),
                          n_init=int(cfg.n_init), seed=int(cfg.seed), backend=cfg.backend_for("kmeans"))
    est.fit(store, labels_path=run.labels("kmeans"))
    save_model(run, "kmeans", est)
    del est.labels_  # the memory map: flushed and closed
    stats = StreamingStats(**est.plan_.as_dict(), timings_s=est.timings_, inertia=est.inertia_)
    return write_cluster_result(run, "kmeans", k=k, resolutions=[ResolutionRecord(**est.resolution_, stage="kmeans")],
                                started=t0, streaming=stats)


def _in_memory_cluster(store: str, cfg: RunConfig, algorithm: str, run: RunDir, t0: float) -> ClusterResult:
    """A registry algorithm (``kmeans``, ``umap-kmeans``, ``umap-graph``, ``hdbscan``, ``gmm``,
    ``agglomerative``) over the embeddings in memory."""
    check_fits_in_memory(store, cfg, algorithm)
    X = read_embeddings(Path(store)).embeddings
    k = k_for(cfg, X, run) if algorithm != "hdbscan" else 0  # HDBSCAN finds k itself
    if k > X.shape[0]:
        raise InputError(f"k={k} is larger than the number of images ({X.shape[0]})")
    resolutions = []
    space = X
    if algorithm in UMAP_ALGORITHMS:
        reducer, res = create_estimator("umap", cfg.backend_for("umap"), n_components=min(cfg.umap_dims, X.shape[1]),
                                        n_neighbors=min(15, X.shape[0] - 1), min_dist=0.0, seed=cfg.seed)
        resolutions.append(ResolutionRecord.of(res, algorithm))
        space = reducer.fit(X).embedding_
    if algorithm == "umap-graph":
        return _graph_merge(X, space, cfg, k, run, resolutions, t0)
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
    resolutions.append(ResolutionRecord.of(res, algorithm))
    est.fit(space)
    save_model(run, algorithm, est)  # what `gpuclust assign` predicts with (k-means centres, the mixture)
    k = int(getattr(est, "n_clusters_", k))  # found by HDBSCAN or a distance cut
    return write_cluster_result(run, algorithm, k=k, resolutions=resolutions, started=t0, labels=est.labels_,
                                linkage=getattr(est, "linkage_matrix_", None))


def _graph_merge(X: np.ndarray, space: np.ndarray, cfg: RunConfig, k: int, run: RunDir,
                 resolutions: list[ResolutionRecord], t0: float) -> ClusterResult:
    """``umap-graph``: k-means micro-clusters in the UMAP ``space``, merged down to ``k`` by
    modularity on the features' neighbour graph (:func:`~gpu_ops.cluster.quality.merge_path`).

    k-means with k centres in a UMAP space joins two islands where one class has a small
    island of its own (digits: a group of 1s apart, 1s and 8s joined; ACC 0.88); pure
    micro-clusters merged on the graph keep them apart (ACC 0.97 on seeds 0-4).
    """
    from gpu_ops.cluster.quality import GRAPH_NEIGHBORS, knn_graph, merge_path, micro_clusters, modularity

    n_micro = max(k, micro_clusters(k, X.shape[0]))
    graph = knn_graph(X, GRAPH_NEIGHBORS, backend=cfg.backend_for("knn"))
    if graph.resolution is not None:
        resolutions.append(ResolutionRecord.of(graph.resolution, "umap-graph"))
    est, res = create_estimator("kmeans", cfg.backend_for("kmeans"), n_clusters=n_micro, n_init=3,
                                max_iter=cfg.max_iter, seed=cfg.seed)
    resolutions.append(ResolutionRecord.of(res, "umap-graph"))
    micro = np.asarray(est.fit(space).labels_)
    labels = merge_path(graph, micro, k).labels(micro, k)
    log.info("umap-graph: %d micro-clusters merged to k=%d, modularity %.4f", n_micro, k, modularity(graph, labels))
    return write_cluster_result(run, "umap-graph", k=k, resolutions=resolutions, started=t0, labels=labels)


def reduce_stage(store: str, cfg: RunConfig, staging: str) -> MapResult:
    """2-D map of the store's embeddings with ``cfg.reducer``, saved in the run directory ``staging``.

    The reducer is fitted on at most :func:`~gpu_ops.reduce.sampled.map_fit_rows` rows (a uniform
    sample of a larger store, bounded by ``cfg.map_sample_rows`` and ``cfg.memory_mb``); the other
    rows stream from the store and are placed (:func:`~gpu_ops.reduce.sampled.place_rows`).
    """
    from gpu_ops.cluster.sources import StoreSource, subset_rows
    from gpu_ops.reduce.sampled import MapPlan, map_fit_rows, place_rows, placement_text

    t0 = time.perf_counter()
    run = RunDir(staging)
    if cfg.reducer == "none":
        return MapResult(path=None, backend=None, resolutions=[], seconds=0.0)
    source = StoreSource(store, batch_rows=batch_rows_for(cfg.memory_mb, StoreSource(store).dim()))
    n, d = source.count(), source.dim()
    rows = subset_rows(n, map_fit_rows(n, d, cfg.memory_mb, cfg.map_sample_rows), int(cfg.seed))
    X = source.take(rows)
    m = len(rows)
    params: dict[str, Any] = {"n_components": 2, "seed": cfg.seed}
    if cfg.reducer == "umap":
        params.update(n_neighbors=min(15, m - 1), min_dist=0.1)
    elif cfg.reducer == "tsne":
        params.update(perplexity=min(30.0, max(2.0, (m - 1) / 3.5)))
    est, res = create_estimator(cfg.reducer, cfg.backend_for(cfg.reducer), **params)
    xy = np.asarray(est.fit(X).embedding_, dtype=np.float32)
    plan = MapPlan(n, m, None)
    if m < n:
        plan = MapPlan(n, m, placement_text(cfg.reducer))
        log.info("2-D map: %s fitted on %d of %d rows; the other rows %s", cfg.reducer, m, n, plan.placement)
        transform = est.transform if cfg.reducer == "pca" else None
        xy = place_rows(source.batches(), n, rows, X, xy, seed=int(cfg.seed), transform=transform)
    path = run.map2d_scratch
    np.save(path, xy.astype(np.float32))
    if cfg.reducer == "tsne" and cfg.tsne_perplexities:  # several perplexities: the report draws them
        from gpu_ops.reduce.tsne import perplexity_sweep

        sweep = perplexity_sweep(X, cfg.tsne_perplexities, backend=cfg.backend_for("tsne"), seed=cfg.seed)
        sweep.save(run.tsne_sweep, _ids_of_rows(source, rows))
    return MapResult(path=str(path), backend=res.backend, resolutions=[ResolutionRecord.of(res, "map")],
                     seconds=round(time.perf_counter() - t0, 3), plan=plan.as_dict())


def _ids_of_rows(source: Any, rows: np.ndarray) -> list[str]:
    """The image ids of the sorted row numbers ``rows``, in one streaming pass over the id column."""
    out: list[str] = []
    start = 0
    for ids in source.iter_ids():
        stop = start + len(ids)
        lo, hi = np.searchsorted(rows, [start, stop])
        out += [str(ids[int(r) - start]) for r in rows[lo:hi]]
        start = stop
    return out


def evaluate_stage(store: str, clusters: list[ClusterResult]) -> dict[str, AlgorithmMetrics]:
    """ACC / NMI / ARI per algorithm when the store has labels; k, backend and cluster sizes always.

    Only the store's ``label`` column is read (never the embeddings); the scores need no more than
    it and the predicted labels.
    """
    labels_true = store_labels(store)
    out: dict[str, AlgorithmMetrics] = {}
    for c in clusters:
        pred = c.load_labels()
        scores = evaluate(labels_true, pred) if labels_true is not None else {}
        noise = int((pred < 0).sum())  # -1: HDBSCAN noise
        out[c.algorithm] = AlgorithmMetrics(**scores, k=c.k, backend=c.backend,
                                            cluster_sizes=np.bincount(pred[pred >= 0]).tolist(), noise=noise or None,
                                            degenerate=c.degenerate)
    return out


def _write_streamed(path: Path, schema: pa.Schema, batches: Any) -> None:
    """Write record batches to the Parquet file ``path`` atomically (page checksums, as
    :func:`~gpu_ops.store.atomic_write_table`), one batch in memory at a time."""
    import pyarrow.parquet as pq

    from gpu_ops.fsutil import atomic_path

    with atomic_path(path) as tmp:
        with pq.ParquetWriter(tmp, schema, write_page_checksum=True) as writer:
            for batch in batches:
                writer.write_batch(batch)


def _run_tables(source: Any, clusters: list[ClusterResult], xy: np.ndarray | None) -> tuple[Any, Any]:
    """Record batches of ``assignments.parquet`` and ``map2d.parquet``, aligned with the store's
    id batches (labels and map read from memory-mapped arrays)."""
    labels = {c.algorithm: np.load(c.labels, mmap_mode="r") for c in clusters}

    def assignments() -> Any:
        start = 0
        for ids in source.iter_ids():
            stop = start + len(ids)
            cols = [ids.cast(pa.string())] + [pa.array(np.asarray(lab[start:stop]).astype(np.int32))
                                              for lab in labels.values()]
            yield pa.record_batch(cols, names=["image_id", *labels])
            start = stop

    def map2d() -> Any:
        start = 0
        for ids in source.iter_ids():
            stop = start + len(ids)
            part = np.zeros((stop - start, 2), np.float32) if xy is None else np.asarray(xy[start:stop])
            yield pa.record_batch([ids.cast(pa.string()), pa.array(part[:, 0]), pa.array(part[:, 1])],
                                  names=["image_id", "x", "y"])
            start = stop

    return assignments(), map2d()


def record_stage_time(staging: str, stage: str, seconds: float) -> dict[str, Any]:
    """Add a stage that ran after metrics.json was written (the report) to its ``timings_s``;
    return the updated content."""
    run = RunDir(staging)
    doc = json.loads(run.metrics.read_text())
    doc["timings_s"][stage] = round(seconds, 3)
    atomic_write_json(run.metrics, doc, sort_keys=False)
    return doc


def finalize_run(cfg: RunConfig, store: StoreRef, clusters: list[ClusterResult], reduced: MapResult,
                 metrics: dict[str, AlgorithmMetrics], staging: str, timings: dict[str, float],
                 explored: ExploreResult | None = None) -> dict[str, Any]:
    """Write the run directory's files into ``staging``; return metrics.json's content
    (``explored``: the explore stage's result, when it ran).

    ``assignments.parquet`` and ``map2d.parquet`` are written batch by batch as the store's ids
    stream past (batches sized by ``cfg.memory_mb``): no stage file holds the whole store.
    """
    from gpu_ops.cluster.sources import StoreSource

    run = RunDir(staging)
    source = StoreSource(store.store)
    source.batch_rows = batch_rows_for(cfg.memory_mb, source.dim())
    n = source.count()
    xy = np.load(reduced.path, mmap_mode="r") if reduced.path else None
    assignments, map2d = _run_tables(source, clusters, xy)
    schema = pa.schema([("image_id", pa.string()), *[(c.algorithm, pa.int32()) for c in clusters]])
    _write_streamed(run.assignments, schema, assignments)
    _write_streamed(run.map2d, pa.schema([("image_id", pa.string()), ("x", pa.float32()), ("y", pa.float32())]), map2d)
    del xy
    run.config.write_text(yaml.safe_dump(json.loads(cfg.model_dump_json()), sort_keys=False))
    resolutions = [r.model_dump() for c in clusters for r in c.resolutions] + [r.model_dump() for r in reduced.resolutions]
    reducer: dict[str, Any] = {"name": cfg.reducer, "backend": reduced.backend}
    if reduced.plan is not None:
        reducer.update(fitted_rows=reduced.plan["fitted_rows"], placement=reduced.plan["placement"])
    doc = {
        "dataset": cfg.dataset,
        "n": n,
        "quarantined": store.quarantined,
        "store": store.store,
        "extract": {"extractor": cfg.extractor, "device": store.device, "dim": store.dim},
        "algorithms": {name: m.as_json() for name, m in metrics.items()},
        "reducer": reducer,
        "backends": resolutions,
        "fallbacks": [f"{r['op']}: {f}" for r in resolutions for f in r["fallbacks"]],
        "explore": explored.as_json() if explored is not None else {"ran": False},
        "timings_s": timings,
    }
    if cfg.memory_mb is not None:
        doc["memory_mb"] = cfg.memory_mb
    chosen = k_selection_summary(run)
    if chosen is not None:
        doc["k_selection"] = chosen
    atomic_write_json(run.metrics, doc, sort_keys=False)
    recon = Path(store.store).parent / "autoencoder" / RunDir.RECONSTRUCTIONS
    if cfg.extractor == "autoencoder" and recon.is_file():
        shutil.copyfile(recon, run.reconstructions)
    for tmp in run.scratch_files():
        tmp.unlink()
    return doc
