"""What the report's figures show, computed without drawing anything.

Every figure in :mod:`gpu_ops.report.figures` is fed by a function here, so tests can check the
data (which images a montage shows, where a thumbnail sits, what the confusion matrix counts)
without looking at pixels.

Reading a run directory is forgiving: :func:`load_run` returns what it could read plus one
:class:`Missing` note per absent or unusable file, and raises for one bad file only: a
``metrics.json`` that is there but not valid (see :mod:`gpu_ops.report.metrics_doc`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from gpu_ops.report.metrics_doc import read_metrics
from gpu_ops.rundir import RunDir

RECONSTRUCTIONS = RunDir.RECONSTRUCTIONS
K_SELECTION = RunDir.K_SELECTION
#: Per-image outlier scores (columns ``image_id``, ``score``: higher is more unusual); optional.
OUTLIERS = RunDir.OUTLIERS


@dataclass(frozen=True)
class Missing:
    """One input the report could not use: the file (or thing) and one line saying why and what was skipped."""

    name: str
    reason: str

    def __str__(self) -> str:
        return f"{self.name}: {self.reason}"


@dataclass
class RunInputs:
    """A run directory's contents as far as they could be read.

    ``assignments`` has ``image_id`` and one int cluster column per algorithm; ``map2d`` has
    ``image_id, x, y``; ``labels`` maps image_id -> true class id (only images with a label);
    ``outliers`` maps image_id -> outlier score (from ``outliers.parquet``, when the run has one).
    """

    run_dir: Path
    config: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    assignments: pd.DataFrame | None = None
    map2d: pd.DataFrame | None = None
    k_selection: dict[str, Any] | None = None
    tsne_sweep: TsneSweep | None = None
    linkages: dict[str, np.ndarray] = field(default_factory=dict)
    labels: pd.Series | None = None
    class_names: list[str] | None = None
    outliers: pd.Series | None = None
    missing: list[Missing] = field(default_factory=list)
    #: rows of assignments.parquet (and map2d.parquet); more than ``assignments`` holds when sampled
    n_rows: int | None = None
    #: the sorted row numbers the report reads when the run has more than its row limit (None: all)
    sample: np.ndarray | None = None

    @property
    def algorithms(self) -> list[str]:
        """Cluster columns of assignments.parquet, else the algorithms metrics.json lists."""
        if self.assignments is not None:
            return [c for c in self.assignments.columns if c != "image_id"]
        if self.metrics is not None:
            return list(self.metrics.get("algorithms", {}))
        return []

    @property
    def dataset_spec(self) -> str | None:
        if self.config and self.config.get("dataset"):
            return str(self.config["dataset"])
        if self.metrics and self.metrics.get("dataset"):
            return str(self.metrics["dataset"])
        return None

    def note(self, name: str, reason: str) -> None:
        self.missing.append(Missing(name, reason))


# ---------------------------------------------------------------- reading the run directory


def _read_json(path: Path, inputs: RunInputs, skipped: str) -> dict[str, Any] | None:
    if not path.is_file():
        inputs.note(path.name, f"not found; {skipped}")
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        inputs.note(path.name, f"unreadable ({exc}); {skipped}")
        return None
    if not isinstance(doc, dict):
        inputs.note(path.name, f"expected a JSON object, found {type(doc).__name__}; {skipped}")
        return None
    return doc


#: The report reads at most this many rows of a run (a seeded uniform sample of larger runs): its
#: figures, confusion matrices and interactive map then cost the same at any n.
REPORT_MAX_ROWS = 50_000


def read_rows(path: Path, rows: np.ndarray, columns: list[str] | None = None, batch_rows: int = 65_536) -> Any:
    """The sorted row numbers ``rows`` of the Parquet file ``path`` as an Arrow table, read batch by
    batch (one batch in memory at a time)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    parts, start = [], 0
    for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
        stop = start + batch.num_rows
        lo, hi = np.searchsorted(rows, [start, stop])
        if hi > lo:
            parts.append(batch.take(pa.array(rows[lo:hi] - start)))
        start = stop
    return pa.Table.from_batches(parts, schema=pf.schema_arrow if columns is None else None) if parts else \
        pf.schema_arrow.empty_table()


