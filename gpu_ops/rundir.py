"""Run directories: staged in a hidden sibling, swapped into place only when complete.

A run that fails leaves its staging directory (``.NAME.partial-*``) and never a directory that
looks complete; a previous good run at the same path is replaced only by a finished one.

gpuclust only ever replaces what it wrote itself: a finished run directory holds the marker file
``.gpuclust-run``, and ``--out`` may name only a missing path, an empty directory or such an
earlier run (:func:`check_out_dir`). A staging directory holds ``.gpuclust-staging`` with the
PID and host of the run writing it, so a later run removes only the leftovers of dead runs
(:func:`remove_leftovers`).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from pathlib import Path

import psutil

from gpu_ops.errors import InputError


class RunDir:
    """Every file name of a run directory (or of its staging directory): the one place they are formed.

    Stages write through it and the report reads through it::

        run = RunDir(staging)
        np.save(run.labels("kmeans"), labels)

    ``labels-<algorithm>.npy`` and ``map2d.npy`` are scratch files between stages
    (:meth:`scratch_files`: removed once ``assignments.parquet`` and ``map2d.parquet`` hold them);
    the rest stay in the finished run.
    """

    CONFIG = "config.yaml"
    ASSIGNMENTS = "assignments.parquet"
    MAP2D = "map2d.parquet"
    METRICS = "metrics.json"
    K_SELECTION = "k_selection.json"
    REPORT = "report.html"
    FIGURES = "figures"
    RECONSTRUCTIONS = "reconstructions.npz"
    TSNE_SWEEP = "tsne_sweep.npz"
    MAP_PNG = "map.png"
    DUPLICATES = "duplicates.parquet"
    OUTLIERS = "outliers.parquet"
    MAP2D_SCRATCH = "map2d.npy"
    SEARCH_INFO = "search.json"
    SEARCH_VECTORS = "search-vectors.npy"
    SEARCH_INDEX = "search.faiss"
    EMBEDDER = "embedder.json"
    _LABELS = "labels-{}.npy"
    _LINKAGE = "linkage-{}.npy"
    _HISTORY = "history-{}.json"
    _MODEL = "model-{}.npz"
    _MODEL_INFO = "model-{}.json"
    _ENCODER = "encoder-{}.pt"
    _HEAD = "model-{}.pt"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __fspath__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def labels(self, algorithm: str) -> Path:
        """One algorithm's labels (int64 ``.npy``, store order) between the cluster and write stages."""
        return self.path / self._LABELS.format(algorithm)

    def linkage(self, algorithm: str) -> Path:
        """A hierarchical algorithm's linkage matrix (n-1, 4), for the report's dendrogram."""
        return self.path / self._LINKAGE.format(algorithm)

    def history(self, algorithm: str) -> Path:
        """A deep clustering algorithm's per-epoch history (JSON list)."""
        return self.path / self._HISTORY.format(algorithm)

    def model(self, algorithm: str) -> Path:
        """What ``gpuclust assign`` predicts ``algorithm``'s clusters with (arrays, ``.npz``)."""
        return self.path / self._MODEL.format(algorithm)

    def model_info(self, algorithm: str) -> Path:
        """The saved model's kind, its novelty threshold and what the threshold means (JSON)."""
        return self.path / self._MODEL_INFO.format(algorithm)

    def head(self, algorithm: str) -> Path:
        """A clustering head's saved model (``load_head(path)`` answers ``predict_proba``)."""
        return self.path / self._HEAD.format(algorithm)

    def encoder(self, algorithm: str) -> Path:
        """A deep clustering algorithm's trained encoder (an autoencoder checkpoint)."""
        return self.path / self._ENCODER.format(algorithm)

    def linkages(self) -> dict[str, Path]:
        """Every linkage matrix present, by algorithm name (sorted)."""
        prefix, suffix = self._LINKAGE.split("{}")
        return {p.name[len(prefix):-len(suffix)]: p for p in sorted(self.path.glob(self._LINKAGE.format("*")))}

    def scratch_files(self) -> list[Path]:
        """The between-stage files present (labels arrays, the 2-D map array)."""
        found = list(self.path.glob(self._LABELS.format("*")))
        return found + ([self.map2d_scratch] if self.map2d_scratch.exists() else [])

    @property
    def config(self) -> Path:
        return self.path / self.CONFIG

    @property
    def assignments(self) -> Path:
        return self.path / self.ASSIGNMENTS

    @property
    def map2d(self) -> Path:
        return self.path / self.MAP2D

    @property
    def map2d_scratch(self) -> Path:
        """The reduce stage's 2-D map (float32 ``.npy``) until ``map2d.parquet`` holds it."""
        return self.path / self.MAP2D_SCRATCH

    @property
    def metrics(self) -> Path:
        return self.path / self.METRICS

    @property
    def k_selection(self) -> Path:
        """``k=auto``'s curves and choice, made once per run and shared by every algorithm."""
        return self.path / self.K_SELECTION

    @property
    def report(self) -> Path:
        return self.path / self.REPORT

    @property
    def figures(self) -> Path:
        return self.path / self.FIGURES

    @property
    def reconstructions(self) -> Path:
        return self.path / self.RECONSTRUCTIONS

    @property
    def tsne_sweep(self) -> Path:
        return self.path / self.TSNE_SWEEP

    @property
    def duplicates(self) -> Path:
        """Exact and near duplicate pairs with their groups (:mod:`gpu_ops.explore.duplicates`)."""
        return self.path / self.DUPLICATES

    @property
    def outliers(self) -> Path:
        """Per-image outlier scores and quality flags (:mod:`gpu_ops.explore.outliers`)."""
        return self.path / self.OUTLIERS

    @property
    def search_info(self) -> Path:
        """The similar-image index: which kind (exact or IVF-Flat) and how it was built."""
        return self.path / self.SEARCH_INFO

    @property
    def search_vectors(self) -> Path:
        """The exact index: the run's embeddings (float32 (n, d), store order)."""
        return self.path / self.SEARCH_VECTORS

    @property
    def search_index(self) -> Path:
        """The approximate index (a FAISS ``IndexIVFFlat``), for large runs."""
        return self.path / self.SEARCH_INDEX

    @property
    def embedder(self) -> Path:
        """How the run embedded its images (extractor identity, item shape): what new images get."""
        return self.path / self.EMBEDDER


