"""Similar images and new images into a run's clusters: the stage functions behind
``gpuclust similar`` and ``gpuclust assign`` (and the run's last step that makes both possible).

:func:`save_for_reuse` runs at the end of every run (in its staging directory): the similar-image
index (:mod:`gpu_ops.explore.search`), how the run embedded its images
(:mod:`gpu_ops.explore.embed`) and each algorithm's saved model with its novelty threshold
(:mod:`gpu_ops.explore.models`).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from gpu_ops.config import DEEP_ALGORITHMS
from gpu_ops.errors import InputError
from gpu_ops.explore.embed import RunEmbedder, images_of, save_embedder
from gpu_ops.explore.models import (
    THRESHOLD_SAMPLE_ROWS,
    encoder_codes,
    finish_model,
    learned_space,
    load_model,
    load_threshold,
    run_assignments,
    save_model,
    save_neighbour_model,
)
from gpu_ops.explore.search import EMBEDDINGS, SearchIndex, latent_space, save_index
from gpu_ops.fsutil import atomic_path, atomic_write_json
from gpu_ops.rundir import RunDir, is_run_dir
from gpu_ops.store import read_embeddings

log = logging.getLogger(__name__)

#: The Parquet schema metadata key (and the CSV sidecar's top key) of an assignment file.
METADATA_KEY = "gpuclust_assign"
OUT_SUFFIXES = (".parquet", ".csv")


def open_run(run_dir: str | Path) -> RunDir:
    """A finished run directory, or an InputError naming the path."""
    path = Path(run_dir).expanduser()
    if not path.exists():
        raise InputError(f"{path}: run directory does not exist")
    if not is_run_dir(path):
        raise InputError(f"{path}: not a gpuclust run directory (no .gpuclust-run file)")
    return RunDir(path)


# ------------------------------------------------------------------------------ end of a run


def save_for_reuse(staging: str, cfg: Any, store: str) -> dict[str, Any]:
    """Write the similar-image index, ``embedder.json`` and every algorithm's model and novelty
    threshold into the run's staging directory (after ``assignments.parquet``).

    The index holds the space the clustering grouped the images in: the encoder codes of the first
    deep method with a saved encoder, else the store's embeddings. Over codes, the algorithms that
    predict from the nearest labelled embedding keep their embeddings with their model."""
    from gpu_ops.data import load_dataset
    from gpu_ops.explore.embed import ConformedDataset, ItemForm

    t0 = time.perf_counter()
    run = RunDir(staging)
    if _beyond_budget(store, cfg):
        return _save_within_budget(run, cfg, store, t0)
    table = read_embeddings(Path(store))
    dataset = load_dataset(cfg.dataset, cfg.split, cfg.limit)
    embedder = save_embedder(run, cfg, table.metadata, dataset, store)
    deep = [a for a in cfg.algorithms if a in DEEP_ALGORITHMS and run.encoder(a).is_file()]
    images: Any = None
    if deep:
        conformed = ConformedDataset(dataset, ItemForm(**embedder["item_form"]))
        images = images_of(conformed, table.image_ids, cfg.image_size or 32)
    learned = learned_space(run, list(cfg.algorithms))
    if learned is not None:
        info = save_index(run, encoder_codes(run, learned, images), seed=int(cfg.seed), space=latent_space(learned))
    else:
        info = save_index(run, table.embeddings, seed=int(cfg.seed))
    assignments = run_assignments(run)
    index = SearchIndex(run, cfg.backend_for("knn"))
    models = {}
    for algorithm in cfg.algorithms:
        labels = assignments[algorithm]
        if algorithm == "kmeans" and not run.model(algorithm).is_file():
            save_model(run, algorithm, _Centres(table.embeddings, labels))  # a path that kept no centres
        if info.space != EMBEDDINGS and algorithm not in deep and not run.model(algorithm).is_file():
            save_neighbour_model(run, algorithm, table.embeddings, labels)
        X: Any = images if algorithm in deep else table.embeddings
        models[algorithm] = finish_model(run, algorithm, X, labels, index, seed=int(cfg.seed))["kind"]
    return {"index": info.kind, "space": info.space, "models": models, "seconds": round(time.perf_counter() - t0, 3)}


def _beyond_budget(store: str, cfg: Any) -> bool:
    """True when the run has a ``memory_mb`` and the store's embeddings need more than a quarter of it
    (the whole-store path holds them about four times: read, made contiguous, copied into the index)."""
    if getattr(cfg, "memory_mb", None) is None or any(a in DEEP_ALGORITHMS for a in cfg.algorithms):
        return False
    from gpu_ops.cluster.sources import StoreSource

    source = StoreSource(store)
    return 4 * source.count() * source.dim() > cfg.memory_mb * 2**20 // 4


def _save_within_budget(run: RunDir, cfg: Any, store: str, t0: float) -> dict[str, Any]:
    """:func:`save_for_reuse` for a store larger than the run's ``memory_mb``: ``embedder.json`` and
    the novelty thresholds of the models that predict from parameters (k-means centres, a Gaussian
    mixture), measured on a uniform sample of :data:`THRESHOLD_SAMPLE_ROWS` rows. The similar-image
    index, which holds every embedding, and the models that predict from it are not kept."""
    from gpu_ops.cluster.sources import StoreSource, subset_rows
    from gpu_ops.data import load_dataset
    from gpu_ops.store import open_part

    source = StoreSource(store)
    raw = open_part(source.files[0]).schema_arrow.metadata or {}
    save_embedder(run, cfg, {k.decode(): v.decode() for k, v in raw.items()},
                  load_dataset(cfg.dataset, cfg.split, cfg.limit), store)
    rows = subset_rows(source.count(), THRESHOLD_SAMPLE_ROWS, int(cfg.seed))
    X = source.take(rows)
    models = {}
    for algorithm in cfg.algorithms:
        if not run.model(algorithm).is_file():
            log.warning("%s: no model for assign kept: it predicts from the similar-image index, which the "
                        "memory budget leaves out", algorithm)
            continue
        labels = pq.read_table(run.assignments, columns=[algorithm]).column(algorithm).to_numpy().astype(np.int64)
        models[algorithm] = finish_model(run, algorithm, X, labels[rows], seed=int(cfg.seed))["kind"]
    log.warning("similar-image index not kept: %d embeddings of %d dimensions need more than a quarter of "
                "memory_mb=%d (gpuclust similar needs a run without memory_mb)", source.count(), source.dim(),
                cfg.memory_mb)
    return {"index": "none", "space": EMBEDDINGS, "models": models, "seconds": round(time.perf_counter() - t0, 3)}


@dataclass
class _Centres:
    """k-means centres as the means of the final clusters (for k-means paths that keep no centres)."""

    X: np.ndarray
    labels: np.ndarray

    @property
    def cluster_centers_(self) -> np.ndarray:
        from gpu_ops.deep.api import cluster_means

        return cluster_means(self.X, self.labels, int(self.labels.max()) + 1)


# ------------------------------------------------------------------------------ similar


@dataclass
class Neighbour:
    rank: int
    image_id: str
    distance: float
    clusters: dict[str, int]


def similar(run_dir: str | Path, *, image: str | Path | None = None, image_id: str | None = None, k: int = 10,
            backend: str = "auto") -> tuple[str, list[Neighbour], str]:
    """The ``k`` nearest images of the run to ``image`` (a file, embedded the run's way, then through
    the deep method's encoder when the index holds its codes) or to its image ``image_id``; returns
    (what was queried, neighbours nearest first, itself included, what the index holds)."""
    if (image is None) == (image_id is None):
        raise InputError("similar needs exactly one of --image PATH and --id IMAGE_ID")
    if k < 1:
        raise InputError(f"-k must be a positive integer; got {k}")
    run = open_run(run_dir)
    index = SearchIndex(run, backend)
    assignments = run_assignments(run)
    ids: list[str] = assignments["image_id"]
    if image_id is not None:
        row = {i: r for r, i in enumerate(ids)}.get(image_id)
        if row is None:
            raise InputError(f"{run.path}: no image with id {image_id!r} (ids look like {ids[0]!r})")
        query, what = index.vectors(np.array([row])), f"image {image_id}"
    elif index.info.encoder is not None:
        images = RunEmbedder(run).images_of_files([Path(image)])  # type: ignore[arg-type]
        query, what = encoder_codes(run, index.info.encoder, images), str(image)
    else:
        query, what = RunEmbedder(run).embed_files([Path(image)]), str(image)  # type: ignore[arg-type]
    dist, rows = index.search(query, k)
    algorithms = [a for a in assignments if a != "image_id"]
    out = [Neighbour(rank + 1, ids[r], float(d), {a: int(assignments[a][r]) for a in algorithms})
           for rank, (d, r) in enumerate(zip(dist[0], rows[0])) if r >= 0]
    return what, out, index.info.describe()


# ------------------------------------------------------------------------------ assign


def check_out_file(out: str | Path) -> Path:
    """Refuse an assignment file path that could destroy what is not ours: a directory, another
    suffix than .parquet / .csv, or an existing file that is not an earlier assignment file."""
    path = Path(out).expanduser()
    if path.suffix.lower() not in OUT_SUFFIXES:
        raise InputError(f"--out {path}: expected a .parquet or .csv file name")
    if path.is_dir():
        raise InputError(f"--out {path}: is a directory; name a .parquet or .csv file")
    if path.exists() and not _is_assignment_file(path):
        raise InputError(f"--out {path}: exists and is not a gpuclust assignment file; choose a new name")
    return path.absolute()


def _is_assignment_file(path: Path) -> bool:
    try:
        if path.suffix.lower() == ".parquet":
            return METADATA_KEY.encode() in (pq.read_schema(path).metadata or {})
        return METADATA_KEY in json.loads(_sidecar(path).read_text())
    except (OSError, ValueError, pa.ArrowException):
        return False


def _sidecar(path: Path) -> Path:
    """A CSV assignment file's metadata: ``FILE.csv.json``."""
    return path.with_name(path.name + ".json")


def default_out(dataset: str) -> Path:
    return Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-assign-{dataset.split(':', 1)[0]}.parquet"


def embed_new(run_dir: str, dataset: str, split: str = "all", limit: int | None = None) -> str:
    """Embed the new images with the run's extractor; returns the store (or ``parquet:``) directory."""
    directory, _ = RunEmbedder(open_run(run_dir)).embed_dataset(dataset, split, limit)
    return str(directory)


def assign_new(run_dir: str, store: str, dataset: str, split: str, limit: int | None, out: str) -> dict[str, Any]:
    """Assign the embedded new images (``store``) to the run's clusters with its saved models and
    write ``out`` (Parquet or CSV) atomically; returns a summary (rows, novel counts per algorithm)."""
    run = open_run(run_dir)
    path = check_out_file(out)
    table = read_embeddings(Path(store))
    embedder = RunEmbedder(run)
    embedder.check_identity(table.metadata, store)
    assignments = run_assignments(run)
    algorithms = [a for a in assignments if a != "image_id"]
    index = SearchIndex(run)
    columns: dict[str, pa.Array] = {"image_id": pa.array(table.image_ids, pa.string()),
                                    "source": pa.array(table.sources, pa.string())}
    meta: dict[str, Any] = {"run": str(run.path.absolute()), "dataset": dataset, "split": split, "limit": limit,
                            "embedder": embedder.identity, "algorithms": {}}
    summary: dict[str, Any] = {"rows": len(table.image_ids), "out": str(path), "novel": {}}
    for algorithm in algorithms:
        model = load_model(run, algorithm, assignments[algorithm], index)
        if model is None:
            log.warning("%s: no saved model; its column is left out", algorithm)
            continue
        if model.input == "image":
            from gpu_ops.data import load_dataset

            if dataset.partition(":")[0] == "parquet":
                raise InputError(f"{dataset}: {algorithm} assigns images through its encoder; give the images, "
                                 "not their embeddings")
            conformed = embedder.conformed(load_dataset(dataset, split, limit))
            X: Any = images_of(conformed, table.image_ids, embedder.settings["image_size"] or 32)
        else:
            X = table.embeddings
        prediction = model.predict(X)
        threshold = load_threshold(run, algorithm)
        novel = threshold.novel(prediction)
        columns[algorithm] = pa.array(prediction.labels.astype(np.int32))
        columns[f"{algorithm}_distance"] = pa.array(prediction.distance.astype(np.float32))
        columns[f"{algorithm}_confidence"] = (pa.array(prediction.confidence.astype(np.float32))
                                              if prediction.confidence is not None
                                              else pa.nulls(len(novel), pa.float32()))
        columns[f"{algorithm}_novel"] = pa.array(novel)
        info = json.loads(run.model_info(algorithm).read_text())
        meta["algorithms"][algorithm] = {"model": info["kind"], "distance": info["distance"],
                                         "novel_threshold": info["threshold"]}
        summary["novel"][algorithm] = int(novel.sum())
    result = pa.table(columns)
    _write(path, result, {METADATA_KEY: meta})
    return summary


def _write(path: Path, table: pa.Table, meta: dict[str, Any]) -> None:
    """The assignment file, whole or not at all (a CSV's metadata in ``FILE.csv.json``, written first)."""
    if path.suffix.lower() == ".parquet":
        table = table.replace_schema_metadata({METADATA_KEY: json.dumps(meta[METADATA_KEY])})
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp)
        return
    atomic_write_json(_sidecar(path), meta, sort_keys=False)
    with atomic_path(path) as tmp:
        pacsv.write_csv(table, tmp)
