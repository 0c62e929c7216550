"""The run report (gpu_ops.report): figure data, missing inputs, and the page in a real browser.

Runs are built with gpu_ops.pipeline's stage functions directly (no Prefect, PCA maps) so the
whole file stays fast on a 2-core CPU: real digits, and 200 real CIFAR-10 JPEGs in a folder.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from gpu_ops import pipeline
from gpu_ops.config import make_config
from gpu_ops.errors import InputError
from gpu_ops.metrics import hungarian_accuracy
from gpu_ops.report import (
    ReportResult,
    build_report,
    cluster_order,
    confusion_for,
    load_run,
    montage_members,
    summary_markdown,
    thumbnail_positions,
)
from gpu_ops.report import build as B
from gpu_ops.report import data as D
from gpu_ops.report import figures as F
from gpu_ops.rundir import commit_run, start_run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def make_run(tmp: Path, **settings) -> Path:
    """A real run directory from the pipeline's stage functions (what the flow does, minus Prefect)."""
    out = tmp / "run"
    cfg = make_config(cache_dir=tmp / "cache", out=out, **{"reducer": "pca", **settings})
    staging = start_run(out)
    t0 = time.perf_counter()
    store = pipeline.extract_stage(pipeline.extract_params(cfg), progress=False)
    timings = {"extract": round(time.perf_counter() - t0, 3)}
    clusters = []
    for algorithm in cfg.algorithms:
        clusters.append(pipeline.cluster_stage(store.store, cfg, algorithm, str(staging)))
        timings[f"cluster:{algorithm}"] = clusters[-1].seconds
    reduced = pipeline.reduce_stage(store.store, cfg, str(staging))
    timings["reduce"] = reduced.seconds
    metrics = pipeline.evaluate_stage(store.store, clusters)
    pipeline.finalize_run(cfg, store, clusters, reduced, metrics, str(staging), timings)
    return commit_run(staging, out)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ReportResult]:
    """digits, k-means + ward agglomerative, k chosen automatically (so k_selection.json exists)."""
    run = make_run(tmp_path_factory.mktemp("digits"), dataset="digits", algorithms=["kmeans", "agglomerative"],
                   k="auto", k_range=(8, 12))
    return run, build_report(run)


@pytest.fixture(scope="module")
def folder_run(cifar_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ReportResult]:
    """200 CIFAR-10 test JPEGs in class-named folders, raw 32 px pixels, k=10."""
    run = make_run(tmp_path_factory.mktemp("cifar-run"), dataset=f"folder:{cifar_folder}", extractor="raw",
                   image_size=32, algorithms=["kmeans", "agglomerative"], k=10)
    return run, build_report(run)


def copy_run(run: Path, tmp_path: Path, name: str = "copy") -> Path:
    dst = tmp_path / name
    shutil.copytree(run, dst, ignore=shutil.ignore_patterns("figures", "report.html"))
    return dst


def png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


# ---------------------------------------------------------------- figure data


def test_report_writes_every_figure(digits_run):
    run, result = digits_run
    assert result.html == run / "report.html" and result.html.is_file()
    assert result.missing == []
    names = {p.name for p in result.figures}
    k = json.loads((run / "metrics.json").read_text())["algorithms"]["kmeans"]["k"]
    assert {"map-kmeans.png", "map-agglomerative.png", "map-label.png", "thumbnails.png", "confusion-kmeans.png",
            "confusion-agglomerative.png", "dendrogram-agglomerative.png", "k-selection.png", "timings.png"} <= names
    assert len([n for n in names if n.startswith("montage-kmeans-")]) == k
    for p in result.figures:
        assert p.parent == run / "figures"
        with Image.open(p) as im:
            assert im.format == "PNG" and im.width > 50 and im.height > 50
    page = result.html.read_text()
    for p in result.figures:  # every figure is on the page, by a relative path
        assert f'src="figures/{p.name}"' in page
    assert "<script" not in page.lower() and not re.search(r"""(src|href)=["']https?:""", page)


