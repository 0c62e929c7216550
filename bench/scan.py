"""The explore stage's item scan: seconds per dataset for ``scan_items`` (hashes of a chunk in one
vectorised DCT, threads only for photo files) beside the reference it replaced (``imagehash.phash``
of each image and view, up to 8 threads), in one process, with a check that both give the same bits.

    python -m bench.scan --mnist ../shared/data/mnist --folder DIR_OF_JPEGS --photos 150
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

import gpu_ops  # noqa: F401
from gpu_ops.data import load_dataset
from gpu_ops.explore.scan import MEASURE_MAX_SIDE, VIEWS, grey_measures, scan_items, view


def reference_hashes(dataset, threads: int) -> np.ndarray:
    """(n, 1 + len(VIEWS), 64) bits by ``imagehash.phash`` per image and view, with the content hash and
    grey measures of each image: the scan as it was before."""
    import imagehash
    from PIL import Image

    def one(i: int) -> np.ndarray:
        if getattr(dataset, "paths", None) is not None:  # the same content hash and grey measures as the scan
            hashlib.sha256(dataset.paths[i].read_bytes()).digest()
        rgb = np.asarray(Image.fromarray(np.asarray(dataset.load(i), np.uint8)).convert("RGB"))
        grey_measures(rgb)
        image = Image.fromarray(rgb)
        image.thumbnail((MEASURE_MAX_SIDE, MEASURE_MAX_SIDE), Image.BILINEAR)
        hashes = [imagehash.phash(image)] + [imagehash.phash(view(image, name, cut)) for name, cut in VIEWS]
        return np.stack([h.hash.reshape(-1) for h in hashes]).astype(np.uint8)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        return np.stack(list(pool.map(one, range(len(dataset)))))


def photos(source: Path, count: int, out: Path) -> Path:
    """``count`` 1600 x 1200 JPEGs (upscaled from ``source``'s images, noise added) in ``out``."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i, path in enumerate(sorted(p for p in source.rglob("*.jpg"))[:count]):
        a = np.asarray(Image.open(path).convert("RGB").resize((1600, 1200), Image.BICUBIC), np.int16)
        a = np.clip(a + rng.integers(-8, 8, a.shape), 0, 255).astype(np.uint8)
        Image.fromarray(a).save(out / f"{i:04d}.jpg", quality=90)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mnist", type=Path, required=True, help="MNIST IDX folder (its 10,000 test digits)")
    parser.add_argument("--folder", type=Path, required=True, help="a folder of small JPEGs (e.g. CIFAR-10 test)")
    parser.add_argument("--limit", type=int, default=3000, help="JPEGs of --folder scanned")
    parser.add_argument("--photos", type=int, default=150, help="1600 x 1200 photos made from --folder")
    args = parser.parse_args()
    print(f"# {platform.node()} {os.cpu_count()} cores, python {platform.python_version()}")
    print("| dataset | items | scan_items s | reference s (imagehash, min(8, cores) threads) | speed-up | same bits |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        sets = [("MNIST test digits", f"idx:{args.mnist}", "test", None),
                ("small JPEGs", f"folder:{args.folder}", "all", args.limit),
                ("1600 x 1200 photos", f"folder:{photos(args.folder, args.photos, Path(tmp))}", "all", None)]
        for name, spec, split, limit in sets:
            dataset = load_dataset(spec, split, limit)
            t0 = time.perf_counter()
            scan = scan_items(dataset, dataset.image_ids)
            t1 = time.perf_counter()
            bits = reference_hashes(dataset, min(8, os.cpu_count() or 1))
            t2 = time.perf_counter()
            same = bool((bits[:, 0] == scan.phash).all() and (bits[:, 1:] == scan.phash_views).all())
            print(f"| {name} | {len(dataset)} | {t1 - t0:.2f} | {t2 - t1:.2f} | {(t2 - t1) / (t1 - t0):.1f}x | {same} |",
                  flush=True)


if __name__ == "__main__":
    main()
