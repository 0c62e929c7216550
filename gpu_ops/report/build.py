"""Build a run's report: PNG figures in ``RUN_DIR/figures/`` and ``RUN_DIR/report.html``.

See :mod:`gpu_ops.report` for what the page shows and the inputs it reads.
"""

from __future__ import annotations

import base64
import html
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from gpu_ops.errors import InputError
from gpu_ops.report import data as D
from gpu_ops.report import figures as F
from gpu_ops.rundir import RunDir
from gpu_ops.store import atomic_write_bytes

log = logging.getLogger(__name__)

FIGURES_DIR = RunDir.FIGURES
REPORT_NAME = RunDir.REPORT


@dataclass
class ReportResult:
    """What :func:`build_report` wrote and what it could not use.

    ``html``: the page; ``figures``: every PNG written (under ``RUN_DIR/figures/``);
    ``missing``: one :class:`~gpu_ops.report.data.Missing` (name, reason) per absent or unusable
    input, saying what was skipped (``str(m)`` is one line).
    """

    html: Path
    figures: list[Path] = field(default_factory=list)
    missing: list[D.Missing] = field(default_factory=list)

    @property
    def missing_names(self) -> list[str]:
        return [m.name for m in self.missing]


@dataclass
class _Section:
    anchor: str
    title: str
    body: list[str] = field(default_factory=list)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    """HTML table; cells are already escaped HTML."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


class _Builder:
    def __init__(self, run_dir: Path, tmp_figs: Path, *, embed: bool, per_row: int, montage_rows: int,
                 max_clusters: int, thumbnails: int, tile_px: int, seed: int, shown_as: Path | None = None) -> None:
        self.run_dir = run_dir
        self.shown_as = Path(shown_as) if shown_as is not None else run_dir  # the run directory the page names
        self.tmp = tmp_figs
        self.embed = embed
        self.per_row = per_row
        self.montage_rows = montage_rows
        self.max_clusters = max_clusters
        self.thumbnails = thumbnails
        self.tile_px = tile_px
        self.seed = seed
        self.figures: list[str] = []  # names inside figures/
        self.sections: list[_Section] = []

    # -- helpers
    def fig_path(self, name: str) -> Path:
        self.figures.append(name)
        return self.tmp / name

    def img(self, name: str, alt: str, cls: str = "") -> str:
        if self.embed:
            src = "data:image/png;base64," + base64.b64encode((self.tmp / name).read_bytes()).decode()
        else:
            src = f"{FIGURES_DIR}/{name}"
        return f'<img src="{_e(src)}" alt="{_e(alt)}" class="{cls}">'

    def figure(self, name: str, caption: str, cls: str = "") -> str:
        return f"<figure>{self.img(name, caption, cls)}<figcaption>{_e(caption)}</figcaption></figure>"

    def attempt(self, what: str, inputs: D.RunInputs, fn: Callable[[], Any]) -> Any:
        """Run one figure's work; a failure becomes a note instead of ending the report."""
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - one broken figure must not cost the page
            log.warning("report: %s failed: %s", what, exc, exc_info=True)
            inputs.note(what, f"figure failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); skipped")
            return None


