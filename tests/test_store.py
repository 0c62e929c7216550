import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from gpu_ops.data import load_dataset
from gpu_ops.errors import InputError
from gpu_ops.features import create_extractor
from gpu_ops.features.extract import extract_to_store
from gpu_ops.store import read_embeddings, summarize


def test_round_trip_is_exact_and_carries_the_contract(tmp_path):
    ds = load_dataset("digits")
    summary = extract_to_store(ds, create_extractor("raw"), tmp_path, shard_rows=500, progress=False)
    assert (summary.rows, summary.dim, summary.shards, summary.complete) == (1797, 64, 4, True)
    table = read_embeddings(Path(summary.directory))
    assert np.array_equal(table.embeddings, ds.items.reshape(1797, -1).astype(np.float32) / 255)
    assert table.image_ids == ds.image_ids and np.array_equal(table.labels, ds.labels)
    schema = pq.read_schema(Path(summary.directory) / "part-00000.parquet")
    assert str(schema.field("embedding").type) == "fixed_size_list<element: float>[64]"
    assert str(schema.field("label").type) == "int32" and str(schema.field("image_id").type) == "string"
    meta = {k.decode(): v.decode() for k, v in schema.metadata.items()}
    assert meta["extractor"] == "raw" and meta["weights"] == "none"
    assert meta["dataset_fingerprint"] == ds.fingerprint()
    assert json.loads(meta["preprocessing"])["scale"] == "x/255"


def test_different_extractors_never_share_a_store(tmp_path):
    ds = load_dataset("digits", limit=64)
    a = extract_to_store(ds, create_extractor("raw"), tmp_path, progress=False)
    b = extract_to_store(ds, create_extractor("resnet18", weights="none", image_size=32), tmp_path, progress=False)
    c = extract_to_store(ds, create_extractor("resnet18", weights="none", image_size=32, seed=1), tmp_path, progress=False)
    assert len({a.directory, b.directory, c.directory}) == 3
    assert (a.dim, b.dim) == (64, 512)


def test_rerun_of_a_complete_store_writes_nothing(tmp_path):
    ds = load_dataset("digits")
    first = extract_to_store(ds, create_extractor("raw"), tmp_path, progress=False)
    mtimes = {p: p.stat().st_mtime_ns for p in Path(first.directory).glob("part-*.parquet")}
    again = extract_to_store(ds, create_extractor("raw"), tmp_path, progress=False)
    assert again.rows == 1797
    assert {p: p.stat().st_mtime_ns for p in Path(first.directory).glob("part-*.parquet")} == mtimes


def extract_1000_digits(spec: str, root: Path) -> None:
    ds = load_dataset(spec, "test", limit=1000)
    extract_to_store(ds, create_extractor("resnet18", weights="none", image_size=32), root,
                     batch_size=50, shard_rows=50, progress=False)


_EXTRACT_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[3])
    from test_store import extract_1000_digits
    extract_1000_digits(sys.argv[1], Path(sys.argv[2]))
""")


def test_sigkill_midway_then_rerun_gives_one_row_per_image(data_dir, tmp_path):
    spec = f"idx:{data_dir / 'mnist'}"
    script = tmp_path / "extract.py"
    script.write_text(_EXTRACT_SCRIPT)
    killed_root, clean_root = tmp_path / "killed", tmp_path / "clean"
    proc = subprocess.Popen([sys.executable, str(script), spec, str(killed_root), str(Path(__file__).parent)])
    deadline = time.monotonic() + 120
    shards_at_kill = 0
    while time.monotonic() < deadline and proc.poll() is None:
        manifests = list(killed_root.glob("*/*/manifest.json"))
        if manifests:
            try:
                shards_at_kill = len(json.loads(manifests[0].read_text())["shards"])
            except (json.JSONDecodeError, OSError):
                shards_at_kill = 0
            if shards_at_kill >= 3:
                os.kill(proc.pid, signal.SIGKILL)
                break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the extraction finished before it could be killed"
    store_dir = next(killed_root.glob("*/*"))
    assert not summarize(store_dir).complete and 3 <= shards_at_kill < 20

    extract_1000_digits(spec, killed_root)  # the rerun, and a run never killed
    extract_1000_digits(spec, clean_root)
    resumed = read_embeddings(store_dir)
    clean = read_embeddings(next(clean_root.glob("*/*")))
    assert len(resumed.image_ids) == len(set(resumed.image_ids)) == 1000
    assert resumed.image_ids == clean.image_ids
    np.testing.assert_allclose(resumed.embeddings, clean.embeddings, rtol=1e-5, atol=1e-6)
    assert not list(store_dir.glob(".*tmp*"))


def _bad_folder(root: Path, good_jpeg: Path) -> dict[str, str]:
    (root / "good").mkdir(parents=True)
    for i in range(4):
        (root / "good" / f"{i}.jpg").write_bytes(good_jpeg.read_bytes())
    data = good_jpeg.read_bytes()
    (root / "good" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "good" / "empty.jpg").write_bytes(b"")
    (root / "good" / "notes.png").write_text("this is not an image\n")
    Image.fromarray(np.tile(np.arange(32, dtype=np.uint8) * 8, (32, 1))).save(root / "good" / "gray.png")
    rgba = np.zeros((20, 24, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 128
    Image.fromarray(rgba, "RGBA").save(root / "good" / "rgba.png")
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8), "L").convert("P").save(root / "good" / "palette.png")
    return {"truncated.jpg": "cannot decode", "empty.jpg": "empty file (0 bytes)", "notes.png": "not a recognised image"}


def test_bad_images_are_quarantined_and_odd_ones_converted(cifar_folder, tmp_path):
    expected = _bad_folder(tmp_path / "imgs", next((cifar_folder / "cat").glob("*.jpg")))
    ds = load_dataset(f"folder:{tmp_path / 'imgs'}")
    summary = extract_to_store(ds, create_extractor("resnet18", weights="none", image_size=32), tmp_path / "store", progress=False)
    assert (summary.rows, summary.quarantined) == (7, 3)
    table = read_embeddings(Path(summary.directory))
    assert {"good/gray.png", "good/rgba.png", "good/palette.png"} <= set(table.image_ids)
    rows = (Path(summary.directory) / "quarantine.csv").read_text().splitlines()
    assert rows[0] == "source,reason"
    reasons = {Path(r.split(",", 1)[0]).name: r.split(",", 1)[1] for r in rows[1:]}
    assert set(reasons) == set(expected)
    for name, start in expected.items():
        assert start in reasons[name], (name, reasons[name])


def test_folder_of_only_unreadable_files_is_an_input_error(tmp_path):
    (tmp_path / "imgs").mkdir()
    for name in ("a.jpg", "b.png"):
        (tmp_path / "imgs" / name).write_text("not an image")
    ds = load_dataset(f"folder:{tmp_path / 'imgs'}")
    with pytest.raises(InputError, match=r"no readable image among 2 files"):
        extract_to_store(ds, create_extractor("raw", image_size=16), tmp_path / "store", progress=False)
