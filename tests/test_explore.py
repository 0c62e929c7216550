"""Duplicates, outliers and quality flags of a run, and exporting its clusters to folders.

Real CIFAR-10 JPEGs with planted exact copies, a resized and re-encoded copy, a black, a blurred
and a tiny image; a real ``gpuclust run`` (raw pixels, against the session's Prefect server)
and real ``gpuclust export`` processes.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageFilter

from conftest import run_cli

#: Planted copies: copy -> original (the expected groups), and the kind that must find each.
EXACT = {"airplane/copy-1.jpg": "airplane/0000.jpg", "airplane/copy-2.jpg": "airplane/0000.jpg",
         "cat/copy-1.jpg": "cat/0001.jpg"}
NEAR = {"ship/near-1.jpg": "ship/0002.jpg"}
FLAGGED = {"dark": {"dog/black.jpg"}, "blurry": {"frog/blurred.jpg"}, "tiny": {"horse/tiny.png"}, "bright": set()}
RUN_ARGS = ["--extractor", "raw", "--image-size", "16", "--algorithm", "kmeans", "--k", "3", "--reducer", "pca"]


def _jpeg(image: Image.Image, quality: int = 75) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    return out.getvalue()


def build_planted_folder(data_dir: Path, out: Path) -> Path:
    """60 CIFAR-10 test JPEGs (6 per class) plus the planted images; a 7th image of two classes
    is used only in altered form (blurred, tiny), so it has no original in the folder."""
    unused: dict[str, bytes] = {}
    counts: dict[str, int] = {}
    with tarfile.open(data_dir / "cifar10_jpg" / "cifar10_test_jpg.tar.gz") as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) != 3 or counts.get(parts[1], 0) >= 7:
                continue
            counts[parts[1]] = counts.get(parts[1], 0) + 1
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
            if counts[parts[1]] == 7:
                unused[parts[1]] = data
                continue
            (out / parts[1]).mkdir(parents=True, exist_ok=True)
            (out / parts[1] / parts[2]).write_bytes(data)
    for copy, original in EXACT.items():
        (out / copy).write_bytes((out / original).read_bytes())
    ship = Image.open(out / NEAR["ship/near-1.jpg"]).convert("RGB")
    (out / "ship/near-1.jpg").write_bytes(_jpeg(ship.resize((26, 26), Image.BICUBIC), quality=50))
    (out / "dog/black.jpg").write_bytes(_jpeg(Image.new("RGB", (32, 32))))
    frog = Image.open(io.BytesIO(unused["frog"])).convert("RGB")
    (out / "frog/blurred.jpg").write_bytes(_jpeg(frog.filter(ImageFilter.GaussianBlur(2)), quality=95))
    Image.open(io.BytesIO(unused["horse"])).convert("RGB").resize((12, 12), Image.LANCZOS).save(out / "horse/tiny.png")
    return out


@pytest.fixture(scope="module")
def explored_run(prefect_server, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the planted folder, a finished run of it with the explore stage)."""
    root = tmp_path_factory.mktemp("explore")
    folder = build_planted_folder(data_dir, root / "images")
    out = root / "run"
    result = run_cli(["run", "--dataset", f"folder:{folder}", *RUN_ARGS, "--out", str(out)],
                     api_url=prefect_server["url"])
    assert result.returncode == 0, result.stderr[-3000:]
    return folder, out


def _groups(pairs: pd.DataFrame) -> set[frozenset[str]]:
    members: dict[int, set[str]] = {}
    for g, a, b in zip(pairs["group"], pairs["image_id_a"], pairs["image_id_b"]):
        members.setdefault(int(g), set()).update((a, b))
    return {frozenset(m) for m in members.values()}


