"""An image folder's store is refreshed in place: a rerun embeds exactly the new and changed images
(counted from the store's own records), retires removed ones, leaves untouched parts byte for byte
as they were, survives a SIGKILL in the middle, and overlapping runs on one store take turns (one
waits, saying for whom; with --no-wait it fails in one line). Real CIFAR-10 JPEGs, real Parquet,
real processes."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gpu_ops.data import load_dataset
from gpu_ops.features import create_extractor
from gpu_ops.features.extract import extract_to_store, store_directory
from gpu_ops.store import read_embeddings
from gpu_ops.store_lock import StoreLock

from conftest import REPO, run_cli

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@functools.lru_cache(maxsize=1)
def _cifar(tar_path: str) -> dict[str, list[bytes]]:
    """The first 120 test JPEGs of every CIFAR-10 class, as bytes."""
    out: dict[str, list[bytes]] = {c: [] for c in CLASSES}
    with tarfile.open(tar_path) as tar:
        for member in tar:
            parts = Path(member.name).parts
            if member.isfile() and len(parts) == 3 and len(out[parts[1]]) < 120:
                out[parts[1]].append(tar.extractfile(member).read())  # type: ignore[union-attr]
    return out


@pytest.fixture(scope="module")
def jpegs(data_dir: Path) -> dict[str, list[bytes]]:
    return _cifar(str(data_dir / "cifar10_jpg" / "cifar10_test_jpg.tar.gz"))


def _folder(root: Path, jpegs: dict[str, list[bytes]], per_class: int) -> Path:
    """``root/<class>/<i>.jpg``: the first ``per_class`` JPEGs of every class."""
    for c in CLASSES:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            (root / c / f"{i:03d}.jpg").write_bytes(jpegs[c][i])
    return root


def _change(root: Path, jpegs: dict[str, list[bytes]], add_per_class: int, start: int) -> dict[str, list[str]]:
    """Add ``add_per_class`` new images to every class, remove 3 cats, give 2 ships new content and
    touch a dog (new mtime, same bytes). Returns the image ids of each kind of change."""
    added = []
    for c in CLASSES:
        for i in range(start, start + add_per_class):
            (root / c / f"new-{i:03d}.jpg").write_bytes(jpegs[c][i])
            added.append(f"{c}/new-{i:03d}.jpg")
    removed = ["cat/000.jpg", "cat/004.jpg", "cat/007.jpg"]
    for image_id in removed:
        (root / image_id).unlink()
    rewritten = ["ship/002.jpg", "ship/005.jpg"]
    for k, image_id in enumerate(rewritten):
        (root / image_id).write_bytes(jpegs["truck"][110 + k])
    touched = ["dog/003.jpg"]
    os.utime(root / touched[0], ns=(time.time_ns(), time.time_ns() + 5_000_000_000))
    return {"added": added, "removed": removed, "rewritten": rewritten, "touched": touched}


def _extract(folder: Path, cache: Path, **kw):
    ds = load_dataset(f"folder:{folder}")
    ex = create_extractor("resnet18", weights="none", image_size=kw.pop("image_size", 32))
    return extract_to_store(ds, ex, cache, progress=False, num_workers=0, **kw)


def _rows(store: Path) -> dict[str, dict]:
    """Every row of the store, by image_id (duplicates fail)."""
    table = pa.concat_tables([pq.read_table(store / f) for f in _manifest(store)["files"]])
    rows = table.to_pylist()
    ids = [r["image_id"] for r in rows]
    assert len(ids) == len(set(ids)), "duplicate rows"
    return {r["image_id"]: r for r in rows}


def _manifest(store: Path) -> dict:
    m = json.loads((store / "manifest.json").read_text())
    m["files"] = [m["shards"][s]["file"] for s in sorted(m["shards"]) if m["shards"][s]["file"]]
    return m


def _current_ids(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.jpg"))


def test_a_refresh_embeds_exactly_the_new_and_changed_images_and_keeps_the_rest(jpegs, tmp_path):
    folder = _folder(tmp_path / "photos", jpegs, 12)
    first = _extract(folder, tmp_path / "cache", shard_rows=12)  # one part per class
    store = Path(first.directory)
    before = _rows(store)
    run1 = _manifest(store)["runs"][-1]["run_id"]
    part_bytes = {f: (store / f).read_bytes() for f in _manifest(store)["files"]}
    assert len(before) == 120 and len(part_bytes) == 10
    meta = read_embeddings(store).metadata  # keyed by the folder and what decides an embedding, not the files
    assert meta["precision"] == "fp32" and meta["collection"] and "dataset_fingerprint" not in meta
    assert store.parent.name == f"folder-photos-{load_dataset(f'folder:{folder}').collection_id()}"

    change = _change(folder, jpegs, 1, 12)
    second = _extract(folder, tmp_path / "cache", shard_rows=12)
    assert Path(second.directory) == store  # the same store, refreshed in place
    after = _rows(store)
    manifest = _manifest(store)

    # the store reads as exactly the current images
    assert sorted(after) == _current_ids(folder) == sorted(read_embeddings(store).image_ids)
    assert len(after) == 120 + 10 - 3
    # exactly the new and the rewritten images were embedded, by the store's own record
    run2 = manifest["runs"][-1]
    embedded = sorted(i for i, r in after.items() if r["run_id"] == run2["run_id"])
    assert embedded == sorted(change["added"] + change["rewritten"]) and second.items == 12
    assert {k: run2[k] for k in ("new", "changed", "removed", "touched", "unchanged", "embedded")} == \
        {"new": 10, "changed": 2, "removed": 3, "touched": 1, "unchanged": 115, "embedded": 12}
    assert run2["finished"] and manifest["revision"] == run2["run_id"] != run1
    # unchanged rows are byte-identical, wherever they now live
    for image_id, row in after.items():
        if image_id not in embedded:
            assert row == before[image_id], image_id
    for image_id in change["rewritten"]:
        assert after[image_id]["blake2b"] == hashlib.blake2b((folder / image_id).read_bytes(), digest_size=16).hexdigest()
        assert after[image_id]["embedding"] != before[image_id]["embedding"]
    # parts holding no removed or changed image are untouched files; the cat and ship parts were rewritten
    kept = {f for f in manifest["files"] if f in part_bytes}
    assert len(kept) == 8 and all((store / f).read_bytes() == part_bytes[f] for f in kept)
    rewritten_parts = {f for f in part_bytes if f not in kept}
    classes = {f: {i.split("/")[0] for i in pq.read_table(pa.BufferReader(part_bytes[f])).column("image_id").to_pylist()}
               for f in rewritten_parts}
    assert sorted(map(sorted, classes.values())) == [["cat"], ["ship"]]
    assert not any((store / f).exists() for f in rewritten_parts)
    # the refreshed store holds what a fresh extraction of the folder holds
    fresh = read_embeddings(Path(_extract(folder, tmp_path / "fresh-cache", shard_rows=12).directory))
    ids = sorted(fresh.image_ids)
    assert ids == sorted(after)
    order = {i: n for n, i in enumerate(fresh.image_ids)}
    refreshed = np.array([after[i]["embedding"] for i in ids], np.float32)
    np.testing.assert_allclose(refreshed, fresh.embeddings[[order[i] for i in ids]], rtol=1e-4, atol=1e-5)

    # a third run over the unchanged folder changes nothing and writes nothing
    stamp = {p.name: p.stat().st_mtime_ns for p in store.iterdir()}
    third = _extract(folder, tmp_path / "cache", shard_rows=12)
    assert third.items == 0 and {p.name: p.stat().st_mtime_ns for p in store.iterdir()} == stamp


def test_a_new_class_folder_relabels_the_stored_rows_without_re_embedding_them(jpegs, tmp_path):
    folder = _folder(tmp_path / "photos", jpegs, 3)
    store = Path(_extract(folder, tmp_path / "cache", shard_rows=10).directory)
    before = _rows(store)
    assert before["airplane/000.jpg"]["label"] == 0 and before["truck/002.jpg"]["label"] == 9
    (folder / "aardvark").mkdir()  # sorts first: every class id moves up by one
    (folder / "aardvark" / "0.jpg").write_bytes(jpegs["deer"][100])
    summary = _extract(folder, tmp_path / "cache", shard_rows=10)
    after = _rows(store)
    assert summary.items == 1 and len(after) == 31
    assert after["aardvark/0.jpg"]["label"] == 0 and after["truck/002.jpg"]["label"] == 10
    for image_id, row in before.items():
        assert after[image_id] == {**row, "label": row["label"] + 1}, image_id
    assert read_embeddings(store).labels.tolist() == [after[i]["label"] for i in read_embeddings(store).image_ids]
    # a file beside the class folders: no labels any more, and the stored ones become null
    (folder / "loose.jpg").write_bytes(jpegs["deer"][101])
    _extract(folder, tmp_path / "cache", shard_rows=10)
    assert {r["label"] for r in _rows(store).values()} == {None} and read_embeddings(store).labels is None


_REFRESH_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    from gpu_ops.data import load_dataset
    from gpu_ops.features import create_extractor
    from gpu_ops.features.extract import extract_to_store
    extract_to_store(load_dataset("folder:" + sys.argv[1]), create_extractor("resnet18", weights="none", image_size=96),
                     Path(sys.argv[2]), shard_rows=5, batch_size=5, num_workers=0, progress=False)
""")


