"""Every reused byte of an embedding store is verified: damaged parts and manifests are re-extracted
(one warning each time), a cached Prefect result whose store is gone or altered is a cache miss,
finished stores are reused without a write, and bad Parquet inputs or cache roots are refused in
one line before any work."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gpu_ops.cluster.sources import StoreSource
from gpu_ops.data import load_dataset
from gpu_ops.errors import InputError
from gpu_ops.features import create_extractor
from gpu_ops.features.extract import extract_to_store
from gpu_ops.store import (
    EmbeddingStore,
    EmbeddingTable,
    StoreSummary,
    cached_store_ok,
    read_embeddings,
)

from conftest import run_cli

N, SHARD_ROWS = 400, 100  # digits: 4 shards


def _extract(root: Path) -> StoreSummary:
    return extract_to_store(load_dataset("digits", limit=N), create_extractor("raw"), root, shard_rows=SHARD_ROWS,
                            progress=False)


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> EmbeddingTable:
    """What an undisturbed extraction holds."""
    return read_embeddings(Path(_extract(tmp_path_factory.mktemp("clean")).directory))


def _assert_same_as_clean(store: Path, clean: EmbeddingTable) -> None:
    table = read_embeddings(store)
    assert len(table.image_ids) == len(set(table.image_ids)) == N  # exactly one row per image
    assert table.image_ids == clean.image_ids
    assert np.array_equal(table.embeddings, clean.embeddings) and np.array_equal(table.labels, clean.labels)


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def _flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    with open(path, "r+b") as fh:  # in place, as a disk or a stray write would
        fh.write(data)


def _truncate(path: Path) -> str:
    size = path.stat().st_size
    os.truncate(path, size // 2)
    return f"part-00002.parquet is damaged (truncated: {size // 2} of {size} bytes)"


DAMAGE: dict[str, Callable[[Path], str]] = {
    "flipped bit": lambda p: (_flip_middle_byte(p), "part-00002.parquet is damaged (sha256 mismatch)")[1],
    "truncated": _truncate,
    "deleted": lambda p: (p.unlink(), "part-00002.parquet is missing")[1],
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_part_is_detected_and_only_its_shard_re_extracted(tmp_path, caplog, clean, damage):
    root = tmp_path / "root"
    store = Path(_extract(root).directory)
    part = store / "part-00002.parquet"
    others = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in store.glob("part-*.parquet") if p != part}
    expected = DAMAGE[damage](part)
    with caplog.at_level(logging.INFO, logger="gpu_ops"):
        again = _extract(root)
    assert _warnings(caplog) == [f"store {store}: {expected}: re-extracting"]
    assert again.rows == N and again.complete
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in store.glob("part-*.parquet") if p != part} == others  # only that shard was redone
    _assert_same_as_clean(store, clean)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="gpu_ops"):
        _extract(root)
    assert _warnings(caplog) == []  # whole again


MANIFESTS = {
    "not JSON": ("{oops", "manifest.json is damaged (not valid JSON: Expecting property name enclosed in double "
                          "quotes: line 1 column 2 (char 1))"),
    "wrong structure": (json.dumps({"format": 2, "shards": []}),
                        "manifest.json is damaged ('n_items' is missing or has the wrong type)"),
    "older format": (json.dumps({"format": 1}), "manifest.json has store format 1, this gpuclust writes 2"),
}


@pytest.mark.parametrize("kind", list(MANIFESTS))
def test_a_damaged_manifest_restarts_the_store(tmp_path, caplog, clean, kind):
    root = tmp_path / "root"
    store = Path(_extract(root).directory)
    text, expected = MANIFESTS[kind]
    (store / "manifest.json").write_text(text)
    with caplog.at_level(logging.INFO, logger="gpu_ops"):
        again = _extract(root)
    assert _warnings(caplog) == [f"store {store}: {expected}: re-extracting"]
    assert (again.rows, again.shards, again.complete) == (N, 4, True)
    _assert_same_as_clean(store, clean)


def _snapshot(store: Path) -> dict[str, tuple[int, int, int]]:
    """(inode, mtime_ns, size) of the store directory and everything in it."""
    return {str(p.relative_to(store)): (p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_size)
            for p in [store, *store.rglob("*")]}


def test_a_finished_store_is_reused_read_only_without_a_single_write(tmp_path, clean):
    root = tmp_path / "root"
    first = _extract(root)
    store = Path(first.directory)
    before = _snapshot(store)
    modes = {p: p.stat().st_mode for p in [store, *store.rglob("*")]}
    for p in modes:  # a read-only copy (as root this does not stop writes: the snapshot catches them)
        p.chmod(modes[p] & ~0o222)
    try:
        again = _extract(root)
        assert cached_store_ok(store)
        _assert_same_as_clean(store, clean)
    finally:
        for p, mode in modes.items():
            p.chmod(mode)
    assert again.written == () and first.written == (0, 1, 2, 3)
    assert (again.directory, again.rows, again.dim, again.quarantined) == (first.directory, first.rows, first.dim,
                                                                          first.quarantined)
    assert _snapshot(store) == before  # nothing created, replaced or touched


def test_the_cheap_check_of_a_cached_store(tmp_path, caplog):
    root = tmp_path / "root"
    store = Path(_extract(root).directory)
    assert cached_store_ok(store)
    part = store / "part-00001.parquet"
    os.utime(part, ns=(part.stat().st_atime_ns, part.stat().st_mtime_ns + 10**9))  # same bytes, touched
    with caplog.at_level(logging.INFO, logger="gpu_ops"):
        assert not cached_store_ok(store)  # the extract stage must look again ...
        _extract(root)
    assert _warnings(caplog) == []  # ... finds the bytes intact: nothing re-extracted, nothing to warn about
    assert cached_store_ok(store)  # and records the new mtime
    caplog.clear()
    shutil.rmtree(store)
    with caplog.at_level(logging.INFO, logger="gpu_ops"):
        assert not cached_store_ok(store)
    assert _warnings(caplog) == [f"store {store} is missing: re-extracting"]


def test_values_that_overflow_float32_never_reach_clustering(tmp_path):
    ds = load_dataset("digits", limit=20)
    store = EmbeddingStore(tmp_path / "store", {"store_key": "k"}, 20, 10)
    emb = np.ones((10, 4), np.float32)
    store.write_shard(0, ds.image_ids[:10], ["s"] * 10, None, emb, [])
    emb[3, 2] = 3.2e38
    store.write_shard(1, ds.image_ids[10:], ["s"] * 10, None, emb, [])
    store.finish()
    part = tmp_path / "store" / "part-00001.parquet"
    message = (f"{part}: row 3 (image_id {ds.image_ids[13]!r}) holds a value beyond ±4.61e+18, where "
               "float32 distances of 4-d vectors overflow (3.2e+38) in its embedding")
    with pytest.raises(InputError) as err:
        read_embeddings(tmp_path / "store")
    assert str(err.value) == message
    with pytest.raises(InputError) as err:  # the out-of-core k-means reads the store in batches
        list(StoreSource(tmp_path / "store", batch_rows=4).batches())
    assert str(err.value) == (f"{part}: row 3 holds a value beyond ±4.61e+18, where float32 distances of 4-d "
                              "vectors overflow (3.2e+38) in its embedding")


# --------------------------------------------------------------------------------------------
# Through the command line


def _user_part(path: Path, ids: list[str], dim: int = 8, label: bool = False, value: float | None = None) -> None:
    """A Parquet file of embeddings as a user would bring it."""
    emb = np.full((len(ids), dim), 0.5, np.float32)
    if value is not None:
        emb[1, 0] = value
    columns = {"image_id": pa.array(ids)}
    if label:
        columns["label"] = pa.array(np.zeros(len(ids), np.int32))
    columns["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), dim)
    pq.write_table(pa.table(columns), path)


BAD_PARQUET = {
    "mixed columns": (lambda d: _user_part(d / "b.parquet", ["b0", "b1"], label=True),
                      "b.parquet: columns (image_id, label, embedding) differ from those of a.parquet "
                      "(image_id, embedding)"),
    "mixed dimensions": (lambda d: _user_part(d / "b.parquet", ["b0", "b1"], dim=4),
                         "b.parquet: embedding dimension 4 differs from a.parquet's 8"),
    "not Parquet": (lambda d: (d / "b.parquet").write_text("image_id,embedding\nb0,0.5\n"),
                    "b.parquet: not a readable Parquet file ("),
    "duplicate id": (lambda d: _user_part(d / "b.parquet", ["b0", "a1"]),
                     "b.parquet: duplicate image_id 'a1' (also in a.parquet)"),
    "3.2e38": (lambda d: _user_part(d / "b.parquet", ["b0", "b1"], value=3.2e38),
               "b.parquet: row 1 (image_id 'b1') holds a value beyond ±3.26e+18, where float32 distances of "
               "8-d vectors overflow (3.2e+38) in its embedding"),
    "NaN": (lambda d: _user_part(d / "b.parquet", ["b0", "b1"], value=float("nan")),
            "b.parquet: row 1 (image_id 'b1') holds a non-finite value (nan) in its embedding"),
}


@pytest.mark.parametrize("case", list(BAD_PARQUET))
def test_bad_parquet_inputs_are_one_line_and_exit_2(tmp_path, case):
    data = tmp_path / "emb"
    data.mkdir()
    _user_part(data / "a.parquet", ["a0", "a1", "a2"])
    make, message = BAD_PARQUET[case]
    make(data)
    result = run_cli(["run", "--dataset", f"parquet:{data}", "--k", "2", "--reducer", "none",
                      "--out", str(tmp_path / "run")], env={"GPUCLUST_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"gpuclust: error: {data}/{message}"), result.stderr[-3000:]
    if not message.endswith("("):
        assert lines[0] == f"gpuclust: error: {data}/{message}"
    assert not (tmp_path / "run").exists() and not list(tmp_path.glob("cache/stores/*"))  # before any work


def test_a_cache_root_that_is_a_file_or_cannot_be_created_is_refused(tmp_path):
    afile = tmp_path / "cache-file"
    afile.write_text("not a folder\n")
    cases = [(afile, f"cache directory {afile} (GPUCLUST_CACHE or cache_dir) is not a directory"),
             (afile / "cache", f"cache directory {afile / 'cache'} (GPUCLUST_CACHE or cache_dir) cannot be created "
                               "(Not a directory)")]
    if os.geteuid() != 0:  # permissions bind only other users
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        cases += [(locked, f"cache directory {locked} (GPUCLUST_CACHE or cache_dir) is not writable"),
                  (locked / "cache", f"cache directory {locked / 'cache'} (GPUCLUST_CACHE or cache_dir) cannot be "
                                     "created (Permission denied)")]
    for cache, message in cases:
        result = run_cli(["run", "--out", str(tmp_path / "run")], env={"GPUCLUST_CACHE": str(cache)})
        assert (result.returncode, result.stderr) == (2, f"gpuclust: error: {message}\n"), result.stderr[-3000:]
        assert not (tmp_path / "run").exists()
    assert afile.read_text() == "not a folder\n"


def test_cache_round_trip_damaged_part_deleted_store_deleted_cache(prefect_server, tmp_path):
    """A cached extract result outlives its store: each rerun re-extracts what it must, says so in
    one line, and reports the same metrics."""
    cache = tmp_path / "cache"
    args = ["run", "--dataset", "digits", "--limit", "300", "--extractor", "raw", "--algorithm", "kmeans", "--k", "10",
            "--reducer", "none", "--backend", "cpu"]

    def run(name: str) -> tuple[list[str], dict]:
        result = run_cli([*args, "--out", str(tmp_path / name)], env={"GPUCLUST_CACHE": str(cache)},
                         api_url=prefect_server["url"])
        assert result.returncode == 0, result.stderr[-3000:]
        assert "Traceback" not in result.stderr
        lines = [line for line in result.stderr.splitlines() if "re-extracting" in line]
        return lines, json.loads((tmp_path / name / "metrics.json").read_text())["algorithms"]

    lines, metrics = run("first")
    assert lines == []
    store = next(cache.glob("stores/*/*"))

    _flip_middle_byte(store / "part-00000.parquet")
    lines, again = run("damaged-part")
    assert lines == [f"WARNING gpu_ops.store: store {store}: part-00000.parquet is damaged (sha256 mismatch): "
                     "re-extracting"]
    assert again == metrics

    shutil.rmtree(store)
    lines, again = run("deleted-store")
    assert lines == [f"WARNING gpu_ops.store: store {store} is missing: re-extracting"]
    assert again == metrics

    shutil.rmtree(cache)
    lines, again = run("deleted-cache")
    assert lines == [f"WARNING gpu_ops.store: store {store} is missing: re-extracting"]
    assert again == metrics and (store / "manifest.json").is_file()


def test_sharded_extraction_redoes_only_a_damaged_shard(tmp_path, caplog):
    """On a Dask cluster the driver verifies the store while planning: a damaged shard is pending again."""
    from gpu_ops import distributed, pipeline
    from gpu_ops.config import make_config

    params = pipeline.extract_params(make_config(cache_dir=tmp_path / "cache", shard_rows=600))
    plan = distributed.plan_shards(params)
    distributed.extract_shards(params, plan["store"], plan["pending"], 600)
    clean = read_embeddings(Path(distributed.merge_shards(plan["store"]).directory))
    store = Path(plan["store"])
    _flip_middle_byte(store / "part-00001.parquet")
    with caplog.at_level(logging.INFO, logger="gpu_ops"):
        again = distributed.plan_shards(params)
    assert _warnings(caplog) == [f"store {store}: part-00001.parquet is damaged (sha256 mismatch): re-extracting"]
    assert again["pending"] == [1]
    distributed.extract_shards(params, plan["store"], again["pending"], 600)
    assert distributed.merge_shards(plan["store"]).rows == 1797
    table = read_embeddings(store)
    assert table.image_ids == clean.image_ids and np.array_equal(table.embeddings, clean.embeddings)