def _read_parquet(path: Path, columns: tuple[str, ...], inputs: RunInputs, skipped: str,
                  optional: bool = False, rows: np.ndarray | None = None) -> pd.DataFrame | None:
    """The table at ``path`` with at least ``columns`` (only the row numbers ``rows`` when given), or
    None and a note saying why not (no note for an ``optional`` file that is absent)."""
    if not path.is_file():
        if not optional:
            inputs.note(path.name, f"not found; {skipped}")
        return None
    try:
        df = pd.read_parquet(path) if rows is None else read_rows(path, rows).to_pandas()
    except Exception as exc:  # noqa: BLE001 - any unreadable file is reported, not raised
        inputs.note(path.name, f"unreadable ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); {skipped}")
        return None
    lacking = [c for c in columns if c not in df.columns]
    if lacking:
        inputs.note(path.name, f"lacks column(s) {', '.join(lacking)} (found: {', '.join(df.columns)}); {skipped}")
        return None
    if "image_id" in df.columns:
        df["image_id"] = df["image_id"].astype(str)
    return df


def _plan_sample(inputs: RunInputs, max_rows: int | None, seed: int) -> None:
    """Count the run's rows (assignments.parquet's footer) and, beyond ``max_rows``, draw the
    seeded uniform sample of row numbers the report reads (the same rows of every per-row file:
    they are all in store order)."""
    import pyarrow.parquet as pq

    from gpu_ops.cluster.sources import subset_rows

    for name in ("assignments.parquet", "map2d.parquet"):
        try:
            inputs.n_rows = int(pq.ParquetFile(inputs.run_dir / name).metadata.num_rows)
            break
        except Exception:  # noqa: BLE001 - an absent or broken file is noted when it is read
            continue
    if max_rows is not None and inputs.n_rows is not None and inputs.n_rows > max_rows:
        inputs.sample = subset_rows(inputs.n_rows, max_rows, seed)


def load_run(run_dir: Path, max_rows: int | None = REPORT_MAX_ROWS, seed: int = 0) -> RunInputs:
    """Read every input of the report from ``run_dir``; absent or broken files become notes.

    A run of more than ``max_rows`` rows is read as a seeded uniform sample of ``max_rows`` rows
    (``inputs.sample``), streamed from its files; metrics.json's scores and sizes still cover every row.
    """
    import yaml

    run_dir = Path(run_dir)
    inputs = RunInputs(run_dir)
    cfg_path = run_dir / "config.yaml"
    if cfg_path.is_file():
        try:
            cfg = yaml.safe_load(cfg_path.read_text())
            if isinstance(cfg, dict):
                inputs.config = cfg
            else:
                inputs.note("config.yaml", "not a mapping of settings; the dataset is reopened from metrics.json's name")
        except (OSError, yaml.YAMLError) as exc:
            inputs.note("config.yaml", f"unreadable ({str(exc).splitlines()[0]}); the dataset is reopened from metrics.json's name")
    else:
        inputs.note("config.yaml", "not found; settings table skipped, the dataset is reopened from metrics.json's name (split all)")
    if (run_dir / "metrics.json").is_file():
        inputs.metrics = read_metrics(run_dir / "metrics.json")  # InputError naming the bad field
    else:
        inputs.note("metrics.json", "not found; metrics table, timings and backends skipped")
    _plan_sample(inputs, max_rows, seed)
    inputs.assignments = _read_parquet(run_dir / "assignments.parquet", ("image_id",), inputs,
                                       "cluster maps, montages, confusion matrices and dendrogram skipped",
                                       rows=inputs.sample)
    if inputs.assignments is not None:
        for col in [c for c in inputs.assignments.columns if c != "image_id"]:
            if not pd.api.types.is_integer_dtype(inputs.assignments[col]):
                inputs.note(f"assignments.parquet:{col}", f"column is {inputs.assignments[col].dtype}, not integer cluster ids; skipped")
                inputs.assignments = inputs.assignments.drop(columns=[col])
    inputs.map2d = _read_parquet(run_dir / "map2d.parquet", ("image_id", "x", "y"), inputs,
                                 "2-D maps and thumbnails skipped", rows=inputs.sample)
    if inputs.map2d is not None and _flat_map(inputs):
        inputs.note("map2d.parquet", "the run had no 2-D map (reducer none: every point at 0, 0); maps and thumbnails skipped")
        inputs.map2d = None
    if RunDir(run_dir).k_selection.is_file():
        inputs.k_selection = _read_json(RunDir(run_dir).k_selection, inputs, "k-selection curves skipped")
        if inputs.k_selection is not None and not {"ks", "inertia", "silhouette"} <= set(inputs.k_selection):
            inputs.note(K_SELECTION, "lacks ks/inertia/silhouette; k-selection curves skipped")
            inputs.k_selection = None
    sweep_path = RunDir(run_dir).tsne_sweep
    if sweep_path.is_file():
        try:
            inputs.tsne_sweep = load_tsne_sweep(sweep_path)
        except ValueError as exc:
            inputs.note(sweep_path.name, f"{exc}; t-SNE perplexity sweep skipped")
    for algo, path in RunDir(run_dir).linkages().items():
        try:
            Z = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            inputs.note(path.name, f"unreadable ({exc}); dendrogram skipped")
            continue
        n = inputs.n_rows if inputs.assignments is not None else None
        if Z.ndim != 2 or Z.shape[1] != 4 or (n is not None and Z.shape[0] != n - 1):
            want = f"({n - 1}, 4)" if n is not None else "(n-1, 4)"
            inputs.note(path.name, f"shape {Z.shape} is not a linkage matrix {want}; dendrogram skipped")
            continue
        inputs.linkages[algo] = Z
    _load_labels(inputs)
    _load_outliers(inputs)
    return inputs