def test_montages_show_only_members_largest_first(digits_run):
    run, result = digits_run
    inputs = load_run(run)
    a = inputs.assignments
    images = D.ImageSource.open(inputs)
    assert images is not None
    for algo in ("kmeans", "agglomerative"):
        order = cluster_order(a, algo)
        sizes = [s for _, s in order]
        assert sizes == sorted(sizes, reverse=True) and sum(sizes) == len(a)
        for cluster_id, size in order:
            members = montage_members(a, algo, cluster_id, 50, seed=0)
            truth = set(a.loc[a[algo] == cluster_id, "image_id"])
            assert set(members) <= truth and len(members) == min(50, size) == len(set(members))
            # the PNG shows exactly these images, in this order
            expected = D.grid([images.tile(i, 48) for i in members], 10)
            assert np.array_equal(png(run / "figures" / f"montage-{algo}-c{cluster_id}.png"), expected)
        # the page lists the montages largest cluster first
        page = result.html.read_text()
        shown = [int(c) for c in re.findall(rf'src="figures/montage-{algo}-c(\d+)\.png"', page)]
        assert shown == [c for c, _ in order]


def test_montage_members_sampling():
    a = pd.DataFrame({"image_id": [f"i{k}" for k in range(100)], "c": np.arange(100) % 3})
    small = montage_members(a, "c", 2, 1000)
    assert small == [f"i{k}" for k in range(2, 100, 3)]
    some = montage_members(a, "c", 0, 5, seed=1)
    assert len(some) == 5 and all(int(i[1:]) % 3 == 0 for i in some)
    assert some == montage_members(a, "c", 0, 5, seed=1)  # seeded
    assert some == sorted(some, key=lambda i: int(i[1:]))  # dataset order
    assert montage_members(a, "c", 7, 5) == []
    with pytest.raises(ValueError, match="max_items"):
        montage_members(a, "c", 0, -1)


def test_confusion_matrix_sums_to_n_and_gives_the_accuracy(digits_run):
    run, _ = digits_run
    inputs = load_run(run)
    doc = inputs.metrics
    assert inputs.labels is not None and len(inputs.labels) == doc["n"]
    for algo in ("kmeans", "agglomerative"):
        mat, classes, clusters = confusion_for(inputs.assignments, algo, inputs.labels)
        assert mat.sum() == doc["n"] == 1797
        assert mat.shape == (10, doc["algorithms"][algo]["k"])
        assert sorted(clusters.tolist()) == sorted(inputs.assignments[algo].unique().tolist())
        y = D.aligned_labels(inputs.assignments["image_id"], inputs.labels)
        mapping = hungarian_accuracy(y, inputs.assignments[algo].to_numpy()).mapping
        cls_pos = {c: i for i, c in enumerate(classes)}
        matched = sum(mat[cls_pos[mapping[c]], j] for j, c in enumerate(clusters) if c in mapping)
        assert matched / doc["n"] == pytest.approx(doc["algorithms"][algo]["acc"])
        # matched clusters come first, in class order: a diagonal when k >= classes
        if len(clusters) >= len(classes):
            assert [mapping[c] for c in clusters[:len(classes)]] == classes.tolist()


def test_thumbnails_sit_at_their_map_coordinates(digits_run, tmp_path):
    run, result = digits_run
    m = pd.read_parquet(run / "map2d.parquet")
    by_id = {i: (x, y) for i, x, y in zip(m["image_id"], m["x"], m["y"])}
    pos = thumbnail_positions(m, 300, seed=0)
    assert 50 <= len(pos) <= 300 and len({p[0] for p in pos}) == len(pos)
    for image_id, x, y in pos:
        assert (x, y) == pytest.approx(by_id[image_id])
    assert pos == thumbnail_positions(m, 300, seed=0)
    # spread: no two kept points closer than 1% of the diagonal
    xy = np.array([(x, y) for _, x, y in pos])
    diag = np.hypot(*(m[["x", "y"]].max() - m[["x", "y"]].min()))
    d = np.hypot(*(xy[:, None, :] - xy[None, :, :]).transpose(2, 0, 1))
    assert d[np.triu_indices(len(xy), 1)].min() >= 0.01 * diag * (1 - 1e-9)
    plain = thumbnail_positions(m, 300, seed=0, min_separation=0)
    assert len(plain) == 300 and all((x, y) == pytest.approx(by_id[i]) for i, x, y in plain)
    # the drawing puts each thumbnail's anchor on its point
    tiles = {i: np.full((32, 32, 3), 128, np.uint8) for i, _, _ in pos}
    drawn = F.thumbnail_map(m[["x", "y"]].to_numpy(), np.zeros(len(m), int), pos, tiles, tmp_path / "t.png", "t")
    assert len(drawn) == len(pos)
    for (i, x, y), (j, dx, dy) in zip(pos, drawn):
        assert i == j and (dx, dy) == pytest.approx((x, y))
    assert (run / "figures" / "thumbnails.png").is_file()


