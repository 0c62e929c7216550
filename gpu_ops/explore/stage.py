"""The explore stage of a run: duplicates and outliers of the store's items, into the run directory.

:func:`explore_stage` scans the dataset's items once (:mod:`gpu_ops.explore.scan`), searches the
embeddings' nearest neighbours with the ``knn`` op (by cosine for near duplicates, by Euclidean
distance for outlier scores), and writes ``duplicates.parquet``
(:mod:`gpu_ops.explore.duplicates`) and ``outliers.parquet`` (:mod:`gpu_ops.explore.outliers`).
What it found and the thresholds it used go into metrics.json's ``explore`` entry. A store whose
embeddings do not fit the run's ``memory_mb`` is searched within k-means cells instead of all at
once (:mod:`gpu_ops.explore.cells`); the entry's ``neighbours`` says which ("exact" or "within N cells").
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from gpu_ops.cluster.sources import StoreSource
from gpu_ops.config import RunConfig
from gpu_ops.data import load_dataset
from gpu_ops.data.readers import IdColumn
from gpu_ops.explore.cells import cell_neighbours, fits_in_memory, store_pair_cosine
from gpu_ops.explore.duplicates import (
    DuplicateGroups,
    DuplicateSettings,
    embedding_neighbours,
    find_duplicates,
    group_duplicates,
)
from gpu_ops.explore import outliers as O
from gpu_ops.explore.scan import ItemScan, scan_items
from gpu_ops.fsutil import atomic_path
from gpu_ops.rundir import RunDir
from gpu_ops.stages import ClusterResult, StageModel, batch_rows_for
from gpu_ops.store import atomic_write_table, read_embeddings

log = logging.getLogger(__name__)
#: The per-cell scratch folder inside the run's staging directory (removed when the stage ends).
SCRATCH = ".explore-scratch"


class ExploreResult(StageModel):
    """What the explore stage wrote and found (metrics.json's ``explore`` entry, less ``seconds``)."""

    duplicates: str  #: the duplicates.parquet written
    outliers: str  #: the outliers.parquet written
    images: bool  #: False for vector datasets: no perceptual hashes, no quality flags
    pairs: dict[str, int]  #: duplicate pairs by their strongest kind (exact, phash, embedding)
    groups: int
    images_in_groups: int
    redundant: int  #: images that could go, keeping one representative per group
    flagged: dict[str, int]  #: images per quality flag
    algorithm: str | None  #: whose clusters the cluster ratio uses
    thresholds: dict[str, float]
    backends: list[str]  #: the knn backends that ran
    seconds: float
    phash_chance_matches: float | None = None  #: median other images within the phash threshold
    phash_off: str | None = None  #: why perceptual hashes were not used (they match by chance on this data)
    #: how each item's neighbours were searched: "exact" (among all items), or "within N cells"
    #: (a store beyond ``memory_mb``: within its k-means cell, see :mod:`gpu_ops.explore.cells`)
    neighbours: str = "exact"
    cells: dict[str, int] | None = None  #: the cells' count, largest, searched_in_blocks, cell_rows

    def as_json(self) -> dict[str, Any]:
        """The entry as metrics.json holds it (file names, not paths)."""
        doc = {"ran": True, **self.model_dump(exclude={"seconds"} | ({"cells"} if self.cells is None else set()))}
        doc["duplicates"], doc["outliers"] = Path(self.duplicates).name, Path(self.outliers).name
        return doc


def explore_stage(store: str, cfg: RunConfig, staging: str, clusters: list[ClusterResult],
                  settings: DuplicateSettings = DuplicateSettings()) -> ExploreResult:
    """Find duplicates and score outliers of the store's items; write both tables into ``staging``.

    ``clusters``: the run's cluster results (the first one's labels give the cluster ratio).
    A store whose embeddings do not fit ``cfg.memory_mb`` (:func:`~gpu_ops.explore.cells.fits_in_memory`)
    is searched cell by cell (:func:`explore_in_cells`); otherwise all rows at once.
    """
    source = StoreSource(store)
    if source.count() > 1 and not fits_in_memory(source.count(), source.dim(), cfg.memory_mb):
        return explore_in_cells(source, cfg, staging, clusters, settings)
    t0 = time.perf_counter()
    run = RunDir(staging)
    table = read_embeddings(Path(store))
    dataset = load_dataset(cfg.dataset, cfg.split, cfg.limit)
    scan = scan_items(dataset, table.image_ids)
    backend = cfg.backend_for("knn")
    neighbours = embedding_neighbours(table.embeddings, settings.neighbours, backend)
    dups = find_duplicates(table.image_ids, scan, table.embeddings, neighbours, settings, backend)
    labels = clusters[0].load_labels() if clusters else None
    near = O.euclidean_neighbours(table.embeddings, settings.neighbours, backend)
    scores = O.outlier_scores(table.image_ids, scan, table.embeddings, near, labels)
    atomic_write_table(run.duplicates, dups.table)
    atomic_write_table(run.outliers, scores.table)
    return _result(run, scan, dups, scores.flagged, scores.tiny_below_px, clusters, settings, t0)


def explore_in_cells(source: StoreSource, cfg: RunConfig, staging: str, clusters: list[ClusterResult],
                     settings: DuplicateSettings = DuplicateSettings()) -> ExploreResult:
    """:func:`explore_stage` for a store larger than ``cfg.memory_mb``: neighbours within k-means
    cells (:func:`~gpu_ops.explore.cells.cell_neighbours`), the store streamed in batches, the
    outlier table written batch by batch; metrics.json's ``neighbours`` says within how many cells."""
    t0 = time.perf_counter()
    run = RunDir(staging)
    memory_mb = int(cfg.memory_mb)  # type: ignore[arg-type]
    source.batch_rows = batch_rows_for(memory_mb, source.dim())
    image_ids = IdColumn(pa.concat_arrays([ids.cast(pa.string()) for ids in source.iter_ids()]))
    dataset = load_dataset(cfg.dataset, cfg.split, cfg.limit)
    scan = scan_items(dataset, image_ids)
    labels = clusters[0].load_labels() if clusters else None
    found = cell_neighbours(source, settings.neighbours, settings.min_cosine, labels, memory_mb,
                            run.path / SCRATCH, seed=int(cfg.seed), backend=cfg.backend_for("knn"),
                            kmeans_backend=cfg.backend_for("kmeans"))
    log.info("explore: %d rows x %d dims beyond memory_mb=%d: neighbours searched %s (largest %d rows)",
             source.count(), source.dim(), memory_mb, found.description(), found.largest)
    dups = group_duplicates(image_ids, scan, found.near_pairs,
                            lambda pairs: store_pair_cosine(source, pairs, found.mean), settings,
                            cfg.backend_for("knn"), [found.backend])
    n = source.count()
    labels = np.full(n, -1, np.int64) if labels is None else np.asarray(labels, np.int64)
    columns = O.score_columns(scan, found.knn_distance, found.lof, labels, found.ratio)
    atomic_write_table(run.duplicates, dups.table)
    _write_outliers(run.outliers, image_ids, columns, source.batch_rows)
    return _result(run, scan, dups, columns.flagged, columns.tiny_below_px, clusters, settings, t0,
                   neighbours=found.description(), cells=found.summary())


def _write_outliers(path: Path, image_ids: IdColumn, columns: O.ScoreColumns, batch_rows: int) -> None:
    """``outliers.parquet`` written atomically, ``batch_rows`` rows at a time (page checksums, as
    :func:`~gpu_ops.store.atomic_write_table`)."""
    import pyarrow.parquet as pq

    n = len(image_ids)
    with atomic_path(path) as tmp:
        writer = None
        for start in range(0, n, batch_rows):
            stop = min(n, start + batch_rows)
            part = O.outlier_table(image_ids.array.slice(start, stop - start), columns, start, stop)
            if writer is None:
                writer = pq.ParquetWriter(tmp, part.schema, write_page_checksum=True)
            writer.write_table(part)
        if writer is not None:
            writer.close()


def _result(run: RunDir, scan: ItemScan, dups: DuplicateGroups, flagged: dict[str, int], tiny_below_px: int | None,
            clusters: list[ClusterResult], settings: DuplicateSettings, t0: float, neighbours: str = "exact",
            cells: dict[str, int] | None = None) -> ExploreResult:
    thresholds: dict[str, float] = {**{k: float(v) for k, v in asdict(settings).items()},
                                    "dark_below": O.DARK_BELOW, "bright_above": O.BRIGHT_ABOVE,
                                    "blurry_below": O.BLURRY_BELOW, "flat_std": O.FLAT_STD}
    if tiny_below_px is not None:
        thresholds["tiny_below_px"] = float(tiny_below_px)
    return ExploreResult(duplicates=str(run.duplicates), outliers=str(run.outliers), images=scan.has_images,
                         pairs=dups.pairs_by_kind, groups=dups.groups, images_in_groups=dups.images_in_groups,
                         redundant=dups.redundant, flagged=flagged,
                         algorithm=clusters[0].algorithm if clusters else None, thresholds=thresholds,
                         backends=dups.backends, neighbours=neighbours, cells=cells,
                         phash_chance_matches=dups.phash_chance_matches, phash_off=dups.phash_off,
                         seconds=round(time.perf_counter() - t0, 3))
