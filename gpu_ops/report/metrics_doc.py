"""The shape of a run directory's ``metrics.json`` (written by :func:`gpu_ops.pipeline.finalize_run`).

The report trusts what it reads, so :func:`read_metrics` checks the document first: a
``metrics.json`` that is not JSON, or has a field of the wrong type (``"n": "abc"``,
``"algorithms": []``), is an :class:`~gpu_ops.errors.InputError` naming the file and the field.
Keys beyond the ones listed are allowed (newer writers may add some).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gpu_ops.errors import InputError


class _Part(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class AlgorithmMetrics(_Part):
    """One algorithm's entry: k, the backend that ran, cluster sizes, and scores when labels exist."""

    k: int
    backend: str | None = None
    cluster_sizes: list[int] = Field(default_factory=list)
    noise: int | None = None
    #: Deep algorithms only: why the result looks degenerate, one sentence per finding (one
    #: cluster holds most images, empty clusters, an autoencoder whose reconstructions ignore the
    #: input or never beat the mean image); ``[]`` when checked and nothing was found. The run's
    #: log carries the same sentences as warnings.
    degenerate: list[str] | None = None
    acc: float | None = None
    nmi: float | None = None
    ari: float | None = None


class ExtractInfo(_Part):
    extractor: str | None = None
    device: str | None = None
    dim: int | None = None


class ReducerInfo(_Part):
    name: str | None = None
    backend: str | None = None
    fitted_rows: int | None = None  #: the map was fitted on this many rows (a sample when fewer than n)
    placement: str | None = None  #: how the other rows were placed (None: every row was fitted)


class BackendRow(_Part):
    """One backend resolution (see :class:`gpu_ops.registry.Resolution`)."""

    op: str | None = None
    requested: str | None = None
    backend: str | None = None
    kind: str | None = None
    reason: str | None = None
    fallbacks: list[str] = Field(default_factory=list)


class ExploreInfo(_Part):
    """The explore stage (:class:`gpu_ops.explore.stage.ExploreResult`): ``ran`` false when the run
    skipped it (``explore: false``, ``--no-explore``); otherwise the files it wrote, duplicate pairs
    by kind, groups, images per quality flag, the thresholds it used, the knn backends and how
    the neighbours were searched."""

    ran: bool
    duplicates: str | None = None
    outliers: str | None = None
    images: bool | None = None
    pairs: dict[str, int] = Field(default_factory=dict)
    groups: int | None = None
    images_in_groups: int | None = None
    redundant: int | None = None
    flagged: dict[str, int] = Field(default_factory=dict)
    algorithm: str | None = None
    thresholds: dict[str, float] = Field(default_factory=dict)
    backends: list[str] = Field(default_factory=list)
    #: "exact", or "within N cells" for a store beyond ``memory_mb`` (:mod:`gpu_ops.explore.cells`)
    neighbours: str | None = None
    cells: dict[str, int] | None = None
    phash_chance_matches: float | None = None  #: median other images within the phash threshold
    phash_off: str | None = None  #: why perceptual hashes were not used


class KSelectionInfo(_Part):
    """``k=auto``: the k chosen, the label-free score that chose it and its curve over ``ks``."""

    chosen_k: int
    method: str
    ks: list[int]
    score: list[float]
    elbow_k: int | None = None
    rows: int | None = None


class MetricsDoc(_Part):
    """``metrics.json``: what the run found, per algorithm, and how it ran."""

    dataset: str
    n: int = Field(ge=0)
    algorithms: dict[str, AlgorithmMetrics]
    quarantined: int = 0
    store: str | None = None
    extract: ExtractInfo | None = None
    reducer: ReducerInfo | None = None
    backends: list[BackendRow] = Field(default_factory=list)
    fallbacks: list[str] = Field(default_factory=list)
    explore: ExploreInfo | None = None
    timings_s: dict[str, float] = Field(default_factory=dict)
    k_selection: KSelectionInfo | None = None


def _problem(path: Path, exc: ValidationError) -> str:
    err = exc.errors()[0]
    if err["type"] == "json_invalid":
        return f"{path}: not valid JSON ({err['msg'].removeprefix('Invalid JSON: ')})"
    where = ".".join(str(p) for p in err["loc"])
    if not where:
        return f"{path}: expected a JSON object of run metrics ({err['msg']})"
    if err["type"] == "missing":
        return f"{path}: field {where} is missing"
    return f"{path}: field {where}: {err['msg']} (got {err.get('input')!r})"


def read_metrics(path: Path) -> dict[str, Any]:
    """The checked content of ``path`` (a ``metrics.json``) as a dict, with any extra keys kept.

    Raises InputError naming the file and the field when it is unreadable, not JSON, or a field
    has the wrong type.
    """
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        doc = MetricsDoc.model_validate_json(text)
    except ValidationError as exc:
        raise InputError(_problem(path, exc)) from None
    return doc.model_dump(exclude_unset=True)