def _load_outliers(inputs: RunInputs) -> None:
    """Outlier scores by image_id from ``outliers.parquet``; a run without the file has none (no note)."""
    skipped = "the map's colouring by outlier score skipped"
    df = _read_parquet(inputs.run_dir / OUTLIERS, ("image_id", "score"), inputs, skipped, optional=True)
    if df is None:
        return
    if not pd.api.types.is_numeric_dtype(df["score"]) or pd.api.types.is_bool_dtype(df["score"]):
        inputs.note(OUTLIERS, f"column score is {df['score'].dtype}, not numbers; {skipped}")
        return
    scores = pd.Series(df["score"].to_numpy(dtype=np.float64), index=pd.Index(df["image_id"], name="image_id"))
    inputs.outliers = scores[~scores.index.duplicated(keep="first")]


def _flat_map(inputs: RunInputs) -> bool:
    m = inputs.map2d
    assert m is not None
    reducer = (inputs.metrics or {}).get("reducer", {}) or {}
    if reducer.get("name") == "none":
        return True
    xy = m[["x", "y"]].to_numpy(dtype=float)
    return len(xy) > 1 and bool(np.all(xy == xy[0]))


def _load_labels(inputs: RunInputs) -> None:
    """True labels by image_id from the embedding store named in metrics.json (image_id/label columns only)."""
    store = (inputs.metrics or {}).get("store")
    if not store:
        return
    try:
        from gpu_ops.store import iter_tables

        tables = list(iter_tables(Path(store), columns=["image_id", "label"])) if inputs.sample is None \
            else _sampled_store_rows(Path(store), inputs.sample)
    except Exception as exc:  # noqa: BLE001 - a moved/deleted store only costs the label figures
        inputs.note("store", f"{store}: cannot read true labels ({str(exc).splitlines()[0]}); "
                             "label map and confusion matrices rely on the dataset's labels")
        return
    if not tables:
        return
    import pyarrow as pa

    table = pa.concat_tables(tables)
    ids = [str(i) for i in table.column("image_id").to_pylist()]
    lab = table.column("label")
    if lab.null_count == table.num_rows:
        return
    values = lab.fill_null(-1).to_numpy().astype(np.int64)
    s = pd.Series(values, index=pd.Index(ids, name="image_id"), name="label")
    inputs.labels = s[s >= 0]


def _sampled_store_rows(store: Path, rows: np.ndarray) -> list[Any]:
    """The ``image_id`` and ``label`` of the store's rows ``rows`` (sorted row numbers), part by part."""
    from gpu_ops.store import part_files

    out, start = [], 0
    for path in part_files(store):
        import pyarrow.parquet as pq

        count = pq.ParquetFile(path).metadata.num_rows
        lo, hi = np.searchsorted(rows, [start, start + count])
        if hi > lo:
            out.append(read_rows(path, rows[lo:hi] - start, columns=["image_id", "label"]))
        start += count
    return out


