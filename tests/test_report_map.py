"""The report's interactive map in a real browser (headless Chromium through Playwright).

One real `gpuclust run` on scikit-learn's digits (k-means and agglomerative, PCA map) against the
session's Prefect server; its report.html is opened from disk with every request routed, so a
request that leaves file:/data: would be seen (and aborted). Variants of the report (outlier
scores, one embedded file, a thumbnail sample) are rebuilt from copies of that run directory.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from conftest import run_cli
from PIL import Image

from gpu_ops.data import load_dataset
from gpu_ops.registry import create_estimator
from gpu_ops.report import build_report, load_run
from gpu_ops.report import data as D
from gpu_ops.report import interactive as I
from gpu_ops.store import read_embeddings

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
# Chromium's software WebGL (SwiftShader) logs a performance note whenever it reads a canvas back
# for compositing; it says nothing about the page.
DRIVER_NOTE = re.compile(r"^\[\.WebGL-[0-9a-fx]+\]GL Driver Message \(OpenGL, Performance")

# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def run_dir(prefect_server, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished digits run (1797 images, k=10) made by the CLI, with its report."""
    out = tmp_path_factory.mktemp("map-run") / "run"
    result = run_cli(["run", "--dataset", "digits", "--algorithm", "kmeans,agglomerative", "--k", "10",
                      "--reducer", "pca", "--out", str(out)], api_url=prefect_server["url"], timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "report.html").is_file() and (out / "figures" / I.PLOTLY_JS).is_file()
    return out


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless Chromium for the module (skips where Playwright or Chromium is missing)."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH (apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                              args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                                    "--disable-background-networking", "--disable-component-update"])
        yield b
        b.close()


class MapPage:
    """report.html open in a fresh page: every request recorded (only file:/data: let through),
    console problems collected, and helpers that read the drawn map."""

    def __init__(self, browser: Any, html: Path) -> None:
        self.requests: list[str] = []
        self.problems: list[str] = []
        self.page = browser.new_page(viewport={"width": 1280, "height": 1000})
        self.page.on("console", lambda m: m.type in ("error", "warning") and not DRIVER_NOTE.match(m.text)
                     and self.problems.append(f"console {m.type}: {m.text}"))
        self.page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))

        def route(r: Any) -> Any:
            self.requests.append(r.request.url)
            return r.continue_() if r.request.url.startswith(("file:", "data:")) else r.abort()
        self.page.route("**/*", route)
        self.page.goto(html.as_uri(), wait_until="load")
        self.page.wait_for_selector("#imap-plot[data-drawn-ms]", timeout=60_000)

    @property
    def network(self) -> list[str]:
        return [u for u in self.requests if not u.startswith(("file:", "data:"))]

    def traces(self) -> list[dict[str, Any]]:
        """The drawn traces: type, name, rows (customdata) and per-point colours."""
        return self.page.evaluate("""() => document.getElementById('imap-plot')._fullData.map(t => {
            const rows = Array.from(t.customdata);
            const c = t.marker.color;
            return {type: t.type, name: t.name, rows: rows,
                    colors: typeof c === 'string' ? rows.map(() => c) : Array.from(c)};
        })""")

    def point_colours(self) -> dict[int, Any]:
        return {r: c for t in self.traces() for r, c in zip(t["rows"], t["colors"])}

    def screen_xy(self) -> dict[int, tuple[float, float]]:
        """Each point's position on the screen (CSS px), from the plot's own axes."""
        pos = self.page.evaluate("""() => {
            const gd = document.getElementById('imap-plot'), fl = gd._fullLayout, box = gd.getBoundingClientRect();
            const out = [];
            for (const t of gd._fullData) for (let i = 0; i < t._length; i++)
                out.push([t.customdata[i], box.left + fl._size.l + fl.xaxis.l2p(t.x[i]),
                          box.top + fl._size.t + fl.yaxis.l2p(t.y[i])]);
            return out;
        }""")
        return {int(r): (x, y) for r, x, y in pos}

    def isolated_point(self) -> tuple[int, float, float]:
        """The on-screen point farthest from every other one (a hover there can only mean it)."""
        pos = self.screen_xy()
        rows = np.array(sorted(pos))
        xy = np.array([pos[r] for r in rows])
        d = np.sqrt(((xy[:, None, :] - xy[None, :, :]) ** 2).sum(-1))
        np.fill_diagonal(d, np.inf)
        i = int(d.min(axis=1).argmax())
        return int(rows[i]), float(xy[i, 0]), float(xy[i, 1])

    def set_mode(self, key: str) -> None:
        """Pick a colour mode in the page's selector and wait until the map is redrawn in it."""
        self.page.select_option("#imap-mode", key)
        self.page.wait_for_selector(f'#imap[data-mode="{key}"]', timeout=30_000)

    def members(self) -> dict[str, Any]:
        return self.page.evaluate("""() => { const p = document.getElementById('imap-members');
            return {mode: p.dataset.mode, group: p.dataset.group, heading: p.querySelector('h3')?.innerText,
                    ids: Array.from(p.querySelectorAll('li')).map(li => li.dataset.id),
                    thumbs: p.querySelectorAll('li img').length}; }""")

    def close(self) -> None:
        self.page.close()