RUN_FILES = (RunDir.CONFIG, RunDir.ASSIGNMENTS, RunDir.MAP2D, RunDir.METRICS, RunDir.MAP_PNG)

#: In every finished run directory: gpuclust wrote it, so a later run may replace it.
RUN_MARKER = ".gpuclust-run"
#: In every staging directory: the PID and host of the run writing it.
STAGING_MARKER = ".gpuclust-staging"
#: ``.NAME.partial-XXXXXXXX`` (a run being written) and ``.NAME.old-XXXXXXXX`` (a run being replaced).
_LEFTOVER = re.compile(r"\..+\.(?P<kind>partial|old)-[0-9a-f]{8}")
#: What every refusal of ``--out`` ends with.
OUT_RULE = "--out must name a new path, an empty directory or an earlier gpuclust run"
_NAME_MAX = 255 - len(".partial-00000000.")


def default_run_dir(dataset: str) -> Path:
    """``runs/<timestamp>-<dataset kind>``, created empty here (``-2``, ``-3``, ... when taken), so that
    two runs started in the same second never commit to one folder, the later replacing the other."""
    base = f"{time.strftime('%Y%m%d-%H%M%S')}-{dataset.split(':', 1)[0]}"
    Path("runs").mkdir(exist_ok=True)
    for n in itertools.count(1):
        path = Path("runs") / (base if n == 1 else f"{base}-{n}")
        try:
            path.mkdir()  # exclusive: a concurrent run gets FileExistsError and takes the next name
        except FileExistsError:
            continue
        return path
    raise AssertionError("unreachable")