# ---------------------------------------------------------------- pure figure data


def cluster_order(assignments: pd.DataFrame, cluster_col: str) -> list[tuple[int, int]]:
    """(cluster id, size) pairs, largest cluster first (ties: smaller id first)."""
    counts = assignments[cluster_col].value_counts()
    return sorted(((int(c), int(n)) for c, n in counts.items()), key=lambda t: (-t[1], t[0]))


def montage_members(assignments: pd.DataFrame, cluster_col: str, cluster_id: int, max_items: int,
                    seed: int = 0) -> list[str]:
    """Image ids a montage of cluster ``cluster_id`` shows: all members when there are at most
    ``max_items``, else a seeded random sample of ``max_items``; in assignment (dataset) order.

    Sampling instead of taking the first members keeps folder datasets (sorted by class) from
    showing one class only.
    """
    if max_items < 0:
        raise ValueError(f"max_items must be >= 0; got {max_items}")
    rows = np.flatnonzero(assignments[cluster_col].to_numpy() == cluster_id)
    if rows.size > max_items:
        rows = np.sort(np.random.default_rng(seed).choice(rows, size=max_items, replace=False))
    return assignments["image_id"].iloc[rows].astype(str).tolist()


def cluster_composition(assignments: pd.DataFrame, cluster_col: str, cluster_id: int,
                        labels: pd.Series | None, top: int = 3) -> list[tuple[int, int]]:
    """The ``top`` most frequent true classes in a cluster as (class id, count), most frequent first."""
    if labels is None:
        return []
    members = assignments.loc[assignments[cluster_col].to_numpy() == cluster_id, "image_id"].astype(str)
    y = aligned_labels(members, labels)
    assert y is not None
    y = y[y >= 0]
    if y.size == 0:
        return []
    classes, counts = np.unique(y, return_counts=True)
    order = sorted(range(classes.size), key=lambda i: (-counts[i], classes[i]))[:top]
    return [(int(classes[i]), int(counts[i])) for i in order]


def thumbnail_positions(map2d: pd.DataFrame, n: int, seed: int = 0,
                        min_separation: float = 0.01) -> list[tuple[str, float, float]]:
    """Up to ``n`` (image_id, x, y) triples to draw as thumbnails, at the images' own map coordinates.

    Points are visited in a seeded random order and kept when no kept point lies within
    ``min_separation`` x (the map's diagonal) of them, so thumbnails overlap little while
    following the map's density. ``min_separation=0`` gives a plain random sample.
    """
    if n <= 0 or len(map2d) == 0:
        return []
    xy = map2d[["x", "y"]].to_numpy(dtype=np.float64)
    ids = map2d["image_id"].astype(str).to_numpy()
    finite = np.flatnonzero(np.isfinite(xy).all(axis=1))
    order = np.random.default_rng(seed).permutation(finite)
    if min_separation <= 0:
        keep = order[:n]
    else:
        span = xy[finite].max(axis=0) - xy[finite].min(axis=0) if finite.size else np.zeros(2)
        r = float(np.hypot(*span)) * min_separation
        cell = max(r, 1e-12)
        grid: dict[tuple[int, int], list[int]] = {}
        keep_list: list[int] = []
        for i in order:
            gx, gy = int(np.floor(xy[i, 0] / cell)), int(np.floor(xy[i, 1] / cell))
            near = (j for dx in (-1, 0, 1) for dy in (-1, 0, 1) for j in grid.get((gx + dx, gy + dy), ()))
            if any((xy[j, 0] - xy[i, 0]) ** 2 + (xy[j, 1] - xy[i, 1]) ** 2 < r * r for j in near):
                continue
            grid.setdefault((gx, gy), []).append(int(i))
            keep_list.append(int(i))
            if len(keep_list) >= n:
                break
        keep = np.asarray(keep_list, dtype=np.int64)
    return [(str(ids[i]), float(xy[i, 0]), float(xy[i, 1])) for i in keep]


@dataclass(frozen=True)
class ColourMode:
    """One way to colour the interactive map.

    ``key``: ``cluster:<algorithm>``, ``label`` or ``score``; ``title``: what the page calls it;
    ``values``: per map point, int64 group ids (-1: none: noise or no label) for groupings, float64
    scores (NaN: no score) for ``score``; ``names``: each group id's legend text.
    """

    key: str
    title: str
    values: np.ndarray
    names: dict[int, str] = field(default_factory=dict)

    @property
    def grouping(self) -> bool:
        """True when points fall into groups (clusters, classes), False for a continuous score."""
        return self.key != "score"