def test_tsne_sweep_is_drawn_by_the_report_and_map_png_is_its_first_map(tmp_path):
    """``tsne_perplexities``: the reduce stage saves the maps (no figure), the report draws and shows
    them; map.png comes from the report too (the stages draw nothing)."""
    pytest.importorskip("openTSNE")
    run = make_run(tmp_path, dataset="digits", limit=150, algorithms=["kmeans"], k=10, reducer="tsne",
                   tsne_perplexities=[5, 30])
    assert not list(run.glob("*.png"))  # the stages draw nothing
    with np.load(run / "tsne_sweep.npz", allow_pickle=False) as sweep:
        assert sweep["perplexities"].tolist() == [5.0, 30.0] and sweep["embeddings"].shape == (2, 150, 2)
    result = build_report(run, max_clusters=2, thumbnails=0)
    assert result.missing == []
    assert "tsne-sweep.png" in {p.name for p in result.figures}
    with Image.open(run / "figures" / "tsne-sweep.png") as im:
        assert im.width == round(2 * 3.6 * 110)  # two maps side by side
    page = result.html.read_text()
    assert '<a href="#tsne-sweep">t-SNE perplexity sweep</a>' in page
    section = re.search(r'<section id="tsne-sweep">.*?</section>', page).group(0)
    assert 'src="figures/tsne-sweep.png"' in section
    assert "t-SNE maps at perplexity 5, 30, coloured by true label" in section
    assert result.map == run / "map.png"
    assert (run / "map.png").read_bytes() == (run / "figures" / "map-kmeans.png").read_bytes()
    (run / "tsne_sweep.npz").write_bytes(b"not an npz")
    again = build_report(run, max_clusters=2, thumbnails=0)
    assert [m.name for m in again.missing] == ["tsne_sweep.npz"]
    assert "t-SNE perplexity sweep skipped" in again.missing[0].reason
    assert "tsne-sweep.png" not in {p.name for p in again.figures} and 'id="tsne-sweep"' not in again.html.read_text()


def test_page_escapes_every_value(digits_run, tmp_path):
    run = copy_run(digits_run[0], tmp_path)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["dataset"] = "folder:/nowhere/<script>alert(1)</script>"
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    page = build_report(run, max_clusters=1, thumbnails=0).html.read_text()
    assert "<script" not in page.lower()
    assert "<title>gpuclust run · folder:/nowhere/&lt;script&gt;alert(1)&lt;/script&gt;</title>" in page
    # the template itself: cells, captions and attributes are text, never markup
    sections = [B.Section("x", "<i>t</i>", [B.Table(["<th>"], [['<img src=x onerror="y">']], "c"),
                                             B.Figure('figures/a".png', 'say "hi" & <b>bye</b>')])]
    html = B.render_page(sections, load_run(run), run, 0.0)
    assert "<i>t</i>" not in html and "&lt;i&gt;t&lt;/i&gt;" in html
    assert "<td>&lt;img src=x onerror=&#34;y&#34;&gt;</td>" in html
    assert '<img src="figures/a&#34;.png" alt="say &#34;hi&#34; &amp; &lt;b&gt;bye&lt;/b&gt;" class="">' in html


def test_matplotlib_is_imported_only_by_the_report():
    """Figures are drawn in gpu_ops/report only: no other module of the product imports matplotlib
    or the report's figures."""
    import ast

    root = Path(__file__).resolve().parents[1]
    offenders = []
    for path in sorted([*(root / "gpu_ops").rglob("*.py"), *(root / "flows").rglob("*.py")]):
        if (root / "gpu_ops" / "report") in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(root)}:{node.lineno} {n}" for n in names
                          if n.split(".")[0] == "matplotlib" or n.startswith("gpu_ops.report.figures")]
    assert offenders == []


def test_scatter_map_keeps_its_signature(tmp_path):
    xy = np.random.default_rng(0).normal(size=(50, 2))
    path = F.scatter_map(xy, np.arange(50) % 4, tmp_path / "m.png", "title")
    assert path.is_file() and png(path).shape[2] == 3