def release_run_dir(out: Path) -> None:
    """Remove ``out`` when it is still the empty folder :func:`default_run_dir` made (a run that failed)."""
    try:
        Path(out).rmdir()
    except OSError:
        pass  # not empty (an earlier run) or already gone


def is_run_dir(path: Path) -> bool:
    """True when ``path`` is a directory that gpuclust wrote as a run (it holds the run marker)."""
    return Path(path).is_dir() and (Path(path) / RUN_MARKER).is_file()


def dataset_path(spec: str) -> Path | None:
    """The file or folder a dataset spec reads (``folder:DIR`` -> DIR); None for ``digits``."""
    from gpu_ops.data.readers import env_path

    kind, _, arg = spec.partition(":")
    return env_path(arg) if kind != "digits" and arg else None


def _overlap(out: Path, other: Path) -> str | None:
    """How ``out`` and ``other`` (both resolved) share files, in words; None when they do not."""
    if out == other:
        return "is"
    if out.is_relative_to(other):
        return "is inside"
    if other.is_relative_to(out):
        return "contains"
    return None


def _refusal(out: Path, dataset: str | None, cache_root: Path | None) -> str | None:
    """Why ``out`` (absolute, ``~`` expanded) must not be written; None when it may."""
    real = out.resolve()
    if real.parent == real:
        return "is the filesystem root"
    for place, what in ((Path.home(), "your home directory"), (Path.cwd(), "the working directory")):
        how = _overlap(real, place.resolve())
        if how in ("is", "contains"):
            return f"{how} {what}"
    data = dataset_path(dataset) if dataset else None
    if data is not None:
        how = _overlap(real, data.resolve())
        if how:
            return f"{how} the dataset {dataset}"
    if cache_root is not None:
        how = _overlap(real, Path(cache_root).expanduser().resolve())
        if how:
            return f"{how} the cache {cache_root}"
    if out.is_symlink() and not out.exists():
        return "is a broken symbolic link"
    if out.exists():
        if not out.is_dir():
            return "is a file, not a directory"
        if os.path.ismount(out):
            return "is a mount point"
        try:
            empty = next(out.iterdir(), None) is None
        except OSError as exc:
            return f"cannot be read ({exc.strerror})"
        if not empty and not is_run_dir(out):
            return f"is a directory that gpuclust did not write (not empty, no {RUN_MARKER} file)"
    if len(out.name.encode()) > _NAME_MAX:
        return f"has a name longer than {_NAME_MAX} bytes"
    parent = out.parent
    while not parent.exists() and not parent.is_symlink():
        parent = parent.parent
    if not parent.is_dir():
        return f"cannot be created: {parent} is not a directory"
    try:  # a probe, not os.access: root passes that even on a read-only filesystem or /proc
        Path(tempfile.mkdtemp(prefix=".gpuclust-probe-", dir=parent)).rmdir()
    except OSError as exc:
        return f"cannot be created: {parent} is not writable ({exc.strerror or exc})"
    return None


def check_out_dir(out: Path | str, dataset: str | None = None, cache_root: Path | None = None) -> Path:
    """Refuse, before any work, a run directory whose replacement could destroy what is not ours.

    ``out`` may name a missing path (its parent creatable), an empty directory, or an earlier
    gpuclust run (it holds :data:`RUN_MARKER`). Refused: an empty string, ``/``, the home or
    working directory or a folder holding them, a file, an impossible path, the dataset
    (``dataset`` is its spec string) or anything inside or around it, and the cache root.

    Returns
    -------
    Path
        ``out``, absolute, with ``~`` expanded.

    Raises
    ------
    InputError
        One line naming the path, why it is refused and what ``--out`` may name.
    """
    raw = os.fspath(out)
    if not raw.strip():
        raise InputError(f'--out "": an empty path is not a run directory; {OUT_RULE}')
    path = Path(os.path.abspath(os.path.expanduser(raw)))
    try:
        why = _refusal(path, dataset, cache_root)
    except OSError as exc:
        why = f"cannot be used ({exc.strerror or exc})"
    if why:
        raise InputError(f"{path}: {why}; {OUT_RULE}")
    return path