def test_sigkill_during_a_refresh_then_rerun_gives_the_same_store(jpegs, tmp_path):
    folder = _folder(tmp_path / "photos", jpegs, 12)
    script = tmp_path / "refresh.py"
    script.write_text(_REFRESH_SCRIPT)
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    refresh = functools.partial(_extract, image_size=96, shard_rows=5, batch_size=5)  # what the script runs
    refresh(folder, cache)
    store = next(cache.glob("*/*"))
    before = _rows(store)
    run1 = _manifest(store)["runs"][-1]["run_id"]
    change = _change(folder, jpegs, 10, 12)  # 100 new + 2 rewritten: 21 parts of 5

    proc = subprocess.Popen([sys.executable, str(script), str(folder), str(cache)], env=env)
    embedded_at_kill = 0
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            runs = json.loads((store / "manifest.json").read_text())["runs"]
        except (json.JSONDecodeError, OSError, KeyError):
            runs = []
        if len(runs) == 2 and runs[-1]["embedded"] >= 15:
            os.kill(proc.pid, signal.SIGKILL)
            embedded_at_kill = runs[-1]["embedded"]
            break
        time.sleep(0.005)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the refresh finished before it could be killed"
    assert 15 <= embedded_at_kill < 102
    killed = _manifest(store)
    assert not killed["complete"] and killed["runs"][-1]["finished"] is None

    refresh(folder, cache)  # the rerun
    after = _rows(store)
    manifest = _manifest(store)
    assert sorted(after) == _current_ids(folder) and len(after) == 120 + 100 - 3
    # the killed run and the rerun together embedded each new or changed image exactly once
    later = sorted(i for i, r in after.items() if r["run_id"] != run1)
    assert later == sorted(change["added"] + change["rewritten"])
    assert [r["embedded"] for r in manifest["runs"][1:]] == [embedded_at_kill, 102 - embedded_at_kill]
    assert manifest["complete"] and all(r["finished"] for r in manifest["runs"][::2])
    for image_id, row in after.items():
        if row["run_id"] == run1:
            assert row == before[image_id], image_id
    assert not list(store.glob(".*tmp*")) and sorted(p.name for p in store.glob("part-*")) == sorted(manifest["files"])
    # ... and the same as a run that was never killed
    clean = tmp_path / "clean"
    refresh(folder, clean)
    fresh = read_embeddings(next(clean.glob("*/*")))
    order = {i: n for n, i in enumerate(fresh.image_ids)}
    ids = sorted(after)
    assert sorted(fresh.image_ids) == ids
    np.testing.assert_allclose(np.array([after[i]["embedding"] for i in ids], np.float32),
                               fresh.embeddings[[order[i] for i in ids]], rtol=1e-4, atol=1e-5)


