"""Benchmark the deep clustering methods (gpu_ops.deep.fit_deep) on MNIST and USPS.

Every (dataset, method, seed) run is end to end from the uint8 images (autoencoder pretraining
included, no checkpoint reuse unless --checkpoint-dir is given); the table reports the median
ACC (Hungarian) / NMI / ARI and wall time over the seeds.

    .venv/bin/python bench/deep.py --threads 2 --datasets mnist-test --methods idec,n2d,dkm --seeds 0,1,2
    .venv/bin/python bench/deep.py --datasets mnist-full --methods idec --jsonl runs/bench-deep.jsonl
    .venv/bin/python bench/deep.py --datasets mnist-test --methods dkm --set cluster_init=kmeans --set dkm_lambda=1
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATASETS = {
    "mnist-test": ("idx:{root}/mnist", "test"),
    "mnist-full": ("idx:{root}/mnist", "all"),
    "usps": ("usps:{root}/usps/usps.h5", "all"),
    "digits": ("digits", "all"),
}

#: Per-dataset settings the benchmark uses unless --set overrides them (see BENCHMARKS.md).
PRESETS: dict[str, dict[str, object]] = {
    "mnist-test": {},
    "mnist-full": {},
    "usps": {},
    "digits": {},
}


def parse_value(raw: str) -> object:
    low = raw.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    if "," in raw:
        return tuple(parse_value(p) for p in raw.split(","))
    return raw


def print_table(rows: list[dict]) -> None:
    """Markdown table of medians over seeds, per (dataset, method), in first-seen order."""
    print("| dataset | n | method | seeds | ACC (median) | NMI (median) | ARI (median) | wall s (median) | ACC min-max |")
    print("|---|---|---|---|---|---|---|---|---|")
    keys = list(dict.fromkeys((r["dataset"], r["method"]) for r in rows))
    for dname, method in keys:
        rs = [r for r in rows if r["dataset"] == dname and r["method"] == method]
        med = {m: statistics.median(r[m] for r in rs) for m in ("acc", "nmi", "ari", "wall_s")}
        accs = [r["acc"] for r in rs]
        seeds = ",".join(str(r["seed"]) for r in rs)
        print(f"| {dname} | {rs[0]['n']} | {method} | {seeds} | {med['acc']:.4f} | {med['nmi']:.4f} | "
              f"{med['ari']:.4f} | {med['wall_s']:.0f} | {min(accs):.4f}-{max(accs):.4f} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="mnist-test", help=f"comma list of {', '.join(DATASETS)}")
    ap.add_argument("--methods", default="n2d,dkm", help="comma list of n2d, dkm, dec, idec, ae-kmeans")
    ap.add_argument("--seeds", default="0,1,2", help="comma list of seeds")
    ap.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--backend", default="auto", help="k-means / UMAP backend")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--checkpoint-dir", default=None, help="reuse pretrained autoencoders from here (off by default)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="DeepConfig override for every run (repeatable), e.g. --set pretrain_epochs=30")
    ap.add_argument("--jsonl", default=None, help="append one JSON line per run to this file")
    ap.add_argument("--progress", action="store_true", help="show tqdm bars")
    ap.add_argument("--log-level", default="INFO")
    ap.add_argument("--summarize", default=None, metavar="JSONL",
                    help="only print the median table of the runs recorded in JSONL (from --jsonl)")
    args = ap.parse_args(argv)
    if args.summarize:
        rows = [json.loads(line) for line in Path(args.summarize).read_text().splitlines() if line.strip()]
        print_table(rows)
        return 0

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    from gpu_ops.reduce.umap import enable_numba_cache

    enable_numba_cache()
    import numpy as np
    import torch

    from gpu_ops.data import load_dataset
    from gpu_ops.deep import fit_deep

    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--set expects KEY=VALUE; got {item!r}")
        overrides[key.strip()] = parse_value(value.strip())
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    for d in datasets:
        if d not in DATASETS:
            ap.error(f"unknown dataset {d!r}; expected some of: {', '.join(DATASETS)}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]

    env = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "cpu_count": os.cpu_count(), "cuda": torch.cuda.is_available()}
    print(f"# env {json.dumps(env)}", flush=True)
    print(f"# overrides {json.dumps(overrides, default=str)}", flush=True)
    rows = []
    for dname in datasets:
        spec, split = DATASETS[dname]
        t0 = time.perf_counter()
        ds = load_dataset(spec.format(root=args.data_root), split)
        load_s = time.perf_counter() - t0
        images, labels = ds.items, ds.labels
        k = int(len(np.unique(labels)))
        for method in methods:
            for seed in seeds:
                cfg = {**PRESETS.get(dname, {}), **overrides, "progress": args.progress}
                t1 = time.perf_counter()
                res = fit_deep(method, images, k, seed=seed, device=args.device, labels=labels,
                               checkpoint_dir=args.checkpoint_dir, backend=args.backend, **cfg)
                wall = time.perf_counter() - t1 + load_s
                # a reused autoencoder still counts: add what its pretraining cost when it was made
                wall += res.info.get("checkpoint_pretrain_s", 0.0)
                row = {"dataset": dname, "n": len(images), "method": method, "seed": seed, **res.metrics,
                       "wall_s": round(wall, 1), "pretrain_s": round(res.timings["pretrain"], 1),
                       "cluster_s": round(res.timings["cluster"], 1), "device": res.device,
                       "pretrain_epochs": res.info.get("pretrain_epochs"),
                       "from_checkpoint": res.pretrained_from_checkpoint, "overrides": cfg}
                rows.append(row)
                print(f"run {dname:10s} {method:9s} seed={seed} acc={row['acc']:.4f} nmi={row['nmi']:.4f} "
                      f"ari={row['ari']:.4f} wall={wall:.0f}s (pretrain {res.timings['pretrain']:.0f}s)", flush=True)
                if args.jsonl:
                    Path(args.jsonl).parent.mkdir(parents=True, exist_ok=True)
                    with open(args.jsonl, "a") as fh:
                        fh.write(json.dumps({**row, "env": env}, default=str) + "\n")
    print()
    print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