@dataclass(frozen=True)
class MapPoints:
    """The interactive map's points in map2d.parquet order: ``ids`` (n,), ``xy`` (n, 2) float32 and
    the colour modes (each algorithm's clusters, then the true labels and outlier scores when present)."""

    ids: list[str]
    xy: np.ndarray
    modes: list[ColourMode]

    def mode(self, key: str) -> ColourMode:
        return next(m for m in self.modes if m.key == key)


def map_points(inputs: RunInputs) -> MapPoints | None:
    """What the interactive map shows: one point per map2d row with every way to colour it.

    Points without a cluster in an algorithm's column (or without a true label) get group -1; a
    run without a 2-D map gives None.
    """
    m = inputs.map2d
    if m is None:
        return None
    ids = m["image_id"].astype(str).tolist()
    xy = m[["x", "y"]].to_numpy(dtype=np.float32)
    modes: list[ColourMode] = []
    if inputs.assignments is not None:
        by_id = inputs.assignments.drop_duplicates("image_id").set_index("image_id")
        for algo in inputs.algorithms:
            values = by_id[algo].reindex(ids).fillna(-1).to_numpy().astype(np.int64)
            names = {int(c): ("noise" if c < 0 else f"cluster {c}") for c in np.unique(values)}
            modes.append(ColourMode(f"cluster:{algo}", f"{algo} cluster", values, names))
    y = aligned_labels(ids, inputs.labels)
    if y is not None and (y >= 0).any():
        cn = inputs.class_names or []
        names = {int(c): ("no label" if c < 0 else cn[c] if c < len(cn) else str(c)) for c in np.unique(y)}
        modes.append(ColourMode("label", "true label", y, names))
    if inputs.outliers is not None:
        scores = inputs.outliers.reindex(pd.Index(ids)).to_numpy(dtype=np.float64)
        if np.isfinite(scores).any():
            modes.append(ColourMode("score", "outlier score", scores))
    return MapPoints(ids, xy, modes)


def group_members(points: MapPoints, key: str, group: int) -> list[str]:
    """Image ids of the points in ``group`` of colour mode ``key``, in map order (what a click lists)."""
    values = points.mode(key).values
    return [points.ids[i] for i in np.flatnonzero(values == group)]


def thumbnail_sample(n: int, max_items: int, seed: int = 0) -> np.ndarray:
    """Indices of the points that get a thumbnail on the interactive map: all of them when
    ``n <= max_items``, else a seeded random sample of ``max_items`` (sorted), so the page stays bounded."""
    if max_items < 0:
        raise ValueError(f"max_items must be >= 0; got {max_items}")
    if n <= max_items:
        return np.arange(n, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_items, replace=False)).astype(np.int64)


def aligned_labels(ids: Iterable[str], labels: pd.Series | None) -> np.ndarray | None:
    """True labels for ``ids`` in that order (-1 where unknown), or None without labels."""
    if labels is None:
        return None
    return labels.reindex(pd.Index(list(ids))).fillna(-1).to_numpy().astype(np.int64)


def confusion_for(assignments: pd.DataFrame, cluster_col: str,
                  labels: pd.Series) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`gpu_ops.metrics.mapped_confusion` over the images that have a true label.

    Returns (matrix (n_classes, n_clusters), class ids, cluster ids in column order); the matrix
    sums to the number of labelled images (n for a fully labelled run).
    """
    from gpu_ops.metrics import mapped_confusion

    y = aligned_labels(assignments["image_id"].astype(str), labels)
    assert y is not None
    sel = y >= 0
    return mapped_confusion(y[sel], assignments[cluster_col].to_numpy()[sel])


def _rank(name: str, order: Sequence[str] | None) -> int:
    order = list(order or [])
    return order.index(name) if name in order else len(order)


def metrics_rows(metrics: dict[str, Any], order: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One row per algorithm: name, k, backend, acc, nmi, ari (None when absent), sizes largest first,
    and why the result looks degenerate (``degenerate``, empty when nothing does).

    Rows follow ``order`` (the run's algorithm order; metrics.json stores them sorted by name).
    """
    rows = []
    for name, m in (metrics.get("algorithms") or {}).items():
        sizes = sorted((int(s) for s in m.get("cluster_sizes", [])), reverse=True)
        rows.append({"algorithm": name, "k": m.get("k"), "backend": m.get("backend"),
                     "acc": m.get("acc"), "nmi": m.get("nmi"), "ari": m.get("ari"), "cluster_sizes": sizes,
                     "degenerate": list(m.get("degenerate") or [])})
    return sorted(rows, key=lambda r: _rank(r["algorithm"], order))


