"""Backbones for photos: k-means ACC and extraction speed of several extractor settings on one image folder.

Each setting is extracted into a fresh store (one after another), then clustered with k-means
(k classes, 10 restarts; ``--seeds`` seeds averaged) on the features as stored and on
L2-normalised features.

    python -m bench.backbones --dataset folder:/work/data/sub2k \
        --settings efficientnet_lite0@128 efficientnet_lite2@128 efficientnet_lite2@128+flip \
                   efficientnet_lite0+efficientnet_lite2@128
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from gpu_ops.data import load_dataset
from gpu_ops.features import create_extractor
from gpu_ops.features.combine import l2_normalised
from gpu_ops.features.extract import extract_to_store
from gpu_ops.metrics import evaluate
from gpu_ops.registry import create_estimator
from gpu_ops.store import read_embeddings


def parse_setting(text: str) -> tuple[str, int | None, bool]:
    """``SPEC[@SIZE][+flip]`` -> (extractor spec, image size or None, flip averaging). ``@SIZE`` at
    the end is every backbone's size (``lite0+lite2@128``), unless each backbone names its own
    (``lite2@128+lite2@192``): then the spec is passed on whole."""
    flip = text.endswith("+flip")
    text = text.removesuffix("+flip")
    parts = text.split("+")
    if len(parts) > 1 and all("@" in part for part in parts):
        return text, None, flip
    spec, _, size = text.partition("@")
    return spec, int(size) if size else None, flip


def kmeans_scores(X: np.ndarray, labels: np.ndarray, k: int, seeds: int = 1) -> dict[str, float]:
    """Mean ACC / NMI / ARI of k-means (10 restarts each) over seeds 0..seeds-1."""
    runs = []
    for seed in range(seeds):
        est, _ = create_estimator("kmeans", "cpu", n_clusters=k, n_init=10, max_iter=100, seed=seed)
        runs.append(evaluate(labels, est.fit(X).labels_))
    return {key: float(np.mean([r[key] for r in runs])) for key in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--settings", nargs="+", required=True, help="SPEC[@SIZE][+flip] ...")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=1, help="k-means seeds to average ACC over")
    parser.add_argument("--stores", type=Path, help="keep the stores here (a rerun reuses them: then the "
                        "extraction times are not measured)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    ds = load_dataset(args.dataset)
    print(f"# {args.dataset}: {len(ds)} images; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}")
    print("| setting | dim | extract s | img/s | k-means ACC | NMI | ACC (L2-normalised) |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for setting in args.settings:
        spec, size, flip = parse_setting(setting)
        with tempfile.TemporaryDirectory() as scratch:
            root = args.stores or scratch
            t0 = time.perf_counter()
            extractor = create_extractor(spec, image_size=size, flip_average=flip)
            load_s = time.perf_counter() - t0
            t1 = time.perf_counter()
            summary = extract_to_store(ds, extractor, Path(root), batch_size=args.batch_size, progress=False)
            extract_s = time.perf_counter() - t1
            table = read_embeddings(Path(summary.directory))
        plain = kmeans_scores(table.embeddings, table.labels, args.k, args.seeds)
        normed = kmeans_scores(l2_normalised(table.embeddings), table.labels, args.k, args.seeds)
        row = {"setting": setting, "dim": int(table.embeddings.shape[1]), "model_load_s": round(load_s, 2),
               "extract_s": round(extract_s, 1), "img_per_s": round(summary.rows / extract_s, 1),
               "acc": round(plain["acc"], 4), "nmi": round(plain["nmi"], 4), "acc_l2": round(normed["acc"], 4)}
        rows.append(row)
        print(f"| {setting} | {row['dim']} | {row['extract_s']} | {row['img_per_s']} | {row['acc']:.3f} | "
              f"{row['nmi']:.3f} | {row['acc_l2']:.3f} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