# ---------------------------------------------------------------- missing and unusable inputs


def test_missing_map2d_is_named_and_the_rest_is_built(digits_run, tmp_path):
    run = copy_run(digits_run[0], tmp_path)
    (run / "map2d.parquet").unlink()
    result = build_report(run)
    assert "map2d.parquet" in result.missing_names
    assert any("maps and thumbnails skipped" in m.reason for m in result.missing if m.name == "map2d.parquet")
    assert result.html.is_file()
    names = {p.name for p in result.figures}
    assert not any(n.startswith("map-") or n == "thumbnails.png" for n in names)
    assert "confusion-kmeans.png" in names and any(n.startswith("montage-") for n in names)
    page = result.html.read_text()
    assert "map2d.parquet" in page and "Missing or unusable inputs" in page


def test_missing_metrics_json(digits_run, tmp_path):
    run = copy_run(digits_run[0], tmp_path)
    (run / "metrics.json").unlink()
    result = build_report(run)
    assert result.missing_names == ["metrics.json"]
    names = {p.name for p in result.figures}
    # without metrics.json (the store's path) the true labels come from the re-opened dataset
    assert {"map-kmeans.png", "map-label.png", "confusion-kmeans.png", "dendrogram-agglomerative.png"} <= names
    assert "timings.png" not in names and any(n.startswith("montage-") for n in names)
    assert "metrics table, timings and backends skipped" in result.html.read_text()


def test_missing_metrics_and_config(digits_run, tmp_path):
    run = copy_run(digits_run[0], tmp_path)
    (run / "metrics.json").unlink()
    (run / "config.yaml").unlink()
    result = build_report(run)
    assert {"metrics.json", "config.yaml", "dataset"} <= set(result.missing_names)
    names = {p.name for p in result.figures}
    assert {"map-kmeans.png", "map-agglomerative.png", "dendrogram-agglomerative.png"} <= names
    assert not any(n.startswith(("montage-", "confusion-")) or n == "map-label.png" for n in names)
    assert result.html.is_file()