def backend_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """Backend resolutions (op, requested, backend, kind, reason, fallbacks), identical ones listed once."""
    seen, rows = set(), []
    for r in metrics.get("backends") or []:
        row = {"op": r.get("op"), "requested": r.get("requested"), "backend": r.get("backend"),
               "kind": r.get("kind"), "reason": r.get("reason", ""), "fallbacks": list(r.get("fallbacks") or [])}
        key = json.dumps(row, sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            rows.append(row)
    return rows


_STAGES = ("extract", "cluster", "reduce", "evaluate", "explore", "write", "report")


def timing_rows(metrics: dict[str, Any], order: Sequence[str] | None = None) -> list[tuple[str, float]]:
    """(stage, seconds) in pipeline order: extract, cluster:<algorithm> (in ``order``), reduce, the rest."""
    rows = [(str(k), float(v)) for k, v in (metrics.get("timings_s") or {}).items()]

    def key(row: tuple[str, float]) -> tuple[int, int]:
        stage, _, algo = row[0].partition(":")
        return (_STAGES.index(stage) if stage in _STAGES else len(_STAGES), _rank(algo, order))
    return sorted(rows, key=key)


def dendrogram_cut(Z: np.ndarray, k: int) -> float:
    """Height that cuts linkage ``Z`` into ``k`` clusters (midway between the merges around the cut)."""
    heights = np.sort(Z[:, 2])
    n = Z.shape[0] + 1
    if k <= 1:
        return float(heights[-1]) * 1.02
    if k >= n:
        return float(heights[0]) * 0.5
    lo, hi = heights[n - k - 1], heights[n - k]
    return float((lo + hi) / 2)


# ---------------------------------------------------------------- images


def to_rgb_tile(img: np.ndarray, size: int) -> np.ndarray:
    """(size, size, 3) uint8 tile of an image (h, w), (h, w, 1|3|4), aspect kept, padded black.

    Small images are enlarged with nearest-neighbour (crisp 8x8 digits), large ones shrunk smoothly.
    """
    from PIL import Image

    a = np.asarray(img)
    if a.dtype != np.uint8:
        a = np.clip(a.astype(np.float64), 0, 1) * 255 if a.size and float(np.nanmax(a)) <= 1.0 else np.clip(a, 0, 255)
        a = np.nan_to_num(a).round().astype(np.uint8)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim == 3 and a.shape[2] == 4:
        a = a[:, :, :3]
    if a.ndim == 2:
        a = np.stack([a] * 3, axis=2)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"not an image: shape {np.asarray(img).shape}")
    h, w = a.shape[:2]
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    resample = Image.NEAREST if scale >= 1 else Image.LANCZOS
    im = np.asarray(Image.fromarray(a).resize((nw, nh), resample))
    tile = np.zeros((size, size, 3), np.uint8)
    y0, x0 = (size - nh) // 2, (size - nw) // 2
    tile[y0:y0 + nh, x0:x0 + nw] = im
    return tile


