"""Incremental refresh and overlapping runs on a folder of CIFAR-10 JPEGs (acceptance figures).

1. ``N`` JPEGs (``N/10`` per class) are extracted with ResNet-18 (``weights=none``) into a fresh cache.
2. The folder changes: ``--add`` new images (spread over the classes), ``--remove`` airplanes
   removed, ``--rewrite`` cats given new content (other cats' bytes).
3. A rerun refreshes the store. Counted from the store's own records (each row's ``run_id``, the
   manifest's run history): how many images it embedded, how many the store holds, whether the
   unchanged rows are byte-identical and how many part files are untouched.
4. The same rerun on a copy of step 1's cache is SIGKILLed once it has written a part; another
   rerun follows; the result is compared with step 3's.
5. Two ``gpuclust run`` processes are started together on a new copy of the folder (ephemeral
   Prefect, one cache): both must finish, the store hold one row per image, each embedded once,
   and exactly one log say that it waited.

    OMP_WAIT_POLICY=PASSIVE PYTHONPATH=. .venv/bin/python -m bench.incremental --images /work/data/test --n 5000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def extract(folder: Path, cache: Path, image_size: int, shard_rows: int, batch_size: int) -> dict[str, Any]:
    """One extraction (the subprocess side): the summary and its wall time as JSON on stdout."""
    from gpu_ops.data import load_dataset
    from gpu_ops.features import create_extractor
    from gpu_ops.features.extract import extract_to_store

    t0 = time.perf_counter()
    summary = extract_to_store(load_dataset(f"folder:{folder}"),
                               create_extractor("resnet18", weights="none", image_size=image_size), cache,
                               shard_rows=shard_rows, batch_size=batch_size, progress=False)
    return {"store": summary.directory, "rows": summary.rows, "items": summary.items,
            "seconds": round(time.perf_counter() - t0, 2)}


def _extract_cmd(args: argparse.Namespace, folder: Path, cache: Path) -> list[str]:
    return [sys.executable, "-m", "bench.incremental", "extract", str(folder), str(cache), "--image-size",
            str(args.image_size), "--shard-rows", str(args.shard_rows), "--batch-size", str(args.batch_size)]


def _run_extract(args: argparse.Namespace, folder: Path, cache: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    out = subprocess.run(_extract_cmd(args, folder, cache), check=True, capture_output=True, text=True, cwd=REPO)
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    doc["wall_s"] = round(time.perf_counter() - t0, 2)
    return doc


def build_folder(images: Path, out: Path, per_class: int) -> Path:
    """``out/<class>/<name>.jpg``: the first ``per_class`` JPEGs of every class of ``images``."""
    for c in CLASSES:
        (out / c).mkdir(parents=True)
        for src in sorted((images / c).glob("*.jpg"))[:per_class]:
            shutil.copyfile(src, out / c / src.name)
    return out


def change_folder(images: Path, folder: Path, per_class: int, add: int, remove: int, rewrite: int) -> dict[str, list[str]]:
    """Add ``add`` unseen images (spread over the classes), remove ``remove`` airplanes (every
    other one from the first), give ``rewrite`` cats other cats' content."""
    added = []
    for k in range(add):
        c = CLASSES[k % len(CLASSES)]
        src = sorted((images / c).glob("*.jpg"))[per_class + k // len(CLASSES)]
        shutil.copyfile(src, folder / c / f"new-{src.name}")
        added.append(f"{c}/new-{src.name}")
    airplanes = sorted((folder / "airplane").glob("*.jpg"))[: 2 * remove: 2]
    for p in airplanes:
        p.unlink()
    cats = sorted((folder / "cat").glob("*.jpg"))[:rewrite]
    donors = sorted((images / "cat").glob("*.jpg"))[-rewrite:]
    for p, donor in zip(cats, donors):
        p.write_bytes(donor.read_bytes())
    return {"added": added, "removed": [f"airplane/{p.name}" for p in airplanes],
            "rewritten": [f"cat/{p.name}" for p in cats]}


def store_rows(store: Path) -> tuple[dict[str, dict], dict[str, Any]]:
    """Every row of a store by image_id (asserting one per id) and its manifest."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    manifest = json.loads((store / "manifest.json").read_text())
    files = [manifest["shards"][s]["file"] for s in sorted(manifest["shards"]) if manifest["shards"][s]["file"]]
    rows = pa.concat_tables([pq.read_table(store / f) for f in files]).to_pylist()
    by_id = {r["image_id"]: r for r in rows}
    assert len(by_id) == len(rows), "duplicate image_id rows"
    return by_id, manifest


def part_bytes(store: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in store.glob("part-*.parquet")}


def refresh_figures(before: dict[str, dict], after: dict[str, dict], manifest: dict[str, Any], first_run: str,
                    folder: Path, parts_before: dict[str, bytes], store: Path) -> dict[str, Any]:
    """What a refresh did, from the store's own records."""
    current = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.jpg"))
    embedded = [i for i, r in after.items() if r["run_id"] != first_run]
    unchanged = [i for i in after if i not in set(embedded)]
    untouched = [f for f, b in parts_before.items() if (store / f).is_file() and (store / f).read_bytes() == b]
    return {"rows": len(after), "current_images": len(current), "store_is_current": sorted(after) == current,
            "embedded_by_refresh": len(embedded), "unchanged_rows": len(unchanged),
            "unchanged_rows_byte_identical": all(after[i] == before[i] for i in unchanged),
            "parts_before": len(parts_before), "parts_untouched_byte_identical": len(untouched),
            "parts_now": len([s for s in manifest["shards"].values() if s["file"]]),
            "runs": [{k: r[k] for k in ("new", "changed", "removed", "touched", "unchanged", "embedded", "finished")}
                     for r in manifest["runs"][1:]]}


def killed_refresh(args: argparse.Namespace, folder: Path, cache: Path, store: Path) -> int:
    """Start a refresh, SIGKILL it once it has embedded ``--kill-after`` images; return that count."""
    proc = subprocess.Popen(_extract_cmd(args, folder, cache), cwd=REPO, stdout=subprocess.DEVNULL)
    while proc.poll() is None:
        try:
            runs = json.loads((store / "manifest.json").read_text())["runs"]
        except (OSError, ValueError, KeyError):
            runs = []
        if len(runs) == 2 and runs[-1]["embedded"] >= args.kill_after:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return int(runs[-1]["embedded"])
        time.sleep(0.002)
    raise RuntimeError("the refresh finished before it could be killed: lower --kill-after or --batch-size")


def concurrent_runs(args: argparse.Namespace, folder: Path, work: Path) -> dict[str, Any]:
    """Two `gpuclust run` processes started together on ``folder`` (a new one) with one cache."""
    env = {**os.environ, "GPUCLUST_CACHE": str(work / "cache-together"), "PREFECT_HOME": str(work / "prefect-home"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
           "PYTHONPATH": str(REPO)}
    env.pop("PREFECT_API_URL", None)
    cmd = [str(Path(sys.executable).parent / "gpuclust"), "run", "--dataset", f"folder:{folder}", "--extractor",
           "resnet18", "--weights", "none", "--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
           "--algorithm", "kmeans", "--k", "10", "--reducer", "none", "--no-explore"]
    t0 = time.perf_counter()
    procs = [subprocess.Popen([*cmd, "--out", str(work / f"run-together-{i}")], env=env, cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in (1, 2)]
    outs = [p.communicate() for p in procs]
    wall = round(time.perf_counter() - t0, 1)
    stores = list((work / "cache-together" / "stores").glob("*/*"))
    rows, manifest = store_rows(stores[0])
    waited = [line for _, err in outs for line in err.splitlines() if "waiting for it to finish" in line]
    return {"exit_codes": [p.returncode for p in procs], "wall_s": wall, "stores": len(stores), "rows": len(rows),
            "distinct_ids": len(set(rows)), "images": sum(1 for _ in folder.rglob("*.jpg")),
            "runs_that_embedded": len(manifest["runs"]), "embedded": [r["embedded"] for r in manifest["runs"]],
            "row_run_ids": len({r["run_id"] for r in rows.values()}), "logs_saying_waited": len(waited),
            "wait_line": waited[0] if waited else None,
            "errors": [err[-1500:] for p, (_, err) in zip(procs, outs) if p.returncode]}


def _progress(report: dict[str, Any], key: str) -> None:
    """One finished section on stderr (a later failure keeps it)."""
    print(json.dumps({key: report[key]}, default=str), file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", default="bench", choices=["bench", "extract"])
    parser.add_argument("paths", nargs="*", type=Path)
    parser.add_argument("--images", type=Path, default=Path("/work/data/test"),
                        help="CIFAR-10 JPEGs in class folders (at least N/10 + add/10 + rewrite per class)")
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--add", type=int, default=100)
    parser.add_argument("--remove", type=int, default=50)
    parser.add_argument("--rewrite", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--shard-rows", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--kill-after", type=int, default=50, help="SIGKILL the refresh once it embedded this many")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a new temporary one, removed after)")
    parser.add_argument("--skip-concurrency", action="store_true")
    args = parser.parse_args(argv)
    if args.mode == "extract":
        print(json.dumps(extract(args.paths[0], args.paths[1], args.image_size, args.shard_rows, args.batch_size)))
        return 0

    import filelock
    import pyarrow
    import torch

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-incremental-"))
    per_class = args.n // len(CLASSES)
    report: dict[str, Any] = {"machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
                                         f"load average {os.getloadavg()[0]:.1f} at start",
                              "versions": {"python": platform.python_version(), "torch": torch.__version__,
                                           "pyarrow": pyarrow.__version__, "filelock": filelock.__version__},
                              "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                                           if k not in ("mode", "paths", "work")}}
    folder = build_folder(args.images, work / "photos", per_class)
    first = _run_extract(args, folder, work / "cache")
    store = Path(first["store"])
    before, manifest = store_rows(store)
    first_run = manifest["runs"][0]["run_id"]
    parts_before = part_bytes(store)
    report["first_extraction"] = {"rows": first["rows"], "parts": len(parts_before), "wall_s": first["wall_s"],
                                  "extract_s": first["seconds"]}
    shutil.copytree(work / "cache", work / "cache-kill")
    change = change_folder(args.images, folder, per_class, args.add, args.remove, args.rewrite)
    report["change"] = {k: len(v) for k, v in change.items()}

    rerun = _run_extract(args, folder, work / "cache")
    after, manifest = store_rows(store)
    report["refresh"] = {"wall_s": rerun["wall_s"], "extract_s": rerun["seconds"],
                         **refresh_figures(before, after, manifest, first_run, folder, parts_before, store)}

    _progress(report, "refresh")
    kill_store = work / "cache-kill" / store.relative_to(work / "cache")
    at_kill = killed_refresh(args, folder, work / "cache-kill", kill_store)
    resumed = _run_extract(args, folder, work / "cache-kill")
    after_kill, manifest_kill = store_rows(kill_store)
    same_ids = sorted(after_kill) == sorted(after)
    max_diff = max(max(abs(a - b) for a, b in zip(after_kill[i]["embedding"], after[i]["embedding"]))
                   for i in after) if same_ids else None
    report["sigkill_then_rerun"] = {"embedded_before_kill": at_kill, "rerun_wall_s": resumed["wall_s"],
                                    **refresh_figures(before, after_kill, manifest_kill, first_run, folder,
                                                      parts_before, kill_store),
                                    "same_image_ids_as_uninterrupted": same_ids,
                                    "max_abs_embedding_difference_vs_uninterrupted": max_diff,
                                    "unchanged_rows_identical_to_uninterrupted": all(
                                        after_kill[i] == after[i] for i in after if after[i]["run_id"] == first_run)}
    _progress(report, "sigkill_then_rerun")
    if not args.skip_concurrency:
        together = build_folder(args.images, work / "photos-together", per_class)
        report["two_runs_together"] = concurrent_runs(args, together, work)
    print(json.dumps(report, indent=2, default=str))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
