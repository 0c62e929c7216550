"""Build a run's report: PNG figures in ``RUN_DIR/figures/`` and ``RUN_DIR/report.html``.

See :mod:`gpu_ops.report` for what the page shows and the inputs it reads. Each section of the
page is the data one small function returns (a :class:`Section` of tables, figures and notes);
``report.html.j2`` lays them out, escaping every value.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, ClassVar, Union

import jinja2
import numpy as np
import pandas as pd

from gpu_ops.errors import InputError
from gpu_ops.report import data as D
from gpu_ops.report import figures as F
from gpu_ops.report import interactive as I
from gpu_ops.fsutil import atomic_write_bytes
from gpu_ops.rundir import RunDir

log = logging.getLogger(__name__)

FIGURES_DIR = RunDir.FIGURES
REPORT_NAME = RunDir.REPORT
#: The first algorithm's map, also saved beside the run's other files.
MAP_NAME = RunDir.MAP_PNG
TEMPLATE = "report.html.j2"


@dataclass
class ReportResult:
    """What :func:`build_report` wrote and what it could not use.

    ``html``: the page; ``figures``: every PNG written (under ``RUN_DIR/figures/``);
    ``missing``: one :class:`~gpu_ops.report.data.Missing` (name, reason) per absent or unusable
    input, saying what was skipped (``str(m)`` is one line); ``map``: ``RUN_DIR/map.png`` (the
    first algorithm's map) or None when the run has no map.
    """

    html: Path
    figures: list[Path] = field(default_factory=list)
    missing: list[D.Missing] = field(default_factory=list)
    map: Path | None = None

    @property
    def missing_names(self) -> list[str]:
        return [m.name for m in self.missing]


# ---------------------------------------------------------------- what the template lays out


@dataclass
class Figure:
    """A PNG with its caption; ``src`` is ``figures/NAME.png`` or a data URI."""

    kind: ClassVar[str] = "figure"
    src: str
    caption: str
    cls: str = ""


@dataclass
class Table:
    """A table of text cells; ``total`` is an optional last row whose first cell is bold."""

    kind: ClassVar[str] = "table"
    header: list[str]
    rows: list[list[str]]
    cls: str = ""
    total: list[str] | None = None


@dataclass
class Text:
    """A paragraph (``cls="note"``: a grey remark)."""

    kind: ClassVar[str] = "text"
    text: str
    cls: str = ""


@dataclass
class Warn:
    """A highlighted box: a bold heading over a list."""

    kind: ClassVar[str] = "warn"
    heading: str
    items: list[str]


@dataclass
class Montages:
    """Cluster montages laid out side by side."""

    kind: ClassVar[str] = "montages"
    figures: list[Figure]


@dataclass
class InteractiveMap:
    """The interactive map: its JSON document, the script that draws it, and plotly.js either as
    a file beside the page (``plotly_src``) or inlined (``plotly_inline``)."""

    kind: ClassVar[str] = "interactive"
    data: str
    script: str
    plotly_src: str | None = None
    plotly_inline: str | None = None
    note: str = ""


Block = Union[Figure, Table, Text, Warn, Montages, InteractiveMap]


@dataclass
class Section:
    """One section of the page: its anchor, heading and blocks in order."""

    anchor: str
    title: str
    blocks: list[Block] = field(default_factory=list)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


class FigureWriter:
    """Writes a report's PNGs into a temporary folder and makes the :class:`Figure` blocks for them."""

    def __init__(self, run_dir: Path, tmp_figs: Path, inputs: D.RunInputs, *, embed: bool, per_row: int,
                 montage_rows: int, max_clusters: int, thumbnails: int, tile_px: int, seed: int,
                 map_thumbnails: int = 2000, map_tile_px: int = 48, map_webgl: bool = True) -> None:
        self.run_dir = run_dir
        self.tmp = tmp_figs
        self.inputs = inputs
        self.embed = embed
        self.per_row = per_row
        self.montage_rows = montage_rows
        self.max_clusters = max_clusters
        self.thumbnails = thumbnails
        self.tile_px = tile_px
        self.seed = seed
        self.map_thumbnails = map_thumbnails
        self.map_tile_px = map_tile_px
        self.map_webgl = map_webgl
        self.names: list[str] = []  # names inside figures/

    def path(self, name: str) -> Path:
        """Where to draw the figure ``name`` (recorded as written)."""
        self.names.append(name)
        return self.tmp / name

    def figure(self, name: str, caption: str, cls: str = "") -> Figure:
        """The page's block for the written figure ``name``."""
        if self.embed:
            src = "data:image/png;base64," + base64.b64encode((self.tmp / name).read_bytes()).decode()
        else:
            src = f"{FIGURES_DIR}/{name}"
        return Figure(src, caption, cls)

    def attempt(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run one figure's work; a failure becomes a note instead of ending the report."""
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - one broken figure must not cost the page
            log.warning("report: %s failed: %s", what, exc, exc_info=True)
            first = str(exc).splitlines()[0] if str(exc) else ""
            self.inputs.note(what, f"figure failed ({type(exc).__name__}: {first}); skipped")
            return None


def build_report(run_dir: Path, *, embed_images: bool = False, per_row: int = 10, montage_rows: int = 5,
                 max_clusters: int = 50, thumbnails: int = 300, tile_px: int = 48, seed: int = 0,
                 shown_as: Path | None = None, map_thumbnails: int = 2000, map_tile_px: int = 48,
                 map_webgl: bool = True, max_rows: int | None = D.REPORT_MAX_ROWS) -> ReportResult:
    """Write the figures and ``report.html`` for the run directory ``run_dir``.

    Parameters
    ----------
    run_dir : Path
        A run directory (see :mod:`gpu_ops.rundir`).
    embed_images : bool
        Put the figures into the page as data URIs and inline plotly.js (one file to mail around);
        otherwise the page links ``figures/NAME.png`` and ``figures/plotly.min.js`` beside it. The
        PNGs are written either way.
    per_row, montage_rows : int
        Montage layout: images per row and at most this many rows per cluster.
    max_clusters : int
        Montages for at most this many clusters per algorithm (largest first).
    thumbnails : int
        At most this many image thumbnails on the thumbnail map.
    tile_px : int
        Montage tile size in pixels.
    seed : int
        Seeds the choice of montage members and thumbnails.
    shown_as : Path, optional
        The run directory the page names (default ``run_dir``): where a run being written in a
        staging directory will be once it is complete.
    map_thumbnails : int
        The interactive map carries thumbnails (data URIs) of at most this many points (a seeded
        sample when the run has more), which bounds the page's size.
    map_tile_px : int
        Thumbnail size on the interactive map, in pixels.
    map_webgl : bool
        Draw the interactive map with WebGL (``Scattergl``); False draws SVG (for comparison).
    max_rows : int or None
        Read at most this many rows of the run (a uniform sample seeded by ``seed``, streamed from
        its files): every figure, confusion matrix and the interactive map show the sample, the
        page says so, and the metrics still cover every row. None reads every row.

    Returns
    -------
    ReportResult

    Raises
    ------
    InputError
        ``run_dir`` does not exist or holds neither assignments.parquet nor metrics.json, or its
        metrics.json is not valid (not JSON, a field of the wrong type): the message names the field.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(f"{run_dir}: run directory does not exist" if not run_dir.exists()
                         else f"{run_dir}: not a directory")
    if not (run_dir / "assignments.parquet").exists() and not (run_dir / "metrics.json").exists():
        raise InputError(f"{run_dir}: not a run directory (neither assignments.parquet nor metrics.json)")
    t0 = time.perf_counter()
    inputs = D.load_run(run_dir, max_rows=max_rows, seed=seed)
    tmp = run_dir / f".{FIGURES_DIR}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        figs = FigureWriter(run_dir, tmp, inputs, embed=embed_images, per_row=per_row, montage_rows=montage_rows,
                            max_clusters=max_clusters, thumbnails=thumbnails, tile_px=tile_px, seed=seed,
                            map_thumbnails=map_thumbnails, map_tile_px=map_tile_px, map_webgl=map_webgl)
        images = D.ImageSource.open(inputs) if (inputs.assignments is not None or inputs.map2d is not None) else None
        sections = [s for make in SECTIONS for s in make(figs, inputs, images)]
        page = render_page(sections, inputs, Path(shown_as) if shown_as is not None else run_dir,
                           time.perf_counter() - t0)
        final = run_dir / FIGURES_DIR
        old = run_dir / f".{FIGURES_DIR}.old-{uuid.uuid4().hex[:8]}"
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        atomic_write_bytes(run_dir / REPORT_NAME, page.encode("utf-8"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ReportResult(run_dir / REPORT_NAME, [final / n for n in figs.names], list(inputs.missing),
                        _save_map_png(run_dir, inputs.algorithms))


def _save_map_png(run_dir: Path, algorithms: list[str]) -> Path | None:
    """Copy the first algorithm's map figure to ``RUN_DIR/map.png``; None when none was drawn."""
    drawn = run_dir / FIGURES_DIR / f"map-{_slug(algorithms[0])}.png" if algorithms else None
    if drawn is None or not drawn.is_file():
        return None
    atomic_write_bytes(run_dir / MAP_NAME, drawn.read_bytes())
    return run_dir / MAP_NAME


# ---------------------------------------------------------------- sections, in page order


def metrics_section(figs: FigureWriter, inputs: D.RunInputs, images: D.ImageSource | None) -> list[Section]:
    """ACC, NMI, ARI, k, backend and cluster sizes per algorithm."""
    if inputs.metrics is None:
        return []
    rows = D.metrics_rows(inputs.metrics, inputs.algorithms)
    cells = []
    for r in rows:
        sizes = r["cluster_sizes"]
        shown = ", ".join(str(s) for s in sizes[:20]) + (f", … ({len(sizes)} clusters)" if len(sizes) > 20 else "")
        cells.append([r["algorithm"], _fmt(r["k"]), _fmt(r["acc"]), _fmt(r["nmi"]), _fmt(r["ari"]),
                      _fmt(r["backend"]), shown])
    sec = Section("metrics", "Metrics", [Table(["algorithm", "k", "ACC", "NMI", "ARI", "backend",
                                                "cluster sizes (largest first)"], cells, "metrics")])
    if rows and all(r["acc"] is None for r in rows):
        sec.blocks.append(Text("No true labels: ACC, NMI and ARI are not defined for this run.", "note"))
    degenerate = [f"{r['algorithm']}: {reason}" for r in rows for reason in r["degenerate"]]
    if degenerate:
        sec.blocks.append(Warn("Degenerate results", degenerate))
    return [sec]


def _map_xy(inputs: D.RunInputs) -> np.ndarray:
    assert inputs.map2d is not None
    return inputs.map2d[["x", "y"]].to_numpy(dtype=np.float32)


def _reducer_name(inputs: D.RunInputs) -> str:
    return ((inputs.metrics or {}).get("reducer") or {}).get("name") or (inputs.config or {}).get("reducer", "")


def interactive_map_section(figs: FigureWriter, inputs: D.RunInputs,
                            images: D.ImageSource | None) -> list[Section]:
    """The map to pan, zoom and hover (thumbnail and cluster), click (a cluster's members) and recolour
    (per algorithm's clusters, true label, outlier score)."""
    points = D.map_points(inputs)
    if points is None or not points.modes:
        return []
    block = figs.attempt("interactive map", lambda: _interactive_map(figs, inputs, images, points))
    return [Section("interactive-map", "Interactive map", [block])] if block else []


def _interactive_map(figs: FigureWriter, inputs: D.RunInputs, images: D.ImageSource | None,
                     points: D.MapPoints) -> InteractiveMap:
    n = len(points.ids)
    thumbs: dict[int, str] = {}
    if images is not None:
        for row in D.thumbnail_sample(n, figs.map_thumbnails, seed=figs.seed):
            tile = images.tile(points.ids[row], figs.map_tile_px)
            if tile is not None:
                thumbs[int(row)] = I.thumbnail_uri(tile)
    if images is None:
        note = "no thumbnails: the run's images could not be opened"
    elif len(thumbs) < n:
        note = f"thumbnails for a sample of {len(thumbs)} of {n} images"
    else:
        note = ""
    title = f"{inputs.dataset_spec or ''} · {_reducer_name(inputs)} map · {n} images"
    doc = I.map_document(points, thumbs, title, webgl=figs.map_webgl, thumb_note=note)
    block = InteractiveMap(I.document_json(doc), I.map_script(), note=note)
    if figs.embed:
        block.plotly_inline = I.plotly_js()
    else:
        (figs.tmp / I.PLOTLY_JS).write_text(I.plotly_js(), encoding="utf-8")
        block.plotly_src = f"{FIGURES_DIR}/{I.PLOTLY_JS}"
    return block


def map_section(figs: FigureWriter, inputs: D.RunInputs, images: D.ImageSource | None) -> list[Section]:
    """The 2-D map coloured by each algorithm's clusters, and by the true labels when there are any."""
    if inputs.map2d is None:
        return []
    m, a = inputs.map2d, inputs.assignments
    xy = _map_xy(inputs)
    reducer = _reducer_name(inputs)
    dataset = inputs.dataset_spec or ""
    sec = Section("maps", "2-D map")
    if a is not None:
        joined = m[["image_id"]].merge(a, on="image_id", how="left")
        for algo in inputs.algorithms:
            col = joined[algo]
            if col.isna().any():
                inputs.note(f"map:{algo}", f"{int(col.isna().sum())} map points have no {algo} cluster; "
                                           "they are drawn as cluster -1")
            lab = col.fillna(-1).to_numpy().astype(np.int64)
            name = f"map-{_slug(algo)}.png"

            def draw(name: str = name, lab: np.ndarray = lab, algo: str = algo) -> Figure:
                k = len(np.unique(lab))
                F.scatter_map(xy, lab, figs.path(name), f"{dataset} · {algo} (k={k}) · {reducer} map")
                return figs.figure(name, f"Map coloured by {algo} cluster", "map")
            sec.blocks += filter(None, [figs.attempt(f"figure {name}", draw)])
    y = D.aligned_labels(m["image_id"].astype(str), inputs.labels)
    if y is not None and (y >= 0).any():
        names = dict(enumerate(inputs.class_names)) if inputs.class_names else None

        def draw_label() -> Figure:
            sel = y >= 0
            F.scatter_map(xy[sel], y[sel], figs.path("map-label.png"), f"{dataset} · true labels · {reducer} map",
                          names=names, legend_title="class")
            return figs.figure("map-label.png", "Map coloured by true label", "map")
        sec.blocks += filter(None, [figs.attempt("figure map-label.png", draw_label)])
    return [sec]


def thumbnails_section(figs: FigureWriter, inputs: D.RunInputs, images: D.ImageSource | None) -> list[Section]:
    """A few hundred images drawn at their own map coordinates, framed in their cluster's colour."""
    if inputs.map2d is None or images is None or figs.thumbnails <= 0:
        return []
    primary = inputs.algorithms[0] if inputs.algorithms else None
    out = figs.attempt("figure thumbnails.png", lambda: _thumbnails(figs, inputs, images, primary))
    return [Section("thumbnails", "Images on the map", [out])] if out else []


def _thumbnails(figs: FigureWriter, inputs: D.RunInputs, images: D.ImageSource, primary: str | None) -> Figure | None:
    m = inputs.map2d
    assert m is not None
    available = m[m["image_id"].astype(str).isin(images.index.keys())]
    placements = D.thumbnail_positions(available, figs.thumbnails, seed=figs.seed)
    tiles = {i: t for i, _, _ in placements if (t := images.tile(i, 32)) is not None}
    if not tiles:
        inputs.note("thumbnails", "no image could be loaded from the dataset; thumbnails skipped")
        return None
    if primary is not None and inputs.assignments is not None:
        by_id = dict(zip(inputs.assignments["image_id"].astype(str), inputs.assignments[primary].astype(int)))
        point_labels = np.array([by_id.get(i, -1) for i in m["image_id"].astype(str)], dtype=np.int64)
    else:
        by_id, point_labels = {}, np.zeros(len(m), np.int64)
    F.thumbnail_map(_map_xy(inputs), point_labels, placements, tiles, figs.path("thumbnails.png"),
                    f"{len(tiles)} sample images at their map positions"
                    + (f" · frames: {primary} cluster" if primary else ""),
                    frame_labels=by_id)
    return figs.figure("thumbnails.png", f"{len(tiles)} images drawn at their own 2-D coordinates (spread out: no "
                                         "two closer than 1% of the map's diagonal)", "map big")


def tsne_sweep_section(figs: FigureWriter, inputs: D.RunInputs, images: D.ImageSource | None) -> list[Section]:
    """The t-SNE maps at each perplexity of the run's sweep (``tsne_perplexities``), side by side."""
    sweep = inputs.tsne_sweep
    if sweep is None:
        return []
    labels, coloured = D.aligned_labels(sweep.image_ids, inputs.labels), "true label"
    names = dict(enumerate(inputs.class_names)) if inputs.class_names else None
    if labels is None or not (labels >= 0).any():
        labels, names, coloured = None, None, ""
        if inputs.assignments is not None and inputs.algorithms:
            primary = inputs.algorithms[0]
            by_id = inputs.assignments.set_index("image_id")[primary]
            labels = by_id.reindex(sweep.image_ids).fillna(-1).to_numpy().astype(np.int64)
            coloured = f"{primary} cluster"
    n = len(sweep.image_ids)
    titles = [f"perplexity {p:g} ({backend}, {secs:.0f} s)"
              for p, backend, secs in zip(sweep.perplexities, sweep.backends, sweep.seconds)]
    caption = (f"t-SNE maps at perplexity {', '.join(f'{p:g}' for p in sweep.perplexities)}"
               + (f", coloured by {coloured}" if coloured else "")
               + ": small perplexities show local structure (and break clusters into fragments), large ones keep "
                 "more of the global layout")
    if sweep.skipped:
        caption += (f"; perplexity {', '.join(f'{p:g}' for p in sweep.skipped)} skipped "
                    f"(t-SNE needs more than 3 x perplexity points; the run has {n})")

    def draw() -> Figure:
        F.perplexity_sweep_figure(sweep.embeddings, titles, labels, figs.path("tsne-sweep.png"),
                                  f"{inputs.dataset_spec or ''} · t-SNE perplexity sweep (n={n})", names=names)
        return figs.figure("tsne-sweep.png", caption, "wide")
    out = figs.attempt("figure tsne-sweep.png", draw)
    return [Section("tsne-sweep", "t-SNE perplexity sweep", [out])] if out else []


def confusion_section(figs: FigureWriter, inputs: D.RunInputs, images: D.ImageSource | None) -> list[Section]:
    """Per algorithm: true classes against clusters ordered by their Hungarian-matched class."""
    a, labels = inputs.assignments, inputs.labels
    if a is None or labels is None:
        return []
    sec = Section("confusion", "Confusion after Hungarian mapping")
    for algo in inputs.algorithms:
        name = f"confusion-{_slug(algo)}.png"

        def draw(name: str = name, algo: str = algo) -> Figure:
            mat, classes, clusters = D.confusion_for(a, algo, labels)
            F.confusion_figure(mat, classes, clusters, figs.path(name),
                               f"{algo}: {int(mat.sum())} labelled images", inputs.class_names)
            return figs.figure(name, f"{algo}: rows true classes, columns clusters ordered by their matched class "
                                     f"(a perfect clustering is diagonal)", "confusion")
        sec.blocks += filter(None, [figs.attempt(f"figure {name}", draw)])
    return [sec]


def montage_sections(figs: FigureWriter, inputs: D.RunInputs, images: D.ImageSource | None) -> list[Section]:
    """Per algorithm: a grid of member images for each cluster, largest cluster first."""
    if inputs.assignments is None or images is None:
        return []
    out = []
    for algo in inputs.algorithms:
        blocks = figs.attempt(f"montages {algo}", lambda algo=algo: _montages(figs, inputs, images, algo))
        if blocks:
            out.append(Section(f"montages-{_slug(algo)}", f"Cluster montages · {algo}", blocks))
    return out


def _montages(figs: FigureWriter, inputs: D.RunInputs, images: D.ImageSource, algo: str) -> list[Block]:
    a = inputs.assignments
    assert a is not None
    order = D.cluster_order(a, algo)
    blocks: list[Block] = []
    if len(order) > figs.max_clusters:
        blocks.append(Text(f"The {figs.max_clusters} largest of {len(order)} clusters.", "note"))

    def class_name(c: int) -> str:
        return inputs.class_names[c] if inputs.class_names and 0 <= c < len(inputs.class_names) else str(c)
    cells = []
    for cluster_id, size in order[:figs.max_clusters]:
        members = D.montage_members(a, algo, cluster_id, figs.per_row * figs.montage_rows, seed=figs.seed)
        tiles = [t for i in members if (t := images.tile(i, figs.tile_px)) is not None]
        if not tiles:
            continue
        name = f"montage-{_slug(algo)}-c{cluster_id}.png"
        F.save_image(D.grid(tiles, figs.per_row), figs.path(name))
        comp = D.cluster_composition(a, algo, cluster_id, inputs.labels)
        caption = f"cluster {cluster_id} · {size} images"
        if len(tiles) < size:
            caption += f" (showing {len(tiles)})"
        if comp:
            caption += " · " + ", ".join(f"{class_name(c)} {100 * n / size:.0f}%" for c, n in comp)
        cells.append(figs.figure(name, caption, "montage"))
    if images.failed:
        example = next(iter(images.failed.items()))
        inputs.note("images", f"{len(images.failed)} image(s) could not be loaded and are left out "
                              f"(e.g. {example[0]}: {example[1]})")
        images.failed.clear()
    blocks.append(Montages(cells))
    return blocks


def _pair_figure(figs: FigureWriter, images: D.ImageSource, a: str, b: str, name: str, caption: str) -> Figure | None:
    tiles = [images.tile(a, 2 * figs.tile_px), images.tile(b, 2 * figs.tile_px)]
    if any(t is None for t in tiles):
        return None
    F.save_image(D.grid(tiles, 2), figs.path(name))  # type: ignore[arg-type]
    return figs.figure(name, caption, "montage")


def neighbours_note(inputs: D.RunInputs, what: str) -> Text | None:
    """A note when the explore stage searched neighbours within cells, not among all images."""
    how = ((inputs.metrics or {}).get("explore") or {}).get("neighbours")
    if not how or how == "exact":
        return None
    return Text(f"Approximate: the store was larger than the run's memory budget, so {what} were searched "
                f"{how} (k-means cells), not among all images.", "note")


def duplicates_section(figs: FigureWriter, inputs: D.RunInputs, images: D.ImageSource | None) -> list[Section]:
    """Exact and near duplicates: counts, the pairs side by side with their kind and similarity, a table."""
    pairs = D.read_explore_table(RunDir(figs.run_dir).duplicates, ("group", "image_id_a", "image_id_b", "kind",
                                                                     "similarity"), inputs, "duplicates skipped")
    if pairs is None:
        return []
    info = (inputs.metrics or {}).get("explore") or {}
    thresholds = info.get("thresholds") or {}
    sec = Section("duplicates", "Duplicates")
    note = neighbours_note(inputs, "near duplicates by embedding")
    if info.get("phash_off"):
        sec.blocks.append(Text(f"{info['phash_off'][:1].upper()}{info['phash_off'][1:]}."))
    if pairs.empty:
        sec.blocks += [Text("No exact or near duplicates found."), *filter(None, [note])]
        return [sec]
    counts = pairs["kind"].value_counts()
    groups = int(pairs["group"].nunique())
    members = len(set(pairs["image_id_a"]) | set(pairs["image_id_b"]))
    sec.blocks.append(Text(
        f"{len(pairs)} pairs in {groups} groups ({members} images; keeping one representative per group, "
        f"{members - groups} could go): " + ", ".join(f"{k} {int(counts.get(k, 0))}" for k in ("exact", "phash", "embedding"))
        + ". exact: identical content; phash: perceptual hashes at most "
        f"{int(thresholds.get('phash_max_bits', 8))} of 64 bits apart (comparing with each one's mirror image and centre crops too); embedding: cosine "
        f"similarity of the centred embeddings at least {thresholds.get('min_cosine', 0.95):g}."))
    sec.blocks += filter(None, [note])
    shown = D.duplicate_pairs_shown(pairs, figs.per_row)
    if images is not None:
        cells = []
        for n, row in enumerate(shown.itertuples(index=False)):
            caption = f"{row.image_id_a} ↔ {row.image_id_b} · {row.kind} · similarity {row.similarity:.3f}"
            fig = figs.attempt(f"figure duplicates-{n:03d}.png", lambda row=row, n=n, caption=caption: _pair_figure(
                figs, images, row.image_id_a, row.image_id_b, f"duplicates-{n:03d}.png", caption))
            if fig:
                cells.append(fig)
        if cells:
            sec.blocks.append(Montages(cells))
    rows = [[str(r.group), str(r.image_id_a), str(r.image_id_b), str(r.kind), f"{r.similarity:.3f}",
             _fmt(None if pd.isna(getattr(r, "phash_bits", None)) else int(r.phash_bits)),
             _fmt(float(r.cosine) if hasattr(r, "cosine") else None, 3)]
            for r in pairs.head(100).itertuples(index=False)]
    sec.blocks.append(Table(["group", "image a", "image b", "kind", "similarity", "phash bits", "cosine"], rows,
                            "duplicates"))
    if len(pairs) > 100:
        sec.blocks.append(Text(f"The first 100 of {len(pairs)} pairs; all are in duplicates.parquet.", "note"))
    return [sec]


def outliers_section(figs: FigureWriter, inputs: D.RunInputs, images: D.ImageSource | None) -> list[Section]:
    """The most unusual images by outlier score, and the images each quality flag marks."""
    scores = D.read_explore_table(RunDir(figs.run_dir).outliers, ("image_id", "score", "rank"), inputs,
                                  "outlier scores skipped")
    if scores is None:
        return []
    scores["image_id"] = scores["image_id"].astype(str)
    sec = Section("outliers", "Most unusual images")
    algorithm = ((inputs.metrics or {}).get("explore") or {}).get("algorithm")
    sec.blocks.append(Text(
        "Score: the mean of each image's percentile by mean distance to its 10 nearest neighbours and by "
        "distance to its cluster's centre relative to the cluster's spread"
        + (f" ({algorithm})" if algorithm else "") + "; 1 is the most unusual.", "note"))
    sec.blocks += filter(None, [neighbours_note(inputs, "the 10 nearest neighbours")])
    top = D.most_unusual(scores, figs.per_row * 3)
    if images is not None and not top.empty:
        tiles = [t for i in top["image_id"] if (t := images.tile(i, figs.tile_px)) is not None]
        if tiles:
            def draw() -> Figure:
                F.save_image(D.grid(tiles, figs.per_row), figs.path("outliers.png"))
                return figs.figure("outliers.png", f"The {len(tiles)} most unusual images, most unusual first",
                                   "montage")
            sec.blocks += filter(None, [figs.attempt("figure outliers.png", draw)])
    flags = [f for f in ("dark", "bright", "blurry", "tiny") if f in scores.columns]

    def cell(r: Any, col: str, digits: int = 3) -> str:
        value = getattr(r, col, None)
        return "–" if value is None or pd.isna(value) else _fmt(float(value), digits)
    rows = [[str(r.rank), str(r.image_id), cell(r, "score"), cell(r, "knn_distance"), cell(r, "lof"),
             _fmt(getattr(r, "cluster", None)), cell(r, "cluster_ratio"),
             ", ".join(f for f in flags if bool(getattr(r, f))) or "–"] for r in top.itertuples(index=False)]
    sec.blocks.append(Table(["rank", "image", "score", "kNN distance", "LOF", "cluster", "cluster ratio", "flags"],
                            rows, "outliers"))
    if flags:
        counts = [[f, str(int(scores[f].astype(bool).sum()))] for f in flags]
        sec.blocks.append(Table(["quality flag", "images"], counts, "flags"))
        cells = []
        for flag in flags:
            marked = D.flagged(scores, flag, figs.per_row * 2)
            if marked.empty or images is None:
                continue
            tiles = [t for i in marked["image_id"] if (t := images.tile(i, figs.tile_px)) is not None]
            if not tiles:
                continue

            def draw_flag(flag: str = flag, tiles: list[np.ndarray] = tiles, total: int = int(scores[flag].sum())) -> Figure:
                F.save_image(D.grid(tiles, figs.per_row), figs.path(f"flag-{flag}.png"))
                return figs.figure(f"flag-{flag}.png", f"{flag}: {total} image{'s' if total != 1 else ''}"
                                   + (f" (showing {len(tiles)})" if len(tiles) < total else ""), "montage")
            cells += filter(None, [figs.attempt(f"figure flag-{flag}.png", draw_flag)])
        if cells:
            sec.blocks.append(Montages(cells))
    return [sec]


def dendrogram_sections(figs: FigureWriter, inputs: D.RunInputs, images: D.ImageSource | None) -> list[Section]:
    """Per agglomerative run: its merges, cut where the run's k clusters form."""
    out = []
    for algo, Z in inputs.linkages.items():
        name = f"dendrogram-{_slug(algo)}.png"
        k = ((inputs.metrics or {}).get("algorithms") or {}).get(algo, {}).get("k")
        if k is None and inputs.assignments is not None and algo in inputs.assignments.columns:
            k = int(inputs.assignments[algo].nunique())
        k = int(k or 1)

        def draw(name: str = name, Z: np.ndarray = Z, k: int = k, algo: str = algo) -> Figure:
            F.dendrogram_figure(Z, k, D.dendrogram_cut(Z, k), figs.path(name),
                                f"{algo} ({(inputs.config or {}).get('linkage', '')} linkage), cut at k={k}")
            return figs.figure(name, f"Agglomerative merges of {Z.shape[0] + 1} images; the dashed line cuts "
                                     f"k={k} clusters", "wide")
        fig = figs.attempt(f"figure {name}", draw)
        if fig:
            out.append(Section(f"dendrogram-{_slug(algo)}", f"Dendrogram · {algo}", [fig]))
    return out


def k_selection_section(figs: FigureWriter, inputs: D.RunInputs, images: D.ImageSource | None) -> list[Section]:
    """The curves of ``k=auto`` (elbow, silhouette, modularity) and the choice."""
    sel = inputs.k_selection
    if sel is None:
        return []
    method = sel.get("method", "silhouette")
    chose = "the elbow chose" if method == "elbow" else f"the highest {method} chose"
    rows = f" ({sel['n_fit']} rows)" if sel.get("n_fit") else ""

    def draw() -> Figure:
        F.k_selection_figure(sel, figs.path("k-selection.png"))
        return figs.figure("k-selection.png", f"k=auto{rows}: elbow at k={sel.get('elbow_k')}; {chose} "
                                              f"k={sel.get('chosen_k')}", "wide")
    fig = figs.attempt("figure k-selection.png", draw)
    blocks: list[Any] = [Text(f"k={sel.get('chosen_k')}: {chose} it without labels{rows}.")]
    if fig:
        blocks.append(fig)
    names = [n for n in ("modularity", "silhouette", "inertia") if len(sel.get(n) or []) == len(sel["ks"])]
    blocks.append(Table(["k", *names], [[str(k), *(f"{sel[n][i]:.4g}" for n in names)]
                                        for i, k in enumerate(sel["ks"])]))
    return [Section("k-selection", "Choosing k", blocks)]


def reconstructions_section(figs: FigureWriter, inputs: D.RunInputs, images: D.ImageSource | None) -> list[Section]:
    """An autoencoder's inputs, each row followed by its reconstruction."""
    rec = figs.run_dir / D.RECONSTRUCTIONS
    if not rec.is_file():
        return []
    try:
        inp, outp, _ = D.load_reconstructions(rec, max_pairs=figs.per_row * 5)
    except ValueError as exc:
        inputs.note(D.RECONSTRUCTIONS, f"{exc}; reconstructions skipped")
        return []

    def draw() -> Figure:
        _reconstructions(figs, inp, outp)
        return figs.figure("reconstructions.png", f"{len(inp)} images: each input row is followed by its "
                                                  "reconstruction", "montage")
    fig = figs.attempt("figure reconstructions.png", draw)
    return [Section("reconstructions", "Autoencoder reconstructions", [fig])] if fig else []


def _reconstructions(figs: FigureWriter, inp: np.ndarray, outp: np.ndarray) -> None:
    tiles: list[np.ndarray] = []
    per, px = figs.per_row, figs.tile_px
    for start in range(0, len(inp), per):
        chunk = range(start, min(start + per, len(inp)))
        tiles += [D.to_rgb_tile(inp[i], px) for i in chunk]
        tiles += [np.full((px, px, 3), 255, np.uint8)] * (per - len(chunk))
        tiles += [D.to_rgb_tile(outp[i], px) for i in chunk]
        tiles += [np.full((px, px, 3), 255, np.uint8)] * (per - len(chunk))
    F.save_image(D.grid(tiles, per), figs.path("reconstructions.png"))


def backends_section(figs: FigureWriter, inputs: D.RunInputs, images: D.ImageSource | None) -> list[Section]:
    """The backend each op ran on, why, and every GPU → CPU fallback."""
    metrics = inputs.metrics
    if metrics is None:
        return []
    sec = Section("backends", "Backends and fallbacks")
    fallbacks = [str(f) for f in metrics.get("fallbacks") or []]
    if fallbacks:
        sec.blocks.append(Warn("GPU → CPU fallbacks", fallbacks))
    else:
        sec.blocks.append(Text("No fallbacks: every op ran on the backend it resolved to."))
    ext = metrics.get("extract") or {}
    red = metrics.get("reducer") or {}
    rows = [["extract", "", str(ext.get("extractor", "")), str(ext.get("device", "")),
             f"{ext.get('dim', '')}-d features", ""]]
    rows += [[str(r["op"]), _fmt(r["requested"]), _fmt(r["backend"]), _fmt(r["kind"]), str(r["reason"]),
              "; ".join(r["fallbacks"]) or "–"] for r in D.backend_rows(metrics)]
    if red.get("name"):
        rows.append([f"map ({red.get('name')})", "", _fmt(red.get("backend")), "", "", ""])
    sec.blocks.append(Table(["op", "requested", "backend", "kind / device", "why", "fallbacks"], rows, "backends"))
    return [sec]


def timings_section(figs: FigureWriter, inputs: D.RunInputs, images: D.ImageSource | None) -> list[Section]:
    """Seconds per stage, as a table and as bars."""
    timings = D.timing_rows(inputs.metrics, inputs.algorithms) if inputs.metrics is not None else []
    if not timings:
        return []
    sec = Section("timings", "Timings", [Table(["stage", "seconds"], [[k, f"{v:.3f}"] for k, v in timings], "timings",
                                               total=["total", f"{sum(v for _, v in timings):.3f}"])])

    def draw() -> Figure:
        F.timings_figure(timings, figs.path("timings.png"))
        return figs.figure("timings.png", "Seconds per stage", "small")
    sec.blocks += filter(None, [figs.attempt("figure timings.png", draw)])
    return [sec]


def settings_section(figs: FigureWriter, inputs: D.RunInputs, images: D.ImageSource | None) -> list[Section]:
    """The run's config.yaml."""
    if inputs.config is None:
        return []
    return [Section("settings", "Settings", [Table(["setting", "value"],
                                                   [[str(k), str(v)] for k, v in inputs.config.items()], "settings")])]


#: The page's sections in order; each returns zero or more sections.
SECTIONS: tuple[Callable[[FigureWriter, D.RunInputs, D.ImageSource | None], list[Section]], ...] = (
    metrics_section, interactive_map_section, map_section, thumbnails_section, tsne_sweep_section, confusion_section,
    montage_sections, duplicates_section, outliers_section, dendrogram_sections, k_selection_section,
    reconstructions_section, backends_section, timings_section,
    settings_section,
)


# ---------------------------------------------------------------- page


def _template() -> jinja2.Template:
    """``report.html.j2`` (package data), autoescaped: every value it is given is text."""
    text = resources.files("gpu_ops.report").joinpath(TEMPLATE).read_text(encoding="utf-8")
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return env.from_string(text)


def header_facts(inputs: D.RunInputs) -> list[str]:
    """The header's one-line facts: n, features, algorithms, map, quarantined items."""
    metrics = inputs.metrics or {}
    cfg = inputs.config or {}
    facts = []
    if metrics.get("n") is not None:
        facts.append(f"n={metrics['n']}")
    elif inputs.assignments is not None:
        facts.append(f"n={len(inputs.assignments)}")
    if cfg.get("extractor") or (metrics.get("extract") or {}).get("extractor"):
        facts.append(f"features: {cfg.get('extractor') or metrics['extract']['extractor']}")
    if inputs.algorithms:
        facts.append("algorithms: " + ", ".join(inputs.algorithms))
    reducer = metrics.get("reducer") or {}
    red = reducer.get("name") or cfg.get("reducer")
    if red:
        facts.append(f"map: {red}")
    if reducer.get("placement") and reducer.get("fitted_rows") is not None and metrics.get("n") is not None:
        facts.append(f"the map was fitted on {reducer['fitted_rows']:,} of {metrics['n']:,} points; the others "
                     f"were {reducer['placement']}")
    if inputs.sample is not None and inputs.n_rows is not None:
        facts.append(f"figures and the interactive map show a uniform sample of {len(inputs.sample):,} of "
                     f"{inputs.n_rows:,} points (the metrics cover every point)")
    if metrics.get("quarantined"):
        facts.append(f"{metrics['quarantined']} unreadable item(s) skipped at extraction")
    return facts


def render_page(sections: list[Section], inputs: D.RunInputs, shown_as: Path, seconds: float) -> str:
    """``report.html``'s text: ``report.html.j2`` filled with the sections and the run's facts;
    ``shown_as`` is the run directory the page names."""
    return _template().render(
        title=f"gpuclust run · {inputs.dataset_spec or shown_as.name}",
        facts=header_facts(inputs),
        run_dir=str(Path(shown_as).absolute()),
        store=(inputs.metrics or {}).get("store"),
        missing=inputs.missing,
        sections=sections,
        generated=time.strftime("%Y-%m-%d %H:%M:%S"),
        seconds=f"{seconds:.1f}",
    )


# ---------------------------------------------------------------- markdown summary


def summary_markdown(run_dir: Path, result: ReportResult | None = None) -> str:
    """A short markdown summary of a run: metrics, fallbacks, timings, the report and figure paths.

    Meant for a Prefect markdown artifact. Reads only ``metrics.json`` and the file listing of
    ``run_dir`` (so it is cheap); pass ``result`` from :func:`build_report` to list missing inputs.
    """
    import json

    run_dir = Path(run_dir).absolute()
    lines: list[str] = []
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        metrics = None
    try:
        import yaml

        algos = list((yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("algorithms") or [])
    except Exception:  # noqa: BLE001 - order only
        algos = []
    title = f"{metrics.get('dataset')} (n={metrics.get('n')})" if metrics else run_dir.name
    lines.append(f"## gpuclust run: {title}")
    lines.append("")
    lines.append(f"Run directory: `{run_dir}`")
    report = run_dir / REPORT_NAME
    if report.is_file():
        lines.append(f"Report: `{report}` ({report.as_uri()})")
    else:
        lines.append(f"Report: not built yet (`gpuclust report {run_dir}`)")
    lines.append("")
    if metrics:
        lines.append("| algorithm | k | ACC | NMI | ARI | backend | largest clusters |")
        lines.append("|---|---:|---:|---:|---:|---|---|")
        for r in D.metrics_rows(metrics, algos):
            sizes = ", ".join(str(s) for s in r["cluster_sizes"][:5]) + (", …" if len(r["cluster_sizes"]) > 5 else "")
            lines.append(f"| {r['algorithm']} | {_fmt(r['k'])} | {_fmt(r['acc'])} | {_fmt(r['nmi'])} | "
                         f"{_fmt(r['ari'])} | {_fmt(r['backend'])} | {sizes} |")
        lines.append("")
        fallbacks = metrics.get("fallbacks") or []
        lines.append("**GPU → CPU fallbacks:** " + ("none" if not fallbacks else ""))
        lines += [f"- {f}" for f in fallbacks]
        timings = D.timing_rows(metrics, algos)
        if timings:
            lines.append("")
            lines.append("**Timings (s):** " + ", ".join(f"{k} {v:.2f}" for k, v in timings)
                         + f" (total {sum(v for _, v in timings):.2f})")
    else:
        lines.append("_metrics.json is missing or unreadable._")
    figs = sorted((run_dir / FIGURES_DIR).glob("*.png")) if (run_dir / FIGURES_DIR).is_dir() else []
    if figs:
        lines.append("")
        lines.append(f"**Figures** (`{run_dir / FIGURES_DIR}`):")
        montages = [f for f in figs if f.name.startswith("montage-")]
        for f in figs:
            if f not in montages:
                lines.append(f"- `{f.name}`")
        if montages:
            lines.append(f"- {len(montages)} cluster montages (`montage-<algorithm>-c<cluster>.png`)")
    if result is not None and result.missing:
        lines.append("")
        lines.append("**Missing or unusable inputs:**")
        lines += [f"- `{m.name}`: {m.reason}" for m in result.missing]
    return "\n".join(lines) + "\n"