def grid(tiles: list[np.ndarray], per_row: int, pad: int = 2, fill: int = 255) -> np.ndarray:
    """Tiles (s, s, 3) uint8 laid out ``per_row`` to a row, ``pad`` px apart: (H, W, 3) uint8."""
    if not tiles:
        raise ValueError("no tiles to lay out")
    s = tiles[0].shape[0]
    cols = min(per_row, len(tiles))
    rows = -(-len(tiles) // per_row)
    out = np.full((rows * s + (rows + 1) * pad, cols * s + (cols + 1) * pad, 3), fill, np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, per_row)
        y, x = pad + r * (s + pad), pad + c * (s + pad)
        out[y:y + s, x:x + s] = t
    return out


class ImageSource:
    """Images of a run, re-opened from the dataset its config names and looked up by image_id."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset
        self.index = {str(i): k for k, i in enumerate(dataset.image_ids)}
        self.failed: dict[str, str] = {}
        self._tiles: dict[tuple[str, int], np.ndarray | None] = {}

    @classmethod
    def open(cls, inputs: RunInputs) -> "ImageSource | None":
        """Open the run's dataset, or add a note saying why images are skipped and return None."""
        from gpu_ops.data import load_dataset

        spec = inputs.dataset_spec
        skipped = "montages, thumbnails and the sample images are skipped"
        if spec is None:
            inputs.note("dataset", f"neither config.yaml nor metrics.json names the dataset; {skipped}")
            return None
        if spec.startswith("parquet:"):  # embeddings: nothing to draw, and no need to read them again
            inputs.note("dataset", f"{spec} holds vectors, not images; {skipped}")
            return None
        cfg = inputs.config or {}
        split, limit = (cfg.get("split") or "all", cfg.get("limit")) if inputs.config else ("all", None)
        try:
            ds = load_dataset(spec, split, limit)
        except Exception as exc:  # noqa: BLE001 - a moved dataset only costs the images
            inputs.note("dataset", f"{spec} cannot be opened ({str(exc).splitlines()[0]}); {skipped}")
            return None
        if getattr(ds, "item_kind", "image") != "image":
            inputs.note("dataset", f"{spec} holds vectors, not images; {skipped}")
            return None
        src = cls(ds)
        if inputs.assignments is not None:
            ids = inputs.assignments["image_id"].astype(str)
            known = int(ids.isin(src.index.keys()).sum())
            if known == 0:
                inputs.note("dataset", f"{spec} opened but holds none of the run's image ids (changed since the run?); {skipped}")
                return None
            if known < len(ids):
                inputs.note("dataset", f"{spec} lacks {len(ids) - known} of the run's {len(ids)} images; they are left out of montages and thumbnails")
        if inputs.class_names is None and getattr(ds, "class_names", None):
            inputs.class_names = [str(c) for c in ds.class_names]
        if inputs.labels is None and getattr(ds, "labels", None) is not None:
            lab = pd.Series(np.asarray(ds.labels).astype(np.int64), index=pd.Index([str(i) for i in ds.image_ids]))
            inputs.labels = lab[lab >= 0]
        return src

    def load(self, image_id: str) -> np.ndarray | None:
        """The image (uint8) or None when it is not in the dataset or cannot be decoded (reason in ``failed``)."""
        k = self.index.get(image_id)
        if k is None:
            self.failed[image_id] = "not in the dataset"
            return None
        try:
            return np.asarray(self.dataset.load(k))
        except Exception as exc:  # noqa: BLE001 - BadImageError and I/O errors alike
            self.failed[image_id] = str(exc) or type(exc).__name__
            return None

    def tile(self, image_id: str, size: int) -> np.ndarray | None:
        """:func:`to_rgb_tile` of the image (cached per id and size: tiles are small, images may not be)."""
        key = (image_id, size)
        if key not in self._tiles:
            img = self.load(image_id)
            self._tiles[key] = None if img is None else to_rgb_tile(img, size)
        return self._tiles[key]


def load_reconstructions(path: Path, max_pairs: int = 50) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """Validate and read ``reconstructions.npz`` (see :mod:`gpu_ops.report`): returns up to
    ``max_pairs`` (inputs, outputs) as uint8 arrays of one shape, and the image ids when given.

    Raises ValueError with a one-line reason when the file breaks the contract.
    """
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"unreadable ({exc})") from None
    with npz:
        lacking = [k for k in ("inputs", "outputs") if k not in npz.files]
        if lacking:
            raise ValueError(f"lacks array(s) {', '.join(lacking)} (found: {', '.join(npz.files) or 'nothing'})")
        a, b = np.asarray(npz["inputs"]), np.asarray(npz["outputs"])
        ids = [str(i) for i in npz["image_ids"][:max_pairs]] if "image_ids" in npz.files else None
    if a.shape != b.shape:
        raise ValueError(f"inputs {a.shape} and outputs {b.shape} differ in shape")
    if a.ndim not in (3, 4) or (a.ndim == 4 and a.shape[3] not in (1, 3)) or a.shape[0] == 0:
        raise ValueError(f"expected (m, h, w) or (m, h, w, c) with c 1 or 3 and m > 0; got {a.shape}")

    def as_uint8(x: np.ndarray, name: str) -> np.ndarray:
        if x.dtype == np.uint8:
            return x
        if not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"{name} must be floats in [0, 1] (or uint8); got {x.dtype}")
        return (np.clip(np.nan_to_num(x[:max_pairs].astype(np.float64)), 0, 1) * 255).round().astype(np.uint8)

    return as_uint8(a[:max_pairs], "inputs"), as_uint8(b[:max_pairs], "outputs"), ids


