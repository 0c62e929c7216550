"""The explore stage of a run: duplicates and outliers of the store's items, into the run directory.

:func:`explore_stage` scans the dataset's items once (:mod:`gpu_ops.explore.scan`), searches the
embeddings' nearest neighbours with the ``knn`` op (by cosine for near duplicates, by Euclidean
distance for outlier scores), and writes ``duplicates.parquet``
(:mod:`gpu_ops.explore.duplicates`) and ``outliers.parquet`` (:mod:`gpu_ops.explore.outliers`).
What it found and the thresholds it used go into metrics.json's ``explore`` entry.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from gpu_ops.config import RunConfig
from gpu_ops.data import load_dataset
from gpu_ops.explore.duplicates import DuplicateSettings, embedding_neighbours, find_duplicates
from gpu_ops.explore import outliers as O
from gpu_ops.explore.scan import scan_items
from gpu_ops.rundir import RunDir
from gpu_ops.stages import ClusterResult, StageModel
from gpu_ops.store import atomic_write_table, read_embeddings


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

    def as_json(self) -> dict[str, Any]:
        """The entry as metrics.json holds it (file names, not paths)."""
        doc = {"ran": True, **self.model_dump(exclude={"seconds"})}
        doc["duplicates"], doc["outliers"] = Path(self.duplicates).name, Path(self.outliers).name
        return doc


def explore_stage(store: str, cfg: RunConfig, staging: str, clusters: list[ClusterResult],
                  settings: DuplicateSettings = DuplicateSettings()) -> ExploreResult:
    """Find duplicates and score outliers of the store's items; write both tables into ``staging``.

    ``clusters``: the run's cluster results (the first one's labels give the cluster ratio).
    """
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
    thresholds: dict[str, float] = {**{k: float(v) for k, v in asdict(settings).items()},
                                    "dark_below": O.DARK_BELOW, "bright_above": O.BRIGHT_ABOVE,
                                    "blurry_below": O.BLURRY_BELOW, "flat_std": O.FLAT_STD}
    if scores.tiny_below_px is not None:
        thresholds["tiny_below_px"] = float(scores.tiny_below_px)
    return ExploreResult(duplicates=str(run.duplicates), outliers=str(run.outliers), images=scan.has_images,
                         pairs=dups.pairs_by_kind, groups=dups.groups, images_in_groups=dups.images_in_groups,
                         redundant=dups.redundant, flagged=scores.flagged,
                         algorithm=clusters[0].algorithm if clusters else None, thresholds=thresholds,
                         backends=dups.backends, seconds=round(time.perf_counter() - t0, 3))