def _owner_alive(marker: dict[str, object]) -> bool:
    """True unless the run that wrote a staging marker is certainly gone (same host, PID dead)."""
    if marker.get("host") != socket.gethostname():
        return True  # another machine's run (shared filesystem): cannot tell
    pid = marker.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return True
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False  # killed, not yet reaped
        start = proc.create_time()
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True  # alive, another user's
    return marker.get("start") in (None, start)  # a reused PID has another creation time


def _remove_marked(path: Path, marker: str) -> None:
    """Delete ``path``, its marker last: an interrupted removal still leaves a marked directory."""
    for child in path.iterdir():
        if child.name == marker:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
    (path / marker).unlink(missing_ok=True)
    path.rmdir()


def remove_leftovers(parent: Path) -> list[Path]:
    """Remove staging (``.NAME.partial-*``) and replaced (``.NAME.old-*``) directories in ``parent``
    left by killed runs; returns what was removed.

    A staging directory goes only when its marker names a dead process on this host (a live
    run's staging, another host's, or an unmarked directory is kept); a replaced directory goes
    when it is an earlier run (marked) or empty.
    """
    removed: list[Path] = []
    try:
        entries = list(Path(parent).iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _LEFTOVER.fullmatch(entry.name)
        if not match or entry.is_symlink() or not entry.is_dir():
            continue
        try:
            if match["kind"] == "partial":
                try:
                    marker = json.loads((entry / STAGING_MARKER).read_text())
                except (OSError, ValueError):
                    continue
                if not isinstance(marker, dict) or _owner_alive(marker):
                    continue
                _remove_marked(entry, STAGING_MARKER)
            elif (entry / RUN_MARKER).is_file():
                _remove_marked(entry, RUN_MARKER)
            else:
                entry.rmdir()  # only when empty: an emptied directory moved aside
        except OSError:
            continue
        removed.append(entry)
    return removed


def start_run(out: Path) -> Path:
    """Create and return a fresh staging directory beside ``out`` (marked with this process's
    PID and host), after removing the leftovers of dead runs there."""
    out = Path(out).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(out.parent)
    staging = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "start": psutil.Process().create_time()}
    (staging / STAGING_MARKER).write_text(json.dumps(owner))
    return staging


def _replaceable(out: Path) -> bool:
    """An earlier run or an empty directory (or a link, which is moved aside, never followed)."""
    if out.is_symlink():
        return True
    return out.is_dir() and (is_run_dir(out) or next(out.iterdir(), None) is None)


def commit_run(staging: Path, out: Path) -> Path:
    """Mark a finished staging directory as a run and move it to ``out``, replacing an earlier
    run or an empty directory there. Anything else at ``out`` is left alone: :class:`InputError`,
    and the finished run stays in ``staging``."""
    from gpu_ops import __version__

    out = Path(out).expanduser().absolute()
    marker = {"gpuclust": __version__, "run_id": uuid.uuid4().hex,
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (staging / RUN_MARKER).write_text(json.dumps(marker))
    old = None
    if out.exists() or out.is_symlink():
        if not _replaceable(out):
            (staging / STAGING_MARKER).unlink(missing_ok=True)  # keep the finished run from clean-up
            raise InputError(f"{out}: not replaced: it now holds files that gpuclust did not write; "
                             f"the finished run is in {staging}")
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
    os.replace(staging, out)
    (out / STAGING_MARKER).unlink(missing_ok=True)
    if old is not None:
        try:
            if old.is_symlink():
                old.unlink()
            elif (old / RUN_MARKER).is_file():
                _remove_marked(old, RUN_MARKER)
            else:
                old.rmdir()
        except OSError:
            pass  # a later run's remove_leftovers retries
    return out
