"""Duplicate detection on planted copies: precision and recall per kind of alteration.

Builds a folder of CIFAR-10 test JPEGs (``--n``, 200 per class for 2,000) plus ``--exact``
byte-identical copies and ``--altered`` altered copies of other originals, split evenly over five
alterations: re-encoded at JPEG quality 50, resized x0.8, 10 % border crop, left-right flip,
brightness +15 %. It embeds the folder with gpuclust's extract stage and runs the duplicate
search of the explore stage at its default thresholds.

A reported pair is correct when both images come from the same original. Recall of a planted
copy: it lands in the same group as its original.

    python -m bench.duplicates --extractor raw
    python -m bench.duplicates --extractor efficientnet_lite0 --image-size 96
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

CIFAR_TAR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10_jpg" / "cifar10_test_jpg.tar.gz"
ALTERATIONS = ("quality50", "resize0.8", "crop10", "flip", "bright15")


def alter(data: bytes, kind: str) -> bytes:
    """One altered copy of a JPEG's bytes, as JPEG (quality 95 unless the alteration is quality 50)."""
    from PIL import Image, ImageEnhance, ImageOps

    im = Image.open(io.BytesIO(data)).convert("RGB")
    quality = 95
    if kind == "quality50":
        quality = 50
    elif kind == "resize0.8":
        im = im.resize((round(im.width * 0.8), round(im.height * 0.8)), Image.BICUBIC)
    elif kind == "crop10":
        dx, dy = round(im.width * 0.1), round(im.height * 0.1)
        im = im.crop((dx, dy, im.width - dx, im.height - dy))
    elif kind == "flip":
        im = ImageOps.mirror(im)
    elif kind == "bright15":
        im = ImageEnhance.Brightness(im).enhance(1.15)
    out = io.BytesIO()
    im.save(out, "JPEG", quality=quality)
    return out.getvalue()


def planted_folder(root: Path, n: int, exact: int, altered: int, seed: int = 0) -> dict[str, tuple[str, str]]:
    """Write the folder; returns {copy's image_id: (original's image_id, kind)}."""
    per_class = n // 10
    originals: list[tuple[str, bytes]] = []
    counts: dict[str, int] = {}
    with tarfile.open(CIFAR_TAR) as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) != 3 or counts.get(parts[1], 0) >= per_class:
                continue
            counts[parts[1]] = counts.get(parts[1], 0) + 1
            originals.append((f"{parts[1]}/{parts[2]}", tar.extractfile(member).read()))  # type: ignore[union-attr]
    for image_id, data in originals:
        (root / image_id).parent.mkdir(parents=True, exist_ok=True)
        (root / image_id).write_bytes(data)
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(originals), exact + altered, replace=False)
    planted: dict[str, tuple[str, str]] = {}
    (root / "planted").mkdir()
    for j, i in enumerate(chosen):
        image_id, data = originals[i]
        kind = "exact" if j < exact else ALTERATIONS[(j - exact) % len(ALTERATIONS)]
        copy_id = f"planted/{j:04d}-{kind}.jpg"
        (root / copy_id).write_bytes(data if kind == "exact" else alter(data, kind))
        planted[copy_id] = (image_id, kind)
    return planted


