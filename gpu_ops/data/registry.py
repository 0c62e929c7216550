"""Open a dataset from its spec string."""

from __future__ import annotations

from gpu_ops.data import readers
from gpu_ops.data.base import SPLITS, Dataset
from gpu_ops.errors import InputError, choice_error

DATASET_KINDS = ("digits", "idx", "folder", "npz", "npy", "usps", "parquet")
#: The kinds whose files hold a train/test split (``split`` selects from it); the others have none.
SPLIT_KINDS = ("idx", "usps")


def dataset_kind(spec: str) -> str:
    """The kind of a dataset spec (``digits``, ``idx``, ...); InputError for an unknown kind or a missing path."""
    kind, _, arg = spec.partition(":")
    if kind not in DATASET_KINDS:
        raise InputError(f"unknown dataset {spec!r}; expected digits or KIND:PATH with KIND one of: "
                         + ", ".join(k for k in DATASET_KINDS if k != "digits"))
    if kind != "digits" and not arg:
        raise InputError(f"dataset {spec!r} needs a path: {kind}:PATH")
    return kind


def load_dataset(spec: str, split: str = "all", limit: int | None = None) -> Dataset:
    """Open ``spec`` (see :mod:`gpu_ops.data`), select ``split`` and keep the first ``limit`` items.

    Raises :class:`InputError` with a one-line message for unknown kinds, missing paths and
    unreadable files.
    """
    if split not in SPLITS:
        raise choice_error("split", split, SPLITS)
    if limit is not None and limit < 1:
        raise InputError(f"limit must be a positive integer; got {limit}")
    kind = dataset_kind(spec)
    arg = spec.partition(":")[2]
    path = readers.env_path(arg) if arg else None
    if kind == "digits":
        ds: Dataset = readers.digits(split)
    elif kind == "idx":
        ds = readers.idx(path, split)  # type: ignore[arg-type]
    elif kind == "folder":
        ds = readers.FolderDataset(path)  # type: ignore[arg-type]
    elif kind in ("npz", "npy"):
        ds = readers.arrays(path)  # type: ignore[arg-type]
    elif kind == "usps":
        ds = readers.usps(path, split)  # type: ignore[arg-type]
    else:
        ds = readers.parquet_embeddings(path)  # type: ignore[arg-type]
    return ds.subset(limit)