def build_report(run_dir: Path, *, embed_images: bool = False, per_row: int = 10, montage_rows: int = 5,
                 max_clusters: int = 50, thumbnails: int = 300, tile_px: int = 48, seed: int = 0,
                 shown_as: Path | None = None) -> ReportResult:
    """Write the figures and ``report.html`` for the run directory ``run_dir``.

    Parameters
    ----------
    run_dir : Path
        A run directory (see :mod:`gpu_ops.rundir`).
    embed_images : bool
        Put the figures into the page as data URIs (one file to mail around); otherwise the page
        links ``figures/NAME.png`` beside it. The PNGs are written either way.
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
    inputs = D.load_run(run_dir)
    tmp = run_dir / f".{FIGURES_DIR}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        b = _Builder(run_dir, tmp, embed=embed_images, per_row=per_row, montage_rows=montage_rows,
                     max_clusters=max_clusters, thumbnails=thumbnails, tile_px=tile_px, seed=seed, shown_as=shown_as)
        images = D.ImageSource.open(inputs) if (inputs.assignments is not None or inputs.map2d is not None) else None
        _sections(b, inputs, images)
        page = _page(b, inputs, time.perf_counter() - t0)
        final = run_dir / FIGURES_DIR
        old = run_dir / f".{FIGURES_DIR}.old-{uuid.uuid4().hex[:8]}"
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        atomic_write_bytes(run_dir / REPORT_NAME, page.encode("utf-8"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ReportResult(run_dir / REPORT_NAME, [run_dir / FIGURES_DIR / n for n in b.figures], list(inputs.missing))


# ---------------------------------------------------------------- sections


def _sections(b: _Builder, inputs: D.RunInputs, images: D.ImageSource | None) -> None:
    metrics = inputs.metrics
    a = inputs.assignments
    algos = inputs.algorithms
    names = {i: n for i, n in enumerate(inputs.class_names)} if inputs.class_names else None

    if metrics is not None:
        sec = _Section("metrics", "Metrics")
        rows = []
        for r in D.metrics_rows(metrics, algos):
            sizes = r["cluster_sizes"]
            shown = ", ".join(str(s) for s in sizes[:20]) + (f", … ({len(sizes)} clusters)" if len(sizes) > 20 else "")
            rows.append([_e(r["algorithm"]), _e(_fmt(r["k"])), _e(_fmt(r["acc"])), _e(_fmt(r["nmi"])),
                         _e(_fmt(r["ari"])), _e(_fmt(r["backend"])), _e(shown)])
        sec.body.append(_table(["algorithm", "k", "ACC", "NMI", "ARI", "backend", "cluster sizes (largest first)"],
                               rows, "metrics"))
        if rows and all(r["acc"] is None for r in D.metrics_rows(metrics, algos)):
            sec.body.append("<p class=note>No true labels: ACC, NMI and ARI are not defined for this run.</p>")
        b.sections.append(sec)

    if inputs.map2d is not None:
        sec = _Section("maps", "2-D map")
        m = inputs.map2d
        xy = m[["x", "y"]].to_numpy(dtype=np.float32)
        reducer = ((metrics or {}).get("reducer") or {}).get("name") or (inputs.config or {}).get("reducer", "")
        dataset = inputs.dataset_spec or ""
        if a is not None:
            joined = m[["image_id"]].merge(a, on="image_id", how="left")
            for algo in algos:
                col = joined[algo]
                if col.isna().any():
                    inputs.note(f"map:{algo}", f"{int(col.isna().sum())} map points have no {algo} cluster; they are drawn as cluster -1")
                lab = col.fillna(-1).to_numpy().astype(np.int64)
                name = f"map-{_slug(algo)}.png"

                def draw(name=name, lab=lab, algo=algo):
                    k = len(np.unique(lab))
                    F.scatter_map(xy, lab, b.fig_path(name), f"{dataset} · {algo} (k={k}) · {reducer} map")
                    return b.figure(name, f"Map coloured by {algo} cluster", "map")
                out = b.attempt(f"figure {name}", inputs, draw)
                if out:
                    sec.body.append(out)
        if inputs.labels is not None:
            y = D.aligned_labels(m["image_id"].astype(str), inputs.labels)
            assert y is not None
            if (y >= 0).any():
                def draw_label():
                    sel = y >= 0
                    F.scatter_map(xy[sel], y[sel], b.fig_path("map-label.png"), f"{dataset} · true labels · {reducer} map",
                                  names=names, legend_title="class")
                    return b.figure("map-label.png", "Map coloured by true label", "map")
                out = b.attempt("figure map-label.png", inputs, draw_label)
                if out:
                    sec.body.append(out)
        b.sections.append(sec)
        if images is not None and b.thumbnails > 0:
            sec = _Section("thumbnails", "Images on the map")
            primary = algos[0] if algos else None
            out = b.attempt("figure thumbnails.png", inputs, lambda: _thumbnails(b, inputs, images, primary, xy))
            if out:
                sec.body.append(out)
                b.sections.append(sec)

    if a is not None and inputs.labels is not None:
        sec = _Section("confusion", "Confusion after Hungarian mapping")
        for algo in algos:
            name = f"confusion-{_slug(algo)}.png"

            def draw(name=name, algo=algo):
                mat, classes, clusters = D.confusion_for(a, algo, inputs.labels)
                F.confusion_figure(mat, classes, clusters, b.fig_path(name),
                                   f"{algo}: {int(mat.sum())} labelled images", inputs.class_names)
                return b.figure(name, f"{algo}: rows true classes, columns clusters ordered by their matched class "
                                      f"(a perfect clustering is diagonal)", "confusion")
            out = b.attempt(f"figure {name}", inputs, draw)
            if out:
                sec.body.append(out)
        b.sections.append(sec)

    if a is not None and images is not None:
        for algo in algos:
            sec = _Section(f"montages-{_slug(algo)}", f"Cluster montages · {algo}")
            out = b.attempt(f"montages {algo}", inputs, lambda algo=algo: _montages(b, inputs, images, algo))
            if out:
                sec.body.extend(out)
                b.sections.append(sec)

    for algo, Z in inputs.linkages.items():
        sec = _Section(f"dendrogram-{_slug(algo)}", f"Dendrogram · {algo}")
        name = f"dendrogram-{_slug(algo)}.png"
        k = None
        if metrics and algo in (metrics.get("algorithms") or {}):
            k = metrics["algorithms"][algo].get("k")
        if k is None and a is not None and algo in a.columns:
            k = int(a[algo].nunique())
        k = int(k or 1)

        def draw(name=name, Z=Z, k=k, algo=algo):
            F.dendrogram_figure(Z, k, D.dendrogram_cut(Z, k), b.fig_path(name),
                                f"{algo} ({(inputs.config or {}).get('linkage', '')} linkage), cut at k={k}")
            return b.figure(name, f"Agglomerative merges of {Z.shape[0] + 1} images; the dashed line cuts k={k} clusters", "wide")
        out = b.attempt(f"figure {name}", inputs, draw)
        if out:
            sec.body.append(out)
            b.sections.append(sec)

    if inputs.k_selection is not None:
        sec = _Section("k-selection", "Choosing k")
        sel = inputs.k_selection

        def draw_k():
            F.k_selection_figure(sel, b.fig_path("k-selection.png"))
            return b.figure("k-selection.png", f"Elbow at k={sel.get('elbow_k')}; the highest silhouette chose "
                                               f"k={sel.get('chosen_k')}", "wide")
        out = b.attempt("figure k-selection.png", inputs, draw_k)
        if out:
            sec.body.append(out)
            b.sections.append(sec)

    rec = b.run_dir / D.RECONSTRUCTIONS
    if rec.is_file():
        sec = _Section("reconstructions", "Autoencoder reconstructions")
        try:
            inp, outp, ids = D.load_reconstructions(rec, max_pairs=b.per_row * 5)
        except ValueError as exc:
            inputs.note(D.RECONSTRUCTIONS, f"{exc}; reconstructions skipped")
        else:
            def draw_rec():
                _reconstructions(b, inp, outp)
                return b.figure("reconstructions.png", f"{len(inp)} images: each input row is followed by its "
                                                       "reconstruction", "montage")
            out = b.attempt("figure reconstructions.png", inputs, draw_rec)
            if out:
                sec.body.append(out)
                b.sections.append(sec)

    if metrics is not None:
        sec = _Section("backends", "Backends and fallbacks")
        fallbacks = list(metrics.get("fallbacks") or [])
        if fallbacks:
            sec.body.append("<div class=warn><b>GPU → CPU fallbacks</b><ul>" +
                            "".join(f"<li>{_e(f)}</li>" for f in fallbacks) + "</ul></div>")
        else:
            sec.body.append("<p>No fallbacks: every op ran on the backend it resolved to.</p>")
        ext = metrics.get("extract") or {}
        red = metrics.get("reducer") or {}
        rows = [[_e("extract"), "", _e(ext.get("extractor", "")), _e(ext.get("device", "")), _e(f"{ext.get('dim', '')}-d features"), ""]]
        rows += [[_e(r["op"]), _e(_fmt(r["requested"])), _e(_fmt(r["backend"])), _e(_fmt(r["kind"])), _e(r["reason"]),
                  _e("; ".join(r["fallbacks"]) or "–")] for r in D.backend_rows(metrics)]
        if red.get("name"):
            rows.append([_e(f"map ({red.get('name')})"), "", _e(_fmt(red.get("backend"))), "", "", ""])
        sec.body.append(_table(["op", "requested", "backend", "kind / device", "why", "fallbacks"], rows, "backends"))
        b.sections.append(sec)
        timings = D.timing_rows(metrics, algos)
        if timings:
            sec = _Section("timings", "Timings")
            out = b.attempt("figure timings.png", inputs,
                            lambda: (F.timings_figure(timings, b.fig_path("timings.png")),
                                     b.figure("timings.png", "Seconds per stage", "small"))[1])
            sec.body.append(_table(["stage", "seconds"], [[_e(k), _e(f"{v:.3f}")] for k, v in timings]
                                   + [["<b>total</b>", _e(f"{sum(v for _, v in timings):.3f}")]], "timings"))
            if out:
                sec.body.append(out)
            b.sections.append(sec)

    if inputs.config is not None:
        sec = _Section("settings", "Settings")
        sec.body.append(_table(["setting", "value"], [[_e(k), _e(v)] for k, v in inputs.config.items()], "settings"))
        b.sections.append(sec)


def _thumbnails(b: _Builder, inputs: D.RunInputs, images: D.ImageSource, primary: str | None,
                xy: np.ndarray) -> str | None:
    m = inputs.map2d
    assert m is not None
    available = m[m["image_id"].astype(str).isin(images.index.keys())]
    placements = D.thumbnail_positions(available, b.thumbnails, seed=b.seed)
    tiles = {i: t for i, _, _ in placements if (t := images.tile(i, 32)) is not None}
    if not tiles:
        inputs.note("thumbnails", "no image could be loaded from the dataset; thumbnails skipped")
        return None
    if primary is not None and inputs.assignments is not None:
        by_id = dict(zip(inputs.assignments["image_id"].astype(str), inputs.assignments[primary].astype(int)))
        point_labels = np.array([by_id.get(i, -1) for i in m["image_id"].astype(str)], dtype=np.int64)
    else:
        by_id, point_labels = {}, np.zeros(len(m), np.int64)
    F.thumbnail_map(xy, point_labels, placements, tiles, b.fig_path("thumbnails.png"),
                    f"{len(tiles)} sample images at their map positions" + (f" · frames: {primary} cluster" if primary else ""),
                    frame_labels=by_id)
    return b.figure("thumbnails.png", f"{len(tiles)} images drawn at their own 2-D coordinates (spread out: no two "
                                      "closer than 1% of the map's diagonal)", "map big")


def _montages(b: _Builder, inputs: D.RunInputs, images: D.ImageSource, algo: str) -> list[str]:
    a = inputs.assignments
    assert a is not None
    order = D.cluster_order(a, algo)
    parts = []
    if len(order) > b.max_clusters:
        parts.append(f"<p class=note>The {b.max_clusters} largest of {len(order)} clusters.</p>")
    cells = []
    for cluster_id, size in order[:b.max_clusters]:
        members = D.montage_members(a, algo, cluster_id, b.per_row * b.montage_rows, seed=b.seed)
        tiles = [t for i in members if (t := images.tile(i, b.tile_px)) is not None]
        if not tiles:
            continue
        name = f"montage-{_slug(algo)}-c{cluster_id}.png"
        F.save_image(D.grid(tiles, b.per_row), b.fig_path(name))
        comp = D.cluster_composition(a, algo, cluster_id, inputs.labels)
        caption = f"cluster {cluster_id} · {size} images"
        if len(tiles) < size:
            caption += f" (showing {len(tiles)})"
        if comp:
            cname = (lambda c: inputs.class_names[c] if inputs.class_names and 0 <= c < len(inputs.class_names) else str(c))
            caption += " · " + ", ".join(f"{cname(c)} {100 * n / size:.0f}%" for c, n in comp)
        cells.append(b.figure(name, caption, "montage"))
    if images.failed:
        bad = len(images.failed)
        example = next(iter(images.failed.items()))
        inputs.note("images", f"{bad} image(s) could not be loaded and are left out (e.g. {example[0]}: {example[1]})")
        images.failed.clear()
    parts.append('<div class="montages">' + "".join(cells) + "</div>")
    return parts


def _reconstructions(b: _Builder, inp: np.ndarray, outp: np.ndarray) -> None:
    tiles: list[np.ndarray] = []
    per = b.per_row
    for start in range(0, len(inp), per):
        chunk = range(start, min(start + per, len(inp)))
        tiles += [D.to_rgb_tile(inp[i], b.tile_px) for i in chunk]
        tiles += [np.full((b.tile_px, b.tile_px, 3), 255, np.uint8)] * (per - len(chunk))
        tiles += [D.to_rgb_tile(outp[i], b.tile_px) for i in chunk]
        tiles += [np.full((b.tile_px, b.tile_px, 3), 255, np.uint8)] * (per - len(chunk))
    F.save_image(D.grid(tiles, per), b.fig_path("reconstructions.png"))


# ---------------------------------------------------------------- page

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#263238;color:#fff;padding:14px 24px}
header h1{margin:0;font-size:1.4em}
header p{margin:4px 0 0;color:#cfd8dc;font-size:.9em}
header code{background:#37474f;color:#eceff1}
nav{padding:8px 24px;background:#eceff1;font-size:.9em}
nav a{margin-right:14px;color:#1565c0;text-decoration:none}
main{padding:8px 24px 40px}
section{margin:18px 0;padding:8px 16px 16px;background:#fff;border:1px solid #e0e0e0;border-radius:6px}
h2{font-size:1.15em;border-bottom:1px solid #eee;padding-bottom:4px}
table{border-collapse:collapse;font-size:.85em;margin:8px 0}
th,td{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f5f5f5}
figure{display:inline-block;margin:8px 12px 8px 0;vertical-align:top}
figcaption{font-size:.8em;color:#555;max-width:560px}
img{max-width:100%;height:auto}
img.map{width:560px}
img.map.big{width:900px}
img.wide{width:900px}
img.small{width:560px}
img.confusion{max-width:720px}
img.montage{image-rendering:pixelated}
.montages figure{margin:6px 10px 10px 0}
.warn{background:#fff3e0;border-left:4px solid #fb8c00;padding:6px 12px;margin:8px 0}
.note{color:#666;font-size:.9em}
code{background:#f1f1f1;padding:0 3px}
"""