def test_duplicates_group_the_planted_copies(explored_run):
    _, run = explored_run
    pairs = pd.read_parquet(run / "duplicates.parquet")
    expected = {frozenset({"airplane/0000.jpg", "airplane/copy-1.jpg", "airplane/copy-2.jpg"}),
                frozenset({"cat/0001.jpg", "cat/copy-1.jpg"}), frozenset({"ship/0002.jpg", "ship/near-1.jpg"})}
    assert _groups(pairs) == expected
    kinds = {(a, b): k for a, b, k in zip(pairs["image_id_a"], pairs["image_id_b"], pairs["kind"])}
    assert kinds == {("airplane/0000.jpg", "airplane/copy-1.jpg"): "exact",
                     ("airplane/0000.jpg", "airplane/copy-2.jpg"): "exact",
                     ("airplane/copy-1.jpg", "airplane/copy-2.jpg"): "exact",
                     ("cat/0001.jpg", "cat/copy-1.jpg"): "exact",
                     ("ship/0002.jpg", "ship/near-1.jpg"): "phash"}
    reps = dict(zip(pairs["image_id_b"], pairs["representative"]))
    assert reps["ship/near-1.jpg"] == "ship/0002.jpg"  # the larger image (32 px, not 26)
    assert reps["airplane/copy-2.jpg"] == "airplane/0000.jpg"  # same size: the first
    assert (pairs.loc[pairs["kind"] == "exact", "similarity"] == 1.0).all()
    near = pairs[pairs["kind"] == "phash"].iloc[0]
    assert 0 <= near["phash_bits"] <= 8 and near["similarity"] == pytest.approx(1 - near["phash_bits"] / 64)

    explore = json.loads((run / "metrics.json").read_text())["explore"]
    assert explore["ran"] is True and explore["images"] is True
    assert explore["pairs"] == {"exact": 4, "phash": 1, "embedding": 0}
    assert (explore["groups"], explore["images_in_groups"], explore["redundant"]) == (3, 7, 4)
    assert explore["thresholds"]["phash_max_bits"] == 8 and explore["algorithm"] == "kmeans"
    assert "explore" in json.loads((run / "metrics.json").read_text())["timings_s"]


def test_quality_flags_mark_the_planted_images_and_nothing_else(explored_run):
    folder, run = explored_run
    scores = pd.read_parquet(run / "outliers.parquet")
    n = sum(1 for p in folder.rglob("*") if p.is_file())
    assert len(scores) == n == 67 and sorted(scores["rank"]) == list(range(1, n + 1))
    for flag, expected in FLAGGED.items():
        assert set(scores.loc[scores[flag], "image_id"]) == expected, flag
    tiny = scores.set_index("image_id").loc["horse/tiny.png"]
    assert (tiny["width"], tiny["height"]) == (12, 12)
    assert json.loads((run / "metrics.json").read_text())["explore"]["flagged"] == {
        "dark": 1, "bright": 0, "blurry": 1, "tiny": 1}
    # The black image is unlike every photograph: among the most unusual by its embedding alone.
    assert scores.set_index("image_id").loc["dog/black.jpg", "rank"] <= 5


def test_report_shows_duplicate_pairs_and_the_most_unusual_images(explored_run):
    _, run = explored_run
    html = (run / "report.html").read_text()
    assert '<section id="duplicates"><h2>Duplicates</h2>' in html
    assert "ship/0002.jpg ↔ ship/near-1.jpg · phash · similarity" in html
    assert "airplane/0000.jpg ↔ airplane/copy-1.jpg · exact · similarity 1.000" in html
    assert '<section id="outliers"><h2>Most unusual images</h2>' in html
    assert 'src="figures/outliers.png"' in html and 'src="figures/flag-dark.png"' in html
    shown = re.findall(r'src="figures/(duplicates-\d{3}\.png)"', html)
    assert len(shown) == 5 and all((run / "figures" / name).is_file() for name in shown)


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_export_links_copies_and_a_rerun_changes_nothing(explored_run, tmp_path):
    folder, run = explored_run
    assignments = pd.read_parquet(run / "assignments.parquet")
    to = tmp_path / "export"
    first = run_cli(["export", str(run), "--to", str(to)])
    assert first.returncode == 0, first.stderr
    rows = _csv_rows(to / "clusters.csv")
    assert len(rows) == len(assignments) == 67
    by_id = dict(zip(assignments["image_id"], assignments["kmeans"]))
    sizes = assignments["kmeans"].value_counts().to_dict()
    for row in rows:
        link = to / row["path"]
        assert link.is_symlink() and link.resolve() == (folder / row["image_id"]).resolve()
        assert int(row["cluster"]) == by_id[row["image_id"]]
        assert link.parent.name == f"cluster-{int(row['cluster']):02d}_n{sizes[int(row['cluster'])]}"
    folders = sorted(p.name for p in to.iterdir() if p.is_dir())
    assert folders == sorted(f"cluster-{c:02d}_n{n}" for c, n in sizes.items())
    links = {p.relative_to(to): os.readlink(p) for p in to.rglob("*") if p.is_symlink()}
    csv_bytes = (to / "clusters.csv").read_bytes()
    mtime = (to / "clusters.csv").stat().st_mtime_ns

    again = run_cli(["export", str(run), "--to", str(to)])
    assert again.returncode == 0, again.stderr
    assert "0 written, 67 unchanged, 0 removed" in again.stdout
    assert (to / "clusters.csv").read_bytes() == csv_bytes and (to / "clusters.csv").stat().st_mtime_ns == mtime
    assert {p.relative_to(to): os.readlink(p) for p in to.rglob("*") if p.is_symlink()} == links

    copied = tmp_path / "copied"
    result = run_cli(["export", str(run), "--to", str(copied), "--copy"])
    assert result.returncode == 0, result.stderr
    for row in _csv_rows(copied / "clusters.csv"):
        target = copied / row["path"]
        assert not target.is_symlink() and target.read_bytes() == (folder / row["image_id"]).read_bytes()
    assert (copied / "clusters.csv").read_bytes() == csv_bytes  # the same list, whichever way the files came


