"""Benchmark the report's interactive map in a real browser: Plotly WebGL (Scattergl) against SVG (Scatter).

For each size it makes a real run (raw MNIST pixels; images beyond MNIST's 70,000 are mirrored
copies), builds report.html twice (``map_webgl=True`` and ``False``), opens each in headless
Chromium through Playwright and measures:

* time to first draw: navigation start -> the map's first ``plotly_afterplot`` (median of --loads);
* panning: --pans drags of 12 mouse moves each; zooming: --zooms wheel steps at the centre; for
  each, the frame intervals seen by ``requestAnimationFrame`` from the first input until the map
  has settled (median, 95th percentile, worst) and the wall time per drag / wheel step;
* sizes: report.html, figures/plotly.min.js, the thumbnails inside the page.

Chromium runs as in the tests (``--disable-gpu``: WebGL on SwiftShader, the CPU), so the figures are
an upper bound for a desktop with a GPU. Example (the figures in BENCHMARKS.md came from it):

    PYTHONPATH=. .venv/bin/python bench/report_map.py --sizes 10000,100000
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update"]


def images(n: int) -> tuple[np.ndarray, np.ndarray]:
    """n MNIST images (train + test, then mirrored copies) and their labels."""
    from gpu_ops.data import load_dataset

    ds = load_dataset(f"idx:{DATA / 'mnist'}", "all", None)
    X, y = np.asarray(ds.items), np.asarray(ds.labels)
    if n > len(X):
        extra = n - len(X)
        X, y = np.concatenate([X, X[:extra, :, ::-1]]), np.concatenate([y, y[:extra]])
    return X[:n], y[:n]


def make_run(work: Path, n: int) -> tuple[Path, float]:
    """A real run directory (pipeline stages, no Prefect): raw pixels, k-means k=10 (one start, 20
    iterations: the map, not the clustering, is measured), PCA map."""
    from gpu_ops import pipeline
    from gpu_ops.config import make_config
    from gpu_ops.rundir import commit_run, start_run

    X, y = images(n)
    np.savez(work / "images.npz", X=X, y=y)
    out = work / "run"
    cfg = make_config(dataset=f"npz:{work / 'images.npz'}", extractor="raw", algorithms=["kmeans"], k=10,
                      n_init=1, max_iter=20, reducer="pca", cache_dir=work / "cache", out=out)
    t0 = time.perf_counter()
    staging = start_run(out)
    store = pipeline.extract_stage(pipeline.extract_params(cfg), progress=False)
    clusters = [pipeline.cluster_stage(store.store, cfg, "kmeans", str(staging))]
    reduced = pipeline.reduce_stage(store.store, cfg, str(staging))
    metrics = pipeline.evaluate_stage(store.store, clusters)
    pipeline.finalize_run(cfg, store, clusters, reduced, metrics, str(staging), {})
    commit_run(staging, out)
    return out, time.perf_counter() - t0


# One requestAnimationFrame chain per recording (an id ends the previous one's pending callback).
FRAME_RECORDER = """() => { const id = (window.__rec || 0) + 1; window.__rec = id; window.__frames = [];
    const loop = t => { if (window.__rec !== id) return; window.__frames.push(t); requestAnimationFrame(loop); };
    requestAnimationFrame(loop); }"""
SETTLE = """async () => {  // wait for the map to finish redrawing, then stop the recorder
    await new Promise(r => setTimeout(r, 400));
    await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
    window.__rec += 1000; return window.__frames; }"""


def frame_stats(frames: list[float]) -> dict[str, float]:
    d = np.diff(np.asarray(frames))
    if d.size == 0:
        return {"median_ms": float("nan"), "p95_ms": float("nan"), "worst_ms": float("nan")}
    return {"median_ms": float(np.median(d)), "p95_ms": float(np.percentile(d, 95)), "worst_ms": float(d.max())}


def measure(browser: Any, html: Path, loads: int, pans: int, zooms: int) -> dict[str, Any]:
    """Time to first draw (median of ``loads`` fresh pages), then pan and zoom frame times on the last."""
    firsts, loaded = [], []
    page = None
    for _ in range(loads):
        if page is not None:
            page.close()
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.route("**/*", lambda r: r.continue_() if r.request.url.startswith(("file:", "data:")) else r.abort())
        page.goto(html.as_uri(), wait_until="load", timeout=600_000)
        page.wait_for_selector("#imap-plot[data-drawn-ms]", timeout=600_000)
        firsts.append(float(page.get_attribute("#imap-plot", "data-drawn-ms")))
        loaded.append(page.evaluate("() => performance.getEntriesByType('navigation')[0].loadEventEnd"))
    assert page is not None
    page.locator("#imap-plot").scroll_into_view_if_needed()
    box = page.locator("#imap-plot .nsewdrag").first.bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    out: dict[str, Any] = {"first_draw_ms": statistics.median(firsts), "load_event_ms": statistics.median(loaded)}

    page.evaluate(FRAME_RECORDER)
    t0 = time.perf_counter()
    for i in range(pans):
        dx = 120 if i % 2 == 0 else -120
        page.mouse.move(cx, cy)
        page.mouse.down()
        page.mouse.move(cx + dx, cy + dx / 2, steps=12)
        page.mouse.up()
    frames = page.evaluate(SETTLE)
    out["pan"] = {**frame_stats(frames), "ms_per_drag": 1000 * (time.perf_counter() - t0) / pans}

    page.evaluate(FRAME_RECORDER)
    t0 = time.perf_counter()
    page.mouse.move(cx, cy)
    for i in range(zooms):
        page.mouse.wheel(0, -120 if i < zooms // 2 else 120)
    frames = page.evaluate(SETTLE)
    out["zoom"] = {**frame_stats(frames), "ms_per_step": 1000 * (time.perf_counter() - t0) / zooms}
    out["points"] = page.evaluate("() => document.getElementById('imap-plot')._fullData.reduce((a, t) => a + t._length, 0)")
    out["trace_type"] = page.evaluate("() => document.getElementById('imap-plot')._fullData[0].type")
    out["renderer"] = page.evaluate("""() => { const g = document.createElement('canvas').getContext('webgl');
        const e = g && g.getExtension('WEBGL_debug_renderer_info'); return e ? g.getParameter(e.UNMASKED_RENDERER_WEBGL) : ''; }""")
    page.close()
    return out


def sizes_of(run: Path) -> dict[str, float]:
    html = (run / "report.html").read_text()
    start = html.index('<script type="application/json" id="imap-data">')
    doc = json.loads(html[html.index(">", start) + 1:html.index("</script>", start)])
    thumbs = sum(len(v) for v in doc["thumbnails"].values())
    js = run / "figures" / "plotly.min.js"
    return {"report_html_mb": (run / "report.html").stat().st_size / 1e6,
            "plotly_js_mb": js.stat().st_size / 1e6 if js.exists() else 0.0,
            "map_document_mb": (html.index("</script>", start) - start) / 1e6,
            "thumbnails": len(doc["thumbnails"]), "thumbnails_mb": thumbs / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="10000,100000", help="comma-separated point counts")
    ap.add_argument("--kinds", default="scattergl,scatter", help="scattergl (WebGL) and/or scatter (SVG)")
    ap.add_argument("--loads", type=int, default=3, help="page loads per page (median time to first draw)")
    ap.add_argument("--pans", type=int, default=10)
    ap.add_argument("--zooms", type=int, default=20)
    ap.add_argument("--jsonl", type=Path, help="also append one JSON line per row here")
    args = ap.parse_args()

    import plotly
    from playwright.sync_api import sync_playwright

    from gpu_ops.report import build_report

    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        sys.exit("no chromium on PATH")
    rows = []
    with tempfile.TemporaryDirectory(prefix="report-map-") as tmp, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        version = browser.version
        for n in [int(s) for s in args.sizes.split(",")]:
            work = Path(tmp) / f"n{n}"
            work.mkdir()
            run, run_s = make_run(work, n)
            print(f"n={n}: run made in {run_s:.1f} s", file=sys.stderr, flush=True)
            for kind in args.kinds.split(","):
                page_dir = work / kind
                shutil.copytree(run, page_dir, ignore=shutil.ignore_patterns("figures", "report.html"))
                t0 = time.perf_counter()
                build_report(page_dir, map_webgl=(kind == "scattergl"))
                build_s = time.perf_counter() - t0
                row = {"n": n, "kind": kind, "build_report_s": build_s, **sizes_of(page_dir),
                       **measure(browser, page_dir / "report.html", args.loads, args.pans, args.zooms)}
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
                if args.jsonl:
                    with args.jsonl.open("a") as f:
                        f.write(json.dumps(row) + "\n")
        browser.close()
    print(f"\nChromium {version} headless ({rows[0]['renderer'] if rows else ''}), plotly {plotly.__version__}, "
          f"Python {platform.python_version()}\n")
    print("| n | trace | first draw ms | pan frame ms median / p95 / worst | ms per drag | "
          "zoom frame ms median / p95 / worst | ms per wheel step | report.html MB | plotly.min.js MB | thumbnails (MB) | build_report s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        pan, zoom = r["pan"], r["zoom"]
        print(f"| {r['n']:,} | {r['trace_type']} | {r['first_draw_ms']:.0f} | {pan['median_ms']:.0f} / {pan['p95_ms']:.0f} / "
              f"{pan['worst_ms']:.0f} | {pan['ms_per_drag']:.0f} | {zoom['median_ms']:.0f} / {zoom['p95_ms']:.0f} / "
              f"{zoom['worst_ms']:.0f} | {zoom['ms_per_step']:.0f} | {r['report_html_mb']:.1f} | {r['plotly_js_mb']:.1f} | "
              f"{r['thumbnails']} ({r['thumbnails_mb']:.1f}) | {r['build_report_s']:.1f} |")


if __name__ == "__main__":
    main()