@dataclass(frozen=True)
class TsneSweep:
    """t-SNE maps of a run at several perplexities (``tsne_sweep.npz``, written by
    :meth:`gpu_ops.reduce.tsne.PerplexitySweep.save`): ``embeddings`` (p, n, 2) float32, row i of
    each map is ``image_ids[i]``."""

    perplexities: list[float]
    embeddings: np.ndarray
    backends: list[str]
    seconds: list[float]
    skipped: list[float]
    image_ids: list[str]


def load_tsne_sweep(path: Path) -> TsneSweep:
    """Validate and read ``tsne_sweep.npz``; raises ValueError with a one-line reason when the
    file breaks its contract."""
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"unreadable ({exc})") from None
    with npz:
        lacking = [k for k in ("perplexities", "embeddings", "image_ids") if k not in npz.files]
        if lacking:
            raise ValueError(f"lacks array(s) {', '.join(lacking)} (found: {', '.join(npz.files) or 'nothing'})")
        perplexities = np.asarray(npz["perplexities"], dtype=np.float64).ravel()
        maps = np.asarray(npz["embeddings"])
        ids = [str(i) for i in npz["image_ids"]]
        p = len(perplexities)
        backends = [str(b) for b in npz["backends"]] if "backends" in npz.files else [""] * p
        seconds = np.asarray(npz["seconds"], dtype=np.float64).tolist() if "seconds" in npz.files else [np.nan] * p
        skipped = np.asarray(npz["skipped"], dtype=np.float64).tolist() if "skipped" in npz.files else []
    if maps.ndim != 3 or maps.shape[0] != p or maps.shape[1] != len(ids) or maps.shape[2] != 2 or p == 0:
        raise ValueError(f"embeddings {maps.shape} are not {p} maps of the {len(ids)} image ids in 2-D")
    if not np.issubdtype(maps.dtype, np.floating):
        raise ValueError(f"embeddings must be floats; got {maps.dtype}")
    if len(backends) != p or len(seconds) != p:
        raise ValueError(f"{p} perplexities but {len(backends)} backends and {len(seconds)} timings")
    return TsneSweep(perplexities.tolist(), maps.astype(np.float32, copy=False), backends, seconds, skipped, ids)


# ---------------------------------------------------------------- duplicates and outliers


def read_explore_table(path: Path, columns: tuple[str, ...], inputs: RunInputs, skipped: str) -> pd.DataFrame | None:
    """``duplicates.parquet`` or ``outliers.parquet`` (None when absent: the run skipped the explore
    stage); a file that cannot be used becomes a note."""
    return _read_parquet(path, columns, inputs, skipped, optional=True)


def duplicate_pairs_shown(pairs: pd.DataFrame, per_kind: int) -> pd.DataFrame:
    """The pairs the report draws: up to ``per_kind`` of each kind (exact, phash, embedding), the
    least similar first (those are the ones worth a look), then by group."""
    shown = []
    for kind in ("exact", "phash", "embedding"):
        rows = pairs[pairs["kind"] == kind].sort_values(["similarity", "group", "image_id_a", "image_id_b"],
                                                         kind="stable")
        shown.append(rows.head(per_kind))
    return pd.concat(shown) if shown else pairs.head(0)


def most_unusual(outliers: pd.DataFrame, n: int) -> pd.DataFrame:
    """The ``n`` highest-scoring images (rank 1 first)."""
    return outliers.sort_values("rank", kind="stable").head(n)


def flagged(outliers: pd.DataFrame, flag: str, n: int) -> pd.DataFrame:
    """Up to ``n`` images carrying ``flag``, in dataset order."""
    return outliers[outliers[flag].astype(bool)].head(n)