def test_not_a_run_directory(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        build_report(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "map2d.parquet").write_bytes(b"")
    with pytest.raises(InputError, match="neither assignments.parquet nor metrics.json"):
        build_report(tmp_path / "empty")


def test_broken_files_are_unusable_not_fatal(digits_run, tmp_path):
    run = copy_run(digits_run[0], tmp_path)
    (run / "assignments.parquet").write_bytes(b"not parquet")
    np.save(run / "linkage-agglomerative.npy", np.zeros((5, 3)))
    (run / "k_selection.json").write_text("[1, 2]")
    result = build_report(run)
    assert {"assignments.parquet", "linkage-agglomerative.npy", "k_selection.json"} <= set(result.missing_names)
    names = {p.name for p in result.figures}
    assert "map-label.png" in names and "timings.png" in names and not any(n.startswith("montage-") for n in names)


def test_moved_dataset_skips_images_and_says_why(folder_run, tmp_path):
    run = copy_run(folder_run[0], tmp_path)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["dataset"] = f"folder:{tmp_path / 'moved-away'}"
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    result = build_report(run)
    note = [m for m in result.missing if m.name == "dataset"]
    assert len(note) == 1 and "cannot be opened" in note[0].reason and "montages" in note[0].reason
    names = {p.name for p in result.figures}
    assert not any(n.startswith("montage-") for n in names) and "thumbnails.png" not in names
    assert {"map-kmeans.png", "confusion-kmeans.png", "map-label.png"} <= names  # labels come from the store
    assert "moved-away" in result.html.read_text()


def test_reconstructions(digits_run, tmp_path):
    run = copy_run(digits_run[0], tmp_path)
    rng = np.random.default_rng(0)
    x = rng.random((12, 8, 8)).astype(np.float32)
    np.savez(run / "reconstructions.npz", inputs=x, outputs=np.clip(x + 0.1, 0, 1),
             image_ids=np.array([f"digits/{i:07d}" for i in range(12)]))
    result = build_report(run, max_clusters=1, thumbnails=0)
    assert "reconstructions.png" in {p.name for p in result.figures}
    img = png(run / "figures" / "reconstructions.png")
    # rows of ten 48-px tiles, 2 px apart: inputs 0-9, their outputs, inputs 10-11, their outputs
    assert img.shape == (4 * 48 + 5 * 2, 10 * 48 + 11 * 2, 3)
    inp, out, ids = D.load_reconstructions(run / "reconstructions.npz")
    assert inp.dtype == np.uint8 and inp.shape == (12, 8, 8) and ids[0] == "digits/0000000"
    cell = lambda r, c: img[2 + r * 50: 50 + r * 50, 2 + c * 50: 50 + c * 50]  # noqa: E731
    assert np.array_equal(cell(0, 3), D.to_rgb_tile(inp[3], 48))
    assert np.array_equal(cell(1, 3), D.to_rgb_tile(out[3], 48))
    assert np.array_equal(cell(3, 1), D.to_rgb_tile(out[11], 48))
    np.savez(run / "reconstructions.npz", inputs=x, outputs=x[:, :4])
    result = build_report(run, max_clusters=1, thumbnails=0)
    assert any(m.name == "reconstructions.npz" and "differ in shape" in m.reason for m in result.missing)


def test_folder_run_report(folder_run):
    run, result = folder_run
    assert result.missing == []
    inputs = load_run(run)
    assert len(inputs.assignments) == 200
    page = result.html.read_text()
    assert "airplane" in page  # class names on the page (montage captions)
    names = {p.name for p in result.figures}
    assert len([n for n in names if n.startswith("montage-kmeans-")]) == inputs.assignments["kmeans"].nunique()
    # folder images are colour: a montage tile is not grey
    tile = png(sorted((run / "figures").glob("montage-kmeans-*.png"))[0])[2:50, 2:50].astype(int)
    assert np.abs(tile[..., 0] - tile[..., 2]).max() > 10


def test_summary_markdown(digits_run):
    run, result = digits_run
    md = summary_markdown(run, result)
    assert md.startswith("## gpuclust run: digits (n=1797)")
    assert str(run / "report.html") in md and "| kmeans |" in md and "| agglomerative |" in md
    assert "`map-kmeans.png`" in md and "cluster montages" in md and "fallbacks:** none" in md


# ---------------------------------------------------------------- the page in a headless browser


def _browser_check(html: Path, screenshot: Path) -> dict:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH (apt-get install chromium)")
    problems: list[str] = []
    requests: list[str] = []
    profile = screenshot.parent / f"profile-{screenshot.stem}"
    with sync_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, viewport={"width": 1280, "height": 1000},
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        try:
            page = context.new_page()
            page.on("console", lambda m: m.type in ("error", "warning") and problems.append(f"console {m.type}: {m.text}"))
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url} {r.failure}"))

            def route(r):
                requests.append(r.request.url)
                return r.continue_() if r.request.url.startswith(("file:", "data:")) else r.abort()
            page.route("**/*", route)
            page.goto(html.as_uri(), wait_until="load")
            imgs = page.eval_on_selector_all(
                "img", "els => els.map(e => ({src: e.getAttribute('src'), w: e.naturalWidth, done: e.complete}))")
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            context.close()
    return {"problems": problems, "images": imgs,
            "network": [u for u in requests if not u.startswith(("file:", "data:"))]}


@pytest.mark.parametrize("which", ["digits_run", "folder_run"])
def test_report_renders_in_headless_chromium(which, request, tmp_path):
    run, result = request.getfixturevalue(which)
    out = _browser_check(result.html, tmp_path / f"{which}.png")
    assert out["problems"] == []
    assert out["network"] == []
    assert len(out["images"]) == len(result.figures) > 10
    broken = [i["src"] for i in out["images"] if not (i["done"] and i["w"] > 0)]
    assert broken == []
    with Image.open(tmp_path / f"{which}.png") as shot:
        assert shot.width >= 1280 and shot.height > 2000


def test_embedded_report_is_one_file(digits_run, tmp_path):
    run = copy_run(digits_run[0], tmp_path)
    result = build_report(run, embed_images=True, max_clusters=3)
    alone = tmp_path / "alone" / "report.html"  # moved away from its figures: still complete
    alone.parent.mkdir()
    shutil.copy(result.html, alone)
    assert 'src="figures/' not in alone.read_text()
    out = _browser_check(alone, tmp_path / "embedded.png")
    assert out["problems"] == [] and out["network"] == []
    assert out["images"] and all(i["w"] > 0 for i in out["images"])