def cosine_profile(image_ids: list[str], embeddings: np.ndarray,
                   planted: dict[str, tuple[str, str]]) -> dict[str, list[float]]:
    """Centred cosine similarity percentiles (0, 5, 50): of each kind of copy to its original, and
    of each original to its nearest other original (what a threshold must stay above)."""
    from gpu_ops.explore.duplicates import centred

    Z = centred(embeddings)
    Z /= np.maximum(np.linalg.norm(Z, axis=1, keepdims=True), 1e-12)
    row = {i: r for r, i in enumerate(image_ids)}
    out: dict[str, list[float]] = {}
    for kind in ("exact", *ALTERATIONS):
        sims = [float(Z[row[c]] @ Z[row[o]]) for c, (o, k) in planted.items() if k == kind]
        if sims:
            out[kind] = [round(float(v), 4) for v in np.percentile(sims, [0, 5, 50])]
    originals = np.array([r for i, r in row.items() if i not in planted])
    S = Z[originals] @ Z[originals].T
    np.fill_diagonal(S, -1.0)
    out["distinct_nearest (p50, p99, p99.9, max)"] = [round(float(v), 4)
                                                      for v in np.percentile(S.max(axis=1), [50, 99, 99.9, 100])]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--exact", type=int, default=50)
    p.add_argument("--altered", type=int, default=200)
    p.add_argument("--extractor", default="raw")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--min-cosine", type=float, default=None, help="override the default threshold")
    p.add_argument("--phash-bits", type=int, default=None, help="override the default threshold")
    p.add_argument("--json", type=Path, help="append the result as one JSON line")
    args = p.parse_args()

    from gpu_ops.config import make_config
    from gpu_ops.data import load_dataset
    from gpu_ops.explore.duplicates import DuplicateSettings, embedding_neighbours, find_duplicates
    from gpu_ops.explore.scan import scan_items
    from gpu_ops.pipeline import extract_params, extract_stage
    from gpu_ops.store import read_embeddings

    with tempfile.TemporaryDirectory(prefix="gpuclust-dups-") as tmp:
        root = Path(tmp) / "images"
        planted = planted_folder(root, args.n, args.exact, args.altered)
        options = {"image_size": args.image_size} if args.image_size else {}
        cfg = make_config(dataset=f"folder:{root}", extractor=args.extractor, cache_dir=Path(tmp) / "cache", **options)
        t0 = time.perf_counter()
        store = extract_stage(extract_params(cfg), progress=False)
        t_extract = time.perf_counter() - t0
        table = read_embeddings(Path(store.store))
        t0 = time.perf_counter()
        scan = scan_items(load_dataset(cfg.dataset), table.image_ids)
        t_scan = time.perf_counter() - t0
        defaults = DuplicateSettings()
        settings = DuplicateSettings(phash_max_bits=args.phash_bits if args.phash_bits is not None else defaults.phash_max_bits,
                                     min_cosine=args.min_cosine if args.min_cosine is not None else defaults.min_cosine)
        t0 = time.perf_counter()
        neighbours = embedding_neighbours(table.embeddings, settings.neighbours, "cpu")
        found = find_duplicates(table.image_ids, scan, table.embeddings, neighbours, settings, "cpu")
        t_search = time.perf_counter() - t0
        similarity = cosine_profile(table.image_ids, table.embeddings, planted)

    def origin(image_id: str) -> str:
        return planted[image_id][0] if image_id in planted else image_id

    df = found.table.to_pandas()
    correct = (df["image_id_a"].map(origin) == df["image_id_b"].map(origin)).to_numpy()
    group_of = {i: g for a, b, g in zip(df["image_id_a"], df["image_id_b"], df["group"]) for i in (a, b)}
    result: dict[str, object] = {"extractor": args.extractor, "image_size": args.image_size, "n": len(table.image_ids),
                                 "phash_max_bits": settings.phash_max_bits, "min_cosine": settings.min_cosine,
                                 "pairs": len(df), "correct_pairs": int(correct.sum()),
                                 "precision": round(float(correct.mean()) if len(df) else 1.0, 4),
                                 "false_pairs_by_kind": df.loc[~correct, "kind"].value_counts().to_dict(),
                                 "false_pairs": df.loc[~correct, ["image_id_a", "image_id_b", "kind", "similarity"]]
                                 .head(10).values.tolist(),
                                 "seconds": {"extract": round(t_extract, 1), "scan": round(t_scan, 1),
                                             "search": round(t_search, 1)}}
    recall: dict[str, float] = {}
    for kind in ("exact", *ALTERATIONS):
        copies = [c for c, (_, k) in planted.items() if k == kind]
        if copies:
            hit = [c in group_of and group_of[c] == group_of.get(planted[c][0]) for c in copies]
            recall[kind] = round(float(np.mean(hit)), 4)
    result["recall"] = recall
    result["centred_cosine"] = similarity
    result["recall_all"] = round(float(np.mean([
        c in group_of and group_of[c] == group_of.get(o) for c, (o, _) in planted.items()])), 4)
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "a") as fh:
            fh.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
