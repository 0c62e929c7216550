"""Export a run's clusters as folders: one per cluster, plus a CSV, written so that a rerun changes nothing.

``DIR/cluster-03_n412/`` holds cluster 3's 412 images (``noise_n12/`` the items HDBSCAN left
out): symbolic links to the files of an image folder (copies with ``copy=True``), or PNG files
for datasets held in arrays (digits, IDX, npz, USPS), which have no files to link. Names inside a
folder are the image ids with ``/`` turned into ``__``. ``DIR/clusters.csv`` lists ``image_id,
path, cluster, source`` (``path`` relative to DIR; ``source`` the original file, empty for arrays).

``DIR/.gpuclust-export`` marks the folder as an export of one run directory and lists every file
the export wrote. ``DIR`` may be a new path, an empty folder or an earlier export of the same run;
anything else is refused before any change. Only files the marker lists are ever replaced or
removed, so the user's own files in an export folder are left alone; a rerun writes only what
differs (nothing, when the run is unchanged).
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from gpu_ops.errors import InputError, choice_error
from gpu_ops.fsutil import atomic_write_bytes
from gpu_ops.rundir import RUN_MARKER, RunDir, dataset_path

EXPORT_MARKER = ".gpuclust-export"
CSV_NAME = "clusters.csv"
TO_RULE = "--to must name a new path, an empty folder or an earlier export of this run"


@dataclass(frozen=True)
class Entry:
    """One exported image: where it goes (relative to DIR), its cluster, and what fills it."""

    image_id: str
    path: str
    cluster: int
    source: Path | None  #: the original file (image folders)
    index: int  #: the dataset index (array datasets: the image to write)


@dataclass
class ExportResult:
    """What :func:`export_run` did: ``written``/``removed``/``unchanged`` count files of the export."""

    directory: Path
    csv: Path
    mode: Literal["link", "copy", "png"]
    algorithm: str
    images: int
    clusters: int
    written: int
    removed: int
    unchanged: int


def _run_inputs(run_dir: Path) -> tuple[dict[str, Any], Any]:
    """(config.yaml's settings, assignments as a DataFrame) of a finished run; InputError otherwise."""
    import pandas as pd
    import yaml

    if not run_dir.exists():
        raise InputError(f"{run_dir}: run directory does not exist")
    if not run_dir.is_dir():
        raise InputError(f"{run_dir}: not a directory; name a run directory that gpuclust run wrote")
    run = RunDir(run_dir)
    if not (run_dir / RUN_MARKER).is_file() or not run.assignments.is_file() or not run.config.is_file():
        raise InputError(f"{run_dir}: not a finished gpuclust run (it needs {RUN_MARKER}, {run.ASSIGNMENTS} and "
                         f"{run.CONFIG}); name a run directory that gpuclust run wrote")
    try:
        cfg = yaml.safe_load(run.config.read_text())
        assignments = pd.read_parquet(run.assignments)
    except Exception as exc:  # noqa: BLE001 - any damage is the same message
        raise InputError(f"{run_dir}: cannot read the run ({str(exc).splitlines()[0] if str(exc) else exc})") from None
    if not isinstance(cfg, dict) or "dataset" not in cfg or "image_id" not in assignments.columns:
        raise InputError(f"{run_dir}: damaged run: {run.CONFIG} names no dataset or {run.ASSIGNMENTS} has no image_id")
    return cfg, assignments


def _overlap(a: Path, b: Path) -> bool:
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def _read_marker(to: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads((to / EXPORT_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and isinstance(doc.get("files"), list) else None


def check_export_dir(to: Path, run_dir: Path, dataset: str) -> dict[str, Any] | None:
    """Refuse a ``--to`` that an export could damage; return the earlier export's marker, if any.

    Raises
    ------
    InputError
        ``to`` is a file, the dataset's folder (or inside or around it) or the run directory (or
        around it), or a non-empty folder without a marker naming ``run_dir``.
    """
    real = to.resolve()
    data = dataset_path(dataset)
    if data is not None and _overlap(real, data.resolve()):
        raise InputError(f"{to}: overlaps the dataset {dataset}; {TO_RULE}")
    if real == run_dir.resolve() or run_dir.resolve().is_relative_to(real):
        raise InputError(f"{to}: is or holds the run directory {run_dir}; {TO_RULE}")
    if to.is_symlink() and not to.exists():
        raise InputError(f"{to}: is a broken symbolic link; {TO_RULE}")
    if not to.exists():
        return None
    if not to.is_dir():
        raise InputError(f"{to}: is a file, not a folder; {TO_RULE}")
    if next(to.iterdir(), None) is None:
        return None
    marker = _read_marker(to)
    if marker is None:
        raise InputError(f"{to}: is a folder that is not an earlier export (not empty, no {EXPORT_MARKER} file); "
                         f"{TO_RULE}")
    if marker.get("run") != str(run_dir.resolve()):
        raise InputError(f"{to}: is an export of another run ({marker.get('run')}); {TO_RULE}")
    return marker


def plan_export(assignments: Any, algorithm: str, dataset: Any, files: bool) -> list[Entry]:
    """Where each image of the run goes: ``cluster-NN_nSIZE/<image id with / as __>``, in
    assignment order (``files``: the dataset has files to link, else PNGs are written)."""
    labels = assignments[algorithm].to_numpy().astype(np.int64)
    ids = assignments["image_id"].astype(str).tolist()
    clusters, sizes = np.unique(labels, return_counts=True)
    width = max(2, len(str(int(clusters.max())))) if clusters.size else 2
    folder = {int(c): (f"noise_n{n}" if c < 0 else f"cluster-{int(c):0{width}d}_n{n}") for c, n in zip(clusters, sizes)}
    position = {str(i): k for k, i in enumerate(dataset.image_ids)}
    missing = [i for i in ids if i not in position]
    if missing:
        raise InputError(f"{dataset.name}: image {missing[0]!r} of the run is no longer in the dataset "
                         f"({len(missing)} missing); the dataset changed since the run")
    entries = []
    for image_id, c in zip(ids, labels):
        k = position[image_id]
        name = image_id.replace("/", "__") + ("" if files else ".png")
        source = Path(os.path.abspath(dataset.paths[k])) if files else None
        entries.append(Entry(image_id, f"{folder[int(c)]}/{name}", int(c), source, k))
    return entries


def csv_bytes(entries: list[Entry]) -> bytes:
    """``clusters.csv``: image_id, path, cluster, source; one row per image, ``\\n`` line ends."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["image_id", "path", "cluster", "source"])
    for e in entries:
        writer.writerow([e.image_id, e.path, e.cluster, "" if e.source is None else str(e.source)])
    return out.getvalue().encode("utf-8")


def png_bytes(image: np.ndarray) -> bytes:
    """An image array (h, w[, c]) uint8 as PNG bytes (the same bytes for the same array)."""
    from PIL import Image

    a = np.asarray(image)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    buf = io.BytesIO()
    Image.fromarray(a.astype(np.uint8, copy=False)).save(buf, format="PNG")
    return buf.getvalue()


def _up_to_date(dest: Path, entry: Entry, mode: str, data: bytes | None) -> bool:
    if mode == "link":
        return dest.is_symlink() and os.readlink(dest) == str(entry.source)
    if dest.is_symlink() or not dest.is_file():
        return False
    if mode == "copy":
        assert entry.source is not None
        a, b = dest.stat(), entry.source.stat()
        return a.st_size == b.st_size and a.st_mtime_ns == b.st_mtime_ns
    return dest.read_bytes() == data


def _place(dest: Path, entry: Entry, mode: str, data: bytes | None) -> None:
    """Create ``dest`` (a link, a copy or PNG bytes) under a temporary name, then rename it onto place."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mktemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        if mode == "link":
            os.symlink(str(entry.source), tmp)
        elif mode == "copy":
            shutil.copy2(entry.source, tmp)  # type: ignore[arg-type]
        else:
            tmp.write_bytes(data or b"")
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _marker_bytes(run_dir: Path, algorithm: str, mode: str, files: list[str]) -> bytes:
    return (json.dumps({"run": str(run_dir.resolve()), "algorithm": algorithm, "mode": mode, "files": sorted(files)},
                       indent=1) + "\n").encode()


def _write_if_changed(path: Path, data: bytes) -> bool:
    if path.is_file() and not path.is_symlink() and path.read_bytes() == data:
        return False
    atomic_write_bytes(path, data)
    return True


def export_run(run_dir: Path | str, to: Path | str, *, copy: bool = False, algorithm: str | None = None) -> ExportResult:
    """Export the clusters of ``run_dir`` into the folder ``to`` (see the module docstring).

    Raises
    ------
    InputError
        A bad run directory, an unknown ``algorithm`` (the run's cluster columns are listed), a
        dataset that is gone or changed, a vector dataset (no images), or a ``to`` that
        :func:`check_export_dir` refuses; nothing is written then.
    """
    from gpu_ops.data import load_dataset

    run_dir = Path(os.path.abspath(os.path.expanduser(os.fspath(run_dir))))
    raw_to = os.fspath(to)
    if not raw_to.strip():
        raise InputError(f'--to "": an empty path is not a folder; {TO_RULE}')
    to = Path(os.path.abspath(os.path.expanduser(raw_to)))
    cfg, assignments = _run_inputs(run_dir)
    columns = [c for c in assignments.columns if c != "image_id"]
    algorithm = algorithm or (columns[0] if columns else None)
    if algorithm not in columns:
        raise choice_error("algorithm", algorithm, columns)
    spec = str(cfg["dataset"])
    marker = check_export_dir(to, run_dir, spec)
    dataset = load_dataset(spec, cfg.get("split") or "all", cfg.get("limit"))
    if dataset.item_kind != "image":
        raise InputError(f"{spec} holds vectors, not images: there is nothing to put in cluster folders")
    files = getattr(dataset, "paths", None) is not None
    mode: Literal["link", "copy", "png"] = ("copy" if copy else "link") if files else "png"
    entries = plan_export(assignments, algorithm, dataset, files)
    ours = set(marker["files"]) if marker else set()
    planned = {e.path for e in entries}
    clash = next((p for p in sorted(planned) if p not in ours and ((to / p).exists() or (to / p).is_symlink())), None)
    if clash is not None:
        raise InputError(f"{to / clash}: is in the way and was not written by an export; move it and export again")

    to.mkdir(parents=True, exist_ok=True)
    # The marker names every file before any is written: an interrupted export is still ours.
    _write_if_changed(to / EXPORT_MARKER, _marker_bytes(run_dir, algorithm, mode, sorted(ours | planned | {CSV_NAME})))
    written = unchanged = removed = 0
    for e in entries:
        dest = to / e.path
        data = png_bytes(dataset.load(e.index)) if mode == "png" else None
        if (dest.exists() or dest.is_symlink()) and _up_to_date(dest, e, mode, data):
            unchanged += 1
            continue
        _place(dest, e, mode, data)
        written += 1
    for rel in sorted(ours - planned - {CSV_NAME}):
        stale = to / rel
        if stale.is_symlink() or stale.is_file():
            stale.unlink()
            removed += 1
        try:
            stale.parent.rmdir()  # only when empty: a user's file in it keeps the folder
        except OSError:
            pass
    _write_if_changed(to / CSV_NAME, csv_bytes(entries))
    _write_if_changed(to / EXPORT_MARKER, _marker_bytes(run_dir, algorithm, mode, sorted(planned | {CSV_NAME})))
    return ExportResult(to, to / CSV_NAME, mode, algorithm, len(entries), len({e.cluster for e in entries}),
                        written, removed, unchanged)