def _page(b: _Builder, inputs: D.RunInputs, seconds: float) -> str:
    metrics = inputs.metrics or {}
    cfg = inputs.config or {}
    title = f"gpuclust run · {inputs.dataset_spec or b.shown_as.name}"
    facts = []
    if metrics.get("n") is not None:
        facts.append(f"n={metrics['n']}")
    elif inputs.assignments is not None:
        facts.append(f"n={len(inputs.assignments)}")
    if cfg.get("extractor") or (metrics.get("extract") or {}).get("extractor"):
        facts.append(f"features: {cfg.get('extractor') or metrics['extract']['extractor']}")
    if inputs.algorithms:
        facts.append("algorithms: " + ", ".join(inputs.algorithms))
    red = (metrics.get("reducer") or {}).get("name") or cfg.get("reducer")
    if red:
        facts.append(f"map: {red}")
    if metrics.get("quarantined"):
        facts.append(f"{metrics['quarantined']} unreadable item(s) skipped at extraction")
    nav = "".join(f'<a href="#{_e(s.anchor)}">{_e(s.title)}</a>' for s in b.sections)
    notes = ""
    if inputs.missing:
        notes = ('<section id="missing"><h2>Missing or unusable inputs</h2><div class=warn><ul>'
                 + "".join(f"<li><code>{_e(m.name)}</code>: {_e(m.reason)}</li>" for m in inputs.missing)
                 + "</ul></div></section>")
    body = "".join(f'<section id="{_e(s.anchor)}"><h2>{_e(s.title)}</h2>{"".join(s.body)}</section>'
                   for s in b.sections)
    store = metrics.get("store")
    sub = " · ".join(_e(f) for f in facts)
    where = f"run directory <code>{_e(b.shown_as.absolute())}</code>" + (f" · store <code>{_e(store)}</code>" if store else "")
    generated = time.strftime("%Y-%m-%d %H:%M:%S")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<header><h1>{_e(title)}</h1><p>{sub}</p><p>{where}</p></header>
<nav>{nav}</nav>
<main>
{notes}
{body}
<p class=note>Generated {generated} by gpuclust report in {seconds:.1f} s. This page needs no network and no JavaScript.</p>
</main>
</body>
</html>
"""


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