_HOLDER_SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from gpu_ops.store_lock import StoreLock
    with StoreLock(Path(sys.argv[1]), "holder-run"):
        print("holding", flush=True)
        time.sleep(float(sys.argv[2]))
""")


def _holder(store: Path, seconds: float, tmp_path: Path) -> subprocess.Popen:
    script = tmp_path / "hold.py"
    script.write_text(_HOLDER_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(store), str(seconds)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout is not None and proc.stdout.readline().strip() == "holding"
    return proc


def _store_of(folder: Path, cache: Path) -> Path:
    return store_directory(cache, load_dataset(f"folder:{folder}"),
                           create_extractor("resnet18", weights="none", image_size=32))


def test_a_second_writer_waits_for_the_holder_and_says_for_whom(jpegs, tmp_path, caplog):
    folder = _folder(tmp_path / "photos", jpegs, 3)
    store = _store_of(folder, tmp_path / "cache")
    holder = _holder(store, 4.0, tmp_path)
    t0 = time.monotonic()
    with caplog.at_level(logging.INFO, logger="gpu_ops"):
        summary = _extract(folder, tmp_path / "cache")
    waited = time.monotonic() - t0
    holder.wait()
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    since = json.loads((store / ".writer.json").read_text())["since"] if (store / ".writer.json").exists() else None
    assert since is None  # the writer's record goes with its lock
    assert lines[0].startswith(f"store {store} is being written by run holder-run (pid {holder.pid} on "
                               f"{socket.gethostname()}, since ")
    assert lines[0].endswith("): waiting for it to finish") and "waited" in lines[1]
    assert waited > 2.0 and summary.rows == 30 and summary.items == 30


def test_a_refresh_waits_for_a_run_reading_the_store_and_a_noop_refresh_does_not(jpegs, tmp_path, caplog):
    """A run reading the store holds it (StoreReaders): a refresh that would retire and add rows
    waits, saying why, and the reader sees the same rows throughout; a rerun with nothing to
    change reads past the reader without waiting."""
    import threading

    from gpu_ops.store_lock import StoreReaders

    folder = _folder(tmp_path / "photos", jpegs, 3)
    store = Path(_extract(folder, tmp_path / "cache").directory)
    before = _rows(store)
    (folder / "cat" / "000.jpg").unlink()
    (folder / "dog" / "new.jpg").write_bytes(jpegs["dog"][50])
    done: list = []
    with caplog.at_level(logging.INFO, logger="gpu_ops"), StoreReaders(store):
        refresh = threading.Thread(target=lambda: done.append(_extract(folder, tmp_path / "cache")))
        refresh.start()
        refresh.join(timeout=3.0)
        assert refresh.is_alive() and not done  # waiting for the reader
        assert _rows(store).keys() == before.keys()  # every part the reader was given is still there
        assert all((store / f).is_file() for f in _manifest(store)["files"])
    refresh.join(timeout=60)
    assert done and done[0].items == 1
    rows = _rows(store)
    assert "cat/000.jpg" not in rows and "dog/new.jpg" in rows and len(rows) == 30
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert f"store {store} is being read by another run: waiting for it to finish before changing the store" in lines
    with StoreReaders(store):  # nothing left to change: the rerun does not wait for the reader
        again = threading.Thread(target=lambda: done.append(_extract(folder, tmp_path / "cache")))
        again.start()
        again.join(timeout=60)
        assert not again.is_alive() and done[1].items == 0


def test_a_lock_left_by_a_killed_writer_is_taken_over_and_reported(jpegs, tmp_path, caplog):
    folder = _folder(tmp_path / "photos", jpegs, 3)
    store = _store_of(folder, tmp_path / "cache")
    holder = _holder(store, 600.0, tmp_path)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert json.loads((store / ".writer.json").read_text())["pid"] == holder.pid  # its record stayed behind
    t0 = time.monotonic()
    with caplog.at_level(logging.INFO, logger="gpu_ops"):
        summary = _extract(folder, tmp_path / "cache")
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1 and lines[0].startswith(f"store {store}: stale lock record: run holder-run (pid {holder.pid} "
                                                   f"on {socket.gethostname()}, since ")
    assert "is no longer running and ended without releasing the store (killed?)" in lines[0]
    assert time.monotonic() - t0 < 60 and summary.rows == 30 and not (store / ".writer.json").exists()


_RUN = ["--extractor", "resnet18", "--weights", "none", "--algorithm", "kmeans", "--k", "3", "--reducer", "none",
        "--no-explore"]


def test_no_wait_fails_in_one_line_naming_the_writer(jpegs, tmp_path):
    folder = _folder(tmp_path / "photos", jpegs, 2)
    store = _store_of(folder, tmp_path / "cache" / "stores")
    with StoreLock(store, "the-other-run"):
        result = run_cli(["run", "--dataset", f"folder:{folder}", *_RUN, "--image-size", "32", "--no-wait",
                          "--out", str(tmp_path / "run")], env={"GPUCLUST_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith(f"gpuclust: error: store {store} is being written by run the-other-run (pid {os.getpid()} "
                               f"on {socket.gethostname()}, since ")
    assert lines[0].endswith("); run without --no-wait to wait for it")
    assert not (tmp_path / "run").exists() and not (store / "manifest.json").exists()


def test_a_writer_that_has_just_taken_the_lock_is_named_by_the_run_that_finds_it(tmp_path):
    """A writer records itself a moment after it takes the OS lock: a run that arrives in between
    names it (not "another process"), and one whose holder lets go meanwhile takes the store."""
    import threading

    from filelock import FileLock

    from gpu_ops.errors import InputError
    from gpu_ops.fsutil import atomic_write_json
    from gpu_ops.store_lock import HOLDER_FILE, LOCK_FILE

    store = tmp_path / "store"
    store.mkdir()
    just_taken = FileLock(str(store / LOCK_FILE), thread_local=False)
    just_taken.acquire()
    record = {"pid": os.getpid(), "host": socket.gethostname(), "run": "just-started", "since": "2026-12-01T00:00:00+00:00"}
    naming = threading.Timer(0.5, atomic_write_json, (store / HOLDER_FILE, record))
    naming.start()
    with pytest.raises(InputError, match=r"is being written by run just-started \(pid "):
        with StoreLock(store, "second", wait=False):
            pass
    naming.join()
    (store / HOLDER_FILE).unlink()
    threading.Timer(0.5, just_taken.release).start()
    with StoreLock(store, "third", wait=False) as lock:  # released before it named itself: no error
        assert json.loads((store / HOLDER_FILE).read_text())["run"] == "third" and lock.waited_s == 0.0


def test_two_runs_started_together_embed_each_image_once_and_one_waits(prefect_server, jpegs, tmp_path):
    folder = _folder(tmp_path / "photos", jpegs, 30)
    env = {**os.environ, "GPUCLUST_CACHE": str(tmp_path / "cache"), "PREFECT_API_URL": prefect_server["url"]}
    exe = Path(sys.executable).parent / "gpuclust"
    procs = [subprocess.Popen([str(exe), "run", "--dataset", f"folder:{folder}", *_RUN, "--image-size", "160",
                               "--out", str(tmp_path / f"run{i}")], env=env, cwd=REPO, stderr=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for i in (1, 2)]
    outputs = [p.communicate(timeout=900) for p in procs]
    for proc, (_, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]
    stores = list((tmp_path / "cache" / "stores").glob("*/*"))
    assert len(stores) == 1
    rows = _rows(stores[0])
    manifest = _manifest(stores[0])
    assert sorted(rows) == _current_ids(folder) and len(rows) == 300
    assert len(manifest["runs"]) == 1 and manifest["runs"][0]["embedded"] == 300  # each image embedded once
    assert {r["run_id"] for r in rows.values()} == {manifest["runs"][0]["run_id"]}
    waits = [err for _, err in outputs if "waiting for it to finish" in err]
    assert len(waits) == 1, [err[-2000:] for _, err in outputs]
    assert f"is being written by run {manifest['runs'][0]['run_id']} (pid " in waits[0]
    for i in (1, 2):
        assert json.loads((tmp_path / f"run{i}" / "metrics.json").read_text())["n"] == 300


def test_prefect_cache_follows_a_changing_folder_without_re_extracting_it(prefect_server, jpegs, tmp_path):
    folder = _folder(tmp_path / "photos", jpegs, 4)
    env = {"GPUCLUST_CACHE": str(tmp_path / "cache")}

    def run(name: str) -> dict:
        result = run_cli(["run", "--dataset", f"folder:{folder}", *_RUN, "--image-size", "32", "--out",
                          str(tmp_path / name)], env=env, api_url=prefect_server["url"])
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads((tmp_path / name / "metrics.json").read_text())

    assert run("first")["n"] == 40
    store = next((tmp_path / "cache" / "stores").glob("*/*"))
    kept = (folder / "cat" / "000.jpg").read_bytes()
    (folder / "cat" / "000.jpg").unlink()
    (folder / "dog" / "new.jpg").write_bytes(jpegs["dog"][50])
    (folder / "dog" / "new2.jpg").write_bytes(jpegs["dog"][51])
    assert run("second")["n"] == 41
    assert [r["embedded"] for r in _manifest(store)["runs"]] == [40, 2]  # the new images only
    # back to the first run's files: the cached result of the first run names a store that changed since
    (folder / "dog" / "new.jpg").unlink()
    (folder / "dog" / "new2.jpg").unlink()
    (folder / "cat" / "000.jpg").write_bytes(kept)
    assert run("third")["n"] == 40
    assert [r["embedded"] for r in _manifest(store)["runs"]] == [40, 2, 1]
    assert sorted(_rows(store)) == _current_ids(folder)
    assert len(list((tmp_path / "cache" / "stores").glob("*/*"))) == 1