@pytest.fixture
def open_map(browser: Any) -> Iterator[Any]:
    pages: list[MapPage] = []

    def open_(html: Path) -> MapPage:
        pages.append(MapPage(browser, html))
        return pages[-1]
    yield open_
    for p in pages:
        p.close()


def digits_ids_and_images() -> tuple[list[str], np.ndarray]:
    ds = load_dataset("digits", "all", None)
    return [str(i) for i in ds.image_ids], np.stack([np.asarray(ds.load(k)) for k in range(len(ds))])


def decode_data_uri(uri: str) -> np.ndarray:
    head, _, payload = uri.partition(",")
    assert head in ("data:image/png;base64", "data:image/jpeg;base64"), head
    with Image.open(io.BytesIO(base64.b64decode(payload))) as im:
        return np.asarray(im.convert("RGB"))


def copy_run(run: Path, tmp_path: Path, name: str = "copy") -> Path:
    dst = tmp_path / name
    shutil.copytree(run, dst, ignore=shutil.ignore_patterns("figures", "report.html"))
    return dst


def write_outlier_scores(run: Path, drop: int = 0) -> pd.Series:
    """Real outlier scores: each image's mean distance to its 10 nearest neighbours in the run's
    embedding store (the knn op); the last ``drop`` images get none."""
    store = read_embeddings(Path(json.loads((run / "metrics.json").read_text())["store"]))
    knn, _ = create_estimator("knn", "cpu")
    dist, _ = knn.fit(store.embeddings).kneighbors(n_neighbors=10)
    scores = pd.Series(dist.mean(axis=1).astype(np.float64), index=store.image_ids)
    kept = scores.iloc[:len(scores) - drop]
    rank = kept.rank(ascending=False, method="first").astype(np.int64).to_numpy()  # 1: the most unusual
    pd.DataFrame({"image_id": kept.index, "score": kept.to_numpy(), "rank": rank}).to_parquet(run / D.OUTLIERS)
    return kept


# ---------------------------------------------------------------- the page


def test_map_opens_offline_with_every_point(run_dir, open_map):
    page = open_map(run_dir / "report.html")
    assert page.network == []
    assert page.problems == []
    assert (run_dir / "figures" / I.PLOTLY_JS).as_uri() in page.requests  # plotly.js from beside the page
    traces = page.traces()
    map2d = pd.read_parquet(run_dir / "map2d.parquet")
    rows = sorted(r for t in traces for r in t["rows"])
    assert rows == list(range(len(map2d))) and len(map2d) == 1797
    assert {t["type"] for t in traces} == {"scattergl"}
    # the first colour mode is the first algorithm: one legend entry per k-means cluster, named with its size
    sizes = pd.read_parquet(run_dir / "assignments.parquet")["kmeans"].value_counts()
    assert sorted(t["name"] for t in traces) == sorted(f"cluster {c} ({n})" for c, n in sizes.items())
    # the static figures stay for print and for people who want files
    html = (run_dir / "report.html").read_text()
    assert 'src="figures/map-kmeans.png"' in html and 'src="figures/thumbnails.png"' in html


