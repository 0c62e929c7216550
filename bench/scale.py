"""Scale benchmark: a whole ``gpuclust run`` over N x 256 float32 embeddings brought as ``parquet:DIR``.

Sub-commands:

    generate  write 2,000,000 x 256 Gaussian blobs (1,000 centres, labels = blob ids) as Parquet files of
              50,000 rows each, one file in memory at a time; folders for smaller sizes hold symbolic
              links to the first files (250k / 500k / 1M are prefixes of the 2M set)
    run       ``gpuclust run`` at each size in a fresh subprocess under a peak-RSS watcher (psutil,
              the whole process tree, polled every 0.2 s); prints one JSON line per size, every
              stage's time, and the time-growth exponent (least squares of log time on log n)

Examples (the figures in BENCHMARKS.md came from these)::

    .venv/bin/python bench/scale.py generate --root /tmp/scale
    nice -n 5 .venv/bin/python bench/scale.py run --root /tmp/scale --sizes 250000,500000,1000000,2000000 \
        --memory-mb 512 --jsonl scale.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FILE_ROWS = 50_000
DIM = 256
CENTRES = 1_000
FULL_N = 2_000_000


def size_dir(root: Path, n: int) -> Path:
    return root / f"emb-{n}"


def generate(root: Path, n: int = FULL_N, dim: int = DIM, centres: int = CENTRES, seed: int = 0,
             sizes: tuple[int, ...] = (250_000, 500_000, 1_000_000)) -> None:
    """Write ``n`` rows of blobs in files of :data:`FILE_ROWS` rows (one file in memory at a time)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    full = size_dir(root, n)
    full.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    # centres spread like make_blobs' (uniform in a box), scaled so neighbouring blobs barely touch
    centers = rng.uniform(-1.0, 1.0, size=(centres, dim)).astype(np.float32)
    t0 = time.perf_counter()
    for f, start in enumerate(range(0, n, FILE_ROWS)):
        path = full / f"part-{f:05d}.parquet"
        if path.exists():
            continue
        rows = min(FILE_ROWS, n - start)
        r = np.random.default_rng([seed, f])
        y = r.integers(centres, size=rows)
        X = centers[y] + r.standard_normal(size=(rows, dim), dtype=np.float32) * np.float32(0.25)
        table = pa.table({
            "image_id": pa.array([f"img-{i:08d}" for i in range(start, start + rows)], pa.string()),
            "label": pa.array(y.astype(np.int32)),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(X.reshape(-1), pa.float32()), dim),
        })
        tmp = path.with_name(f".{path.name}.tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    files = sorted(full.glob("part-*.parquet"))
    for m in sizes:
        d = size_dir(root, m)
        d.mkdir(parents=True, exist_ok=True)
        for p in files[: m // FILE_ROWS]:
            link = d / p.name
            if not link.exists():
                link.symlink_to(p)
    print(json.dumps({"generated": str(full), "rows": n, "files": len(files),
                      "seconds": round(time.perf_counter() - t0, 1)}), flush=True)


def versions() -> dict[str, Any]:
    import faiss  # noqa: F401 - its version only
    import numpy as np
    import pyarrow as pa
    import sklearn
    import umap

    import gpu_ops

    return {"python": platform.python_version(), "cpu_count": os.cpu_count(), "gpuclust": gpu_ops.__version__,
            "numpy": np.__version__, "pyarrow": pa.__version__, "scikit-learn": sklearn.__version__,
            "umap-learn": umap.__version__, "faiss": faiss.__version__, "machine": platform.machine(),
            "kernel": platform.release()}


def watch(cmd: list[str], env: dict[str, str], timeout: float) -> dict[str, Any]:
    """Run ``cmd``; poll the RSS of it and every descendant (psutil, every 0.2 s). Returns the exit
    code, wall seconds, the peak of the tree's summed RSS and the peak of the largest single process."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    root = psutil.Process(proc.pid)
    peak_tree = peak_one = 0
    lines: list[str] = []
    import threading

    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)  # type: ignore[arg-type]
    reader.start()
    while proc.poll() is None:
        if time.perf_counter() - t0 > timeout:
            proc.kill()
            break
        try:
            procs = [root, *root.children(recursive=True)]
            rss = []
            for p in procs:
                try:
                    rss.append(p.memory_info().rss)
                except psutil.Error:
                    pass
            peak_tree = max(peak_tree, sum(rss))
            peak_one = max(peak_one, max(rss, default=0))
        except psutil.Error:
            pass
        time.sleep(0.2)
    proc.wait()
    reader.join(5)
    return {"rc": proc.returncode, "wall_s": round(time.perf_counter() - t0, 1),
            "peak_rss_tree_mb": round(peak_tree / 2**20), "peak_rss_process_mb": round(peak_one / 2**20),
            "log_tail": "".join(lines[-15:])}


def run_size(root: Path, n: int, memory_mb: int, iters: int, reducer: str, keep: bool,
             explore: bool = False) -> dict[str, Any]:
    """One ``gpuclust run`` at ``n`` rows (fresh cache: extraction included), under :func:`watch`."""
    import shutil

    import yaml

    work = root / f"run-{n}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cfg = {"dataset": f"parquet:{size_dir(root, n)}", "extractor": "raw", "algorithms": ["kmeans"], "k": 1000,
           "n_init": 1, "max_iter": iters, "reducer": reducer, "memory_mb": memory_mb, "explore": explore,
           "seed": 0, "out": str(work / "out"), "cache_dir": str(work / "cache")}
    (work / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_HOME": str(work / "prefect"), "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}
    exe = Path(sys.executable).parent / "gpuclust"
    result = watch([str(exe), "run", "--config", str(work / "config.yaml")], env, timeout=3600)
    row: dict[str, Any] = {"n": n, "memory_mb": memory_mb, "kmeans_iters": iters, "reducer": reducer,
                           "explore": explore, **result}
    metrics_path = work / "out" / "metrics.json"
    if result["rc"] == 0 and metrics_path.is_file():
        m = json.loads(metrics_path.read_text())
        html = (work / "out" / "report.html").read_text()
        row.update(timings_s=m["timings_s"],
                   kmeans=m["algorithms"]["kmeans"] | {"cluster_sizes": None}, reducer_plan=m["reducer"],
                   report_bytes=len(html.encode()))
        row["kmeans"].pop("cluster_sizes")
        row.pop("log_tail")
    if not keep:
        shutil.rmtree(work / "cache", ignore_errors=True)
    return row


def growth_exponent(rows: list[dict[str, Any]], key: str = "wall_s") -> float:
    """Slope of the least-squares line through (log n, log seconds)."""
    import numpy as np

    n = np.log([r["n"] for r in rows])
    t = np.log([r[key] for r in rows])
    return float(np.polyfit(n, t, 1)[0])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate")
    g.add_argument("--root", type=Path, required=True)
    g.add_argument("--n", type=int, default=FULL_N)
    r = sub.add_parser("run")
    r.add_argument("--root", type=Path, required=True)
    r.add_argument("--sizes", default="250000,500000,1000000,2000000")
    r.add_argument("--memory-mb", type=int, default=512)
    r.add_argument("--iters", type=int, default=10, help="k-means Lloyd iterations (max_iter; n_init 1)")
    r.add_argument("--reducer", default="umap")
    r.add_argument("--keep", action="store_true", help="keep each size's store (cache)")
    r.add_argument("--explore", action="store_true", help="also run the explore stage (duplicates, outliers)")
    r.add_argument("--jsonl", type=Path)
    args = ap.parse_args(argv)
    if args.cmd == "generate":
        generate(args.root, args.n)
        return
    print(json.dumps({"versions": versions()}), flush=True)
    rows = []
    for n in [int(x) for x in args.sizes.split(",")]:
        row = run_size(args.root, n, args.memory_mb, args.iters, args.reducer, args.keep, args.explore)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as fh:
                fh.write(json.dumps(row) + "\n")
        if row["rc"] != 0:
            break
    done = [r for r in rows if r["rc"] == 0]
    if len(done) >= 2:
        summary = {"growth_exponent_wall": round(growth_exponent(done), 3)}
        for stage in done[0].get("timings_s", {}):
            if all((r["timings_s"].get(stage) or 0) > 0 for r in done):
                summary[f"growth_exponent_{stage}"] = round(growth_exponent(
                    [{"n": r["n"], "t": r["timings_s"][stage]} for r in done], "t"), 3)
        print(json.dumps(summary), flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as fh:
                fh.write(json.dumps(summary) + "\n")


if __name__ == "__main__":
    main()