def test_export_refusals_are_one_line_and_touch_nothing(explored_run, tmp_path):
    folder, run = explored_run
    rule = "--to must name a new path, an empty folder or an earlier export of this run"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    cases = [
        (["export", str(run), "--to", str(mine)],
         f"{mine}: is a folder that is not an earlier export (not empty, no .gpuclust-export file); {rule}"),
        (["export", str(tmp_path / "nope"), "--to", str(tmp_path / "e1")], f"{tmp_path / 'nope'}: run directory does not exist"),
        (["export", str(mine), "--to", str(tmp_path / "e2")],
         f"{mine}: not a finished gpuclust run (it needs .gpuclust-run, assignments.parquet and config.yaml); "
         "name a run directory that gpuclust run wrote"),
        (["export", str(run), "--to", str(tmp_path / "e3"), "--algorithm", "gmm"],
         "unknown algorithm 'gmm'; expected one of: kmeans"),
        (["export", str(run), "--to", str(folder / "clusters")], f"{folder / 'clusters'}: overlaps the dataset "
                                                                  f"folder:{folder}; {rule}"),
    ]
    for args, message in cases:
        result = run_cli(args)
        assert (result.returncode, result.stderr) == (2, f"gpuclust: error: {message}\n"), args
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep me"
    assert not any((tmp_path / name).exists() for name in ("e1", "e2", "e3")) and not (folder / "clusters").exists()

    # An export folder belongs to its run: another run's export is refused, not overwritten.
    other = tmp_path / "other-export"
    other.mkdir()
    (other / ".gpuclust-export").write_text(json.dumps({"run": "/somewhere/else", "files": []}))
    (other / "clusters.csv").write_text("theirs")
    result = run_cli(["export", str(run), "--to", str(other)])
    assert (result.returncode, result.stderr) == (
        2, f"gpuclust: error: {other}: is an export of another run (/somewhere/else); {rule}\n")
    assert (other / "clusters.csv").read_text() == "theirs"


def test_pixel_arrays_are_hashed_by_content():
    """Array datasets: exact duplicates by the pixel array; the same pixels at another position match."""
    from sklearn.datasets import load_digits

    from gpu_ops.data.base import ArrayDataset
    from gpu_ops.explore.duplicates import embedding_neighbours, find_duplicates
    from gpu_ops.explore.scan import scan_items

    images = (load_digits().images[:40] * 15).astype(np.uint8)
    items = np.concatenate([images, images[[3, 3, 17]]])
    ids = [f"digits/{i:07d}" for i in range(len(items))]
    dataset = ArrayDataset("digits", items, None, ids, "x")
    scan = scan_items(dataset, ids)
    X = items.reshape(len(items), -1).astype(np.float32)
    found = find_duplicates(ids, scan, X, embedding_neighbours(X, 10, "cpu"), backend="cpu")
    pairs = found.table.to_pandas()
    exact = pairs[pairs["kind"] == "exact"]
    assert _groups(exact) == {frozenset({ids[3], ids[40], ids[41]}), frozenset({ids[17], ids[42]})}
    assert found.pairs_by_kind["exact"] == 4 and scan.width is not None and set(scan.width) == {8}