def test_hover_shows_the_points_image_and_cluster(run_dir, open_map):
    page = open_map(run_dir / "report.html")
    row, x, y = page.isolated_point()
    page.page.mouse.move(x, y)
    page.page.wait_for_selector("#imap-tip:not([hidden])", timeout=10_000)
    tip = page.page.evaluate("""() => { const t = document.getElementById('imap-tip');
        return {id: t.dataset.id, src: t.querySelector('img')?.getAttribute('src'), text: t.innerText}; }""")
    map2d = pd.read_parquet(run_dir / "map2d.parquet")
    image_id = str(map2d["image_id"].iloc[row])
    assert tip["id"] == image_id
    ids, images = digits_ids_and_images()
    expected = D.to_rgb_tile(images[ids.index(image_id)], 48)
    assert np.array_equal(decode_data_uri(tip["src"]), expected)  # the point's own image, pixel for pixel
    a = pd.read_parquet(run_dir / "assignments.parquet").set_index("image_id")
    true = int(load_dataset("digits", "all", None).labels[ids.index(image_id)])
    assert f"kmeans cluster: cluster {a.loc[image_id, 'kmeans']}" in tip["text"]
    assert f"agglomerative cluster: cluster {a.loc[image_id, 'agglomerative']}" in tip["text"]
    assert f"true label: {true}" in tip["text"]


def test_clicking_a_cluster_lists_exactly_its_members(run_dir, open_map):
    page = open_map(run_dir / "report.html")
    a = pd.read_parquet(run_dir / "assignments.parquet")
    # a point: its k-means cluster
    row, x, y = page.isolated_point()
    image_id = str(pd.read_parquet(run_dir / "map2d.parquet")["image_id"].iloc[row])
    cluster = int(a.set_index("image_id").loc[image_id, "kmeans"])
    page.page.mouse.click(x, y)
    page.page.wait_for_selector("#imap-members li", timeout=10_000)
    got = page.members()
    want = a.loc[a["kmeans"] == cluster, "image_id"].astype(str).tolist()
    assert (got["mode"], got["group"]) == ("cluster:kmeans", str(cluster))
    assert sorted(got["ids"]) == sorted(want) and len(got["ids"]) == len(want)
    assert got["thumbs"] == len(want)  # 1797 images: every one has its thumbnail
    assert got["heading"] == f"kmeans cluster: cluster {cluster} · {len(want)} images"
    # a legend entry, under the other algorithm
    page.set_mode("cluster:agglomerative")
    assert page.members()["ids"] == []  # a new colour mode starts with nothing selected
    names = [t["name"] for t in page.traces()]
    third = int(re.match(r"cluster (\d+) ", names[2]).group(1))
    page.page.click(".legend .traces >> nth=2")
    page.page.wait_for_function("() => document.getElementById('imap-members').dataset.mode === 'cluster:agglomerative'")
    got = page.members()
    want = a.loc[a["agglomerative"] == third, "image_id"].astype(str).tolist()
    assert got["group"] == str(third) and sorted(got["ids"]) == sorted(want) and len(got["ids"]) == len(want)
    # the cluster stays drawn (listed, not hidden); the others are dimmed
    drawn = page.page.evaluate("() => document.getElementById('imap-plot')._fullData.map(t => [t.visible, t.opacity])")
    assert drawn == [[True, 1 if i == 2 else 0.15] for i in range(len(names))]
    assert page.problems == [] and page.network == []


def test_colour_modes_change_marker_colours(run_dir, open_map, tmp_path):
    run = copy_run(run_dir, tmp_path)
    scores = write_outlier_scores(run, drop=7)
    result = build_report(run)
    assert result.missing == []
    page = open_map(result.html)
    options = page.page.eval_on_selector_all("#imap-mode option", "os => os.map(o => [o.value, o.textContent])")
    assert options == [["cluster:kmeans", "kmeans cluster"], ["cluster:agglomerative", "agglomerative cluster"],
                       ["label", "true label"], ["score", "outlier score"]]
    ids = pd.read_parquet(run / "map2d.parquet")["image_id"].astype(str).tolist()
    before = page.point_colours()
    shot_before = page.page.locator("#imap-plot").screenshot()

    page.set_mode("label")
    after = page.point_colours()
    y = np.asarray(load_dataset("digits", "all", None).labels)
    colours = I.group_colours(sorted({int(v) for v in y}))
    assert after == {r: colours[int(y[r])] for r in range(len(ids))}  # each point in its class's colour
    assert sum(before[r] != after[r] for r in after) > len(ids) // 2
    assert page.page.locator("#imap-plot").screenshot() != shot_before

    page.set_mode("score")
    traces = page.traces()
    scored, unscored = traces
    assert len(scored["rows"]) == len(ids) - 7 and unscored["name"] == "no score (7)"
    got = dict(zip(scored["rows"], scored["colors"]))
    assert np.allclose([got[r] for r in sorted(got)], [scores[ids[r]] for r in sorted(got)], rtol=1e-6)
    assert all(c == I.NONE_COLOUR for c in unscored["colors"])
    assert page.problems == [] and page.network == []


def test_embedded_map_is_one_file_with_a_thumbnail_sample(run_dir, open_map, tmp_path):
    run = copy_run(run_dir, tmp_path)
    result = build_report(run, embed_images=True, map_thumbnails=100)
    alone = tmp_path / "alone" / "report.html"  # moved away from its figures: still complete
    alone.parent.mkdir()
    shutil.copy(result.html, alone)
    page = open_map(alone)
    assert page.network == [] and page.problems == []
    assert [u for u in page.requests if u.startswith("file:")] == [alone.as_uri()]
    assert len(page.point_colours()) == 1797
    doc = page.page.evaluate("() => document.getElementById('imap').gpuclustMap.doc")
    sample = D.thumbnail_sample(1797, 100, seed=0)
    assert sorted(int(k) for k in doc["thumbnails"]) == sample.tolist()
    assert doc["thumb_note"] == "thumbnails for a sample of 100 of 1797 images"
    # a point outside the sample says so instead of showing an image
    row, x, y = page.isolated_point()
    page.page.mouse.move(x, y)
    page.page.wait_for_selector("#imap-tip:not([hidden])", timeout=10_000)
    has_img = page.page.evaluate("() => !!document.querySelector('#imap-tip img')")
    assert has_img == (row in set(sample.tolist()))


# ---------------------------------------------------------------- outlier scores: optional, checked


def test_outlier_scores_are_optional_and_checked(run_dir, tmp_path):
    run = copy_run(run_dir, tmp_path)
    assert [m.key for m in D.map_points(load_run(run)).modes][-1] == "score"  # the explore stage's scores
    (run / D.OUTLIERS).unlink()
    inputs = load_run(run)
    assert inputs.outliers is None and inputs.missing == []  # absent: no colour mode, nothing reported
    assert [m.key for m in D.map_points(inputs).modes] == ["cluster:kmeans", "cluster:agglomerative", "label"]

    pd.DataFrame({"image_id": ["digits/0000000"], "score": ["high"]}).to_parquet(run / D.OUTLIERS)
    inputs = load_run(run)
    assert inputs.outliers is None
    assert [str(m) for m in inputs.missing] == [
        (f"outliers.parquet: column score is {pd.read_parquet(run / D.OUTLIERS)['score'].dtype}, not numbers; "
         "the map's colouring by outlier score skipped")]

    pd.DataFrame({"image_id": ["digits/0000000"], "value": [1.0]}).to_parquet(run / D.OUTLIERS)
    assert [str(m) for m in load_run(run).missing] == [
        "outliers.parquet: lacks column(s) score (found: image_id, value); the map's colouring by outlier score skipped"]

    scores = write_outlier_scores(run, drop=3)
    points = D.map_points(load_run(run))
    mode = points.mode("score")
    assert np.isnan(mode.values).sum() == 3
    have = ~np.isnan(mode.values)
    assert np.allclose(mode.values[have], scores.reindex(np.array(points.ids)[have]).to_numpy())