def test_array_dataset_without_explore_exports_png_files(prefect_server, tmp_path):
    """``--no-explore`` skips the stage (recorded in metrics.json); an array dataset exports PNGs."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images[:60] * 15).astype(np.uint8)
    np.savez(tmp_path / "d.npz", X=images, y=digits.target[:60])
    run = tmp_path / "run"
    result = run_cli(["run", "--dataset", f"npz:{tmp_path / 'd.npz'}", "--extractor", "raw", "--algorithm", "kmeans",
                      "--k", "4", "--reducer", "pca", "--no-explore", "--out", str(run)], api_url=prefect_server["url"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((run / "metrics.json").read_text())["explore"] == {"ran": False}
    assert not (run / "duplicates.parquet").exists() and not (run / "outliers.parquet").exists()
    assert 'id="duplicates"' not in (run / "report.html").read_text()

    to = tmp_path / "export"
    result = run_cli(["export", str(run), "--to", str(to)])
    assert result.returncode == 0, result.stderr
    rows = _csv_rows(to / "clusters.csv")
    assert len(rows) == 60 and all(r["source"] == "" for r in rows)
    for row in rows:
        index = int(row["image_id"].rsplit("/", 1)[1])
        assert row["path"].endswith(".png")
        assert np.array_equal(np.asarray(Image.open(to / row["path"])), images[index])
    again = run_cli(["export", str(run), "--to", str(to)])
    assert again.returncode == 0 and "0 written, 60 unchanged" in again.stdout


def test_a_changed_run_updates_its_export_and_keeps_the_users_files(explored_run, tmp_path):
    """Reclustered: stale links and emptied folders go, new ones come, a file the user put in the export stays."""
    import shutil

    _, run = explored_run
    moved = tmp_path / "run"
    shutil.copytree(run, moved)
    to = tmp_path / "export"
    assert run_cli(["export", str(moved), "--to", str(to)]).returncode == 0
    old_folders = sorted(p.name for p in to.iterdir() if p.is_dir())
    (to / old_folders[0] / "my-notes.txt").write_text("mine")
    assignments = pd.read_parquet(moved / "assignments.parquet")
    assignments["kmeans"] = (np.arange(len(assignments)) % 2).astype(np.int32)  # two clusters now: 34 and 33
    assignments.to_parquet(moved / "assignments.parquet")
    result = run_cli(["export", str(moved), "--to", str(to)])
    assert result.returncode == 0, result.stderr
    assert "67 written" in result.stdout and "67 removed" in result.stdout
    assert sorted(p.name for p in to.iterdir() if p.is_dir()) == sorted(["cluster-00_n34", "cluster-01_n33",
                                                                        old_folders[0]])
    assert [p.name for p in (to / old_folders[0]).iterdir()] == ["my-notes.txt"]
    assert (to / old_folders[0] / "my-notes.txt").read_text() == "mine"
    rows = _csv_rows(to / "clusters.csv")
    assert len(rows) == 67 and {r["cluster"] for r in rows} == {"0", "1"}
    assert all((to / r["path"]).is_symlink() for r in rows)


def test_parquet_rows_are_hashed_by_content_with_many_threads(tmp_path):
    """``parquet:DIR`` rows are read as one forward stream: hashing them with a thread pool asked for
    gives each row its own content hash, in order, and equal rows equal hashes."""
    import hashlib

    from gpu_ops.data import load_dataset
    from gpu_ops.explore.scan import scan_items
    from gpu_ops.store import EmbeddingStore

    X = np.random.default_rng(0).standard_normal((3000, 16)).astype(np.float32)
    X[2999] = X[5]
    store = EmbeddingStore(tmp_path / "store", {"extractor": "vectors", "store_key": "v"}, len(X), 700)
    for shard in store.pending_shards():
        rows = store.shard_range(shard)
        store.write_shard(shard, [f"r{i}" for i in rows], [""] * len(rows), None, X[rows], [])
    store.finish()
    dataset = load_dataset(f"parquet:{tmp_path / 'store'}", "all")
    digests = [hashlib.sha256(f"{row.dtype}{row.shape}".encode() + row.tobytes()).digest() for row in X]
    shuffled = np.random.default_rng(1).permutation(len(X))
    for order in (np.arange(len(X)), shuffled):  # in row order (streamed) and in any other order
        scan = scan_items(dataset, [f"r{i}" for i in order], threads=8)
        assert np.array_equal(scan.content, np.array([digests[i] for i in order], dtype=scan.content.dtype))
    assert scan.content[list(shuffled).index(2999)] == scan.content[list(shuffled).index(5)]


def test_scanned_hashes_are_imagehash_phashes_of_each_image_and_view(cifar_folder, data_dir, tmp_path):
    """The scan's vectorised hashes are bit for bit ``imagehash.phash`` of each image and of each of
    its views: 200 CIFAR-10 JPEGs, 300 MNIST digits and two 1600 x 1200 photos (shrunk once first)."""
    import imagehash

    from gpu_ops.data import load_dataset
    from gpu_ops.explore.scan import MEASURE_MAX_SIDE, VIEWS, scan_items, scan_threads, view

    big = tmp_path / "photos"
    big.mkdir()
    for i, path in enumerate(sorted(cifar_folder.rglob("*.jpg"))[:2]):
        Image.open(path).resize((1600, 1200), Image.BICUBIC).save(big / f"{i}.jpg", quality=95)
    checked = 0
    for spec, split, limit in ((f"folder:{cifar_folder}", "all", None), (f"idx:{data_dir / 'mnist'}", "test", 300),
                               (f"folder:{big}", "all", None)):
        dataset = load_dataset(spec, split, limit)
        scan = scan_items(dataset, dataset.image_ids)
        for i in range(len(dataset)):
            image = Image.fromarray(np.asarray(dataset.load(i), np.uint8)).convert("RGB")
            image.thumbnail((MEASURE_MAX_SIDE, MEASURE_MAX_SIDE), Image.BILINEAR)
            expected = [imagehash.phash(image)] + [imagehash.phash(view(image, name, cut)) for name, cut in VIEWS]
            got = [scan.phash[i]] + [scan.phash_views[i, v] for v in range(len(VIEWS))]
            assert [h.hash.reshape(-1).astype(np.uint8).tolist() for h in expected] == [g.tolist() for g in got], spec
            checked += 1
    assert checked == 502
    # small files and in-memory items: one thread (the per-item work holds the GIL); photos: several
    assert scan_threads(load_dataset(f"folder:{cifar_folder}", "all")) == 1
    assert scan_threads(load_dataset("digits", "all")) == 1
    assert scan_threads(load_dataset(f"folder:{big}", "all")) == min(8, os.cpu_count() or 1)


def test_perceptual_hashes_that_match_by_chance_are_not_used(cifar_folder, data_dir):
    """MNIST digits' perceptual hashes match by chance (the median of 2,000 digits is within 8 bits of
    2 others): no pair is called a phash duplicate and the run says why; CIFAR-10 photos' do not."""
    from gpu_ops.data import load_dataset
    from gpu_ops.explore.duplicates import PHASH_CHANCE_MATCHES, embedding_neighbours, find_duplicates, phash_chance_matches
    from gpu_ops.explore.scan import scan_items

    digits = load_dataset(f"idx:{data_dir / 'mnist'}", "test", 2000)
    scan = scan_items(digits, digits.image_ids)
    assert phash_chance_matches(scan, 8) >= PHASH_CHANCE_MATCHES
    X = digits.items.reshape(len(digits), -1).astype(np.float32)
    found = find_duplicates(digits.image_ids, scan, X, embedding_neighbours(X, 10, "cpu"), backend="cpu")
    assert found.pairs_by_kind["phash"] == 0
    assert found.phash_off is not None and found.phash_off.startswith(
        "perceptual hashes not used: the median image's hash is within 8 bits of ")

    photos = load_dataset(f"folder:{cifar_folder}", "all")
    scan = scan_items(photos, photos.image_ids)
    assert phash_chance_matches(scan, 8) == 0
    X = np.stack([np.asarray(photos.load(i), np.float32).reshape(-1) for i in range(len(photos))])
    assert find_duplicates(photos.image_ids, scan, X, embedding_neighbours(X, 10, "cpu"), backend="cpu").phash_off is None
