"""Pretrained networks on the CPU: images per second, user/kernel CPU seconds and page faults when a
loader batch goes through the network whole or in chunks (``CPU_CHUNK_ROWS``), side by side.

    python -m bench.cpu_chunks --extractor efficientnet_lite0+efficientnet_lite2 --sizes 128 192 --chunks 64 8
"""

from __future__ import annotations

import argparse
import platform
import resource
import time

import torch

import gpu_ops  # noqa: F401  (sets the thread wait policy before torch runs)
from gpu_ops.features import create_extractor


def parts_of(extractor) -> list:
    """The networks of ``extractor`` (each part of a combination)."""
    return list(getattr(extractor, "parts", [extractor]))


def time_chunks(extractor, batch: torch.Tensor, chunk: int, batch_size: int) -> dict[str, float]:
    """Run ``batch`` (n, 3, s, s) through every network of ``extractor`` in loader batches of
    ``batch_size``, each split into ``chunk`` images per forward pass."""
    before, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(batch), batch_size):
            for net in parts_of(extractor):
                for piece in batch[start:start + batch_size].split(chunk):
                    net.model(piece)
    seconds, after = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    return {"img_s": len(batch) / seconds, "user_s": after.ru_utime - before.ru_utime,
            "sys_s": after.ru_stime - before.ru_stime, "faults": after.ru_minflt - before.ru_minflt}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--extractor", default="efficientnet_lite0+efficientnet_lite2")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 192])
    parser.add_argument("--chunks", type=int, nargs="+", default=[64, 8])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--n", type=int, default=256, help="images per measurement (random pixels)")
    args = parser.parse_args()
    print(f"# {args.extractor}, {args.n} images, loader batch {args.batch_size}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.machine()}")
    print("| size | chunk | img/s | user s | kernel s | page faults |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes:
        extractor = create_extractor(args.extractor, image_size=size, weights="none")
        batch = torch.randn(args.n, 3, size, size)
        time_chunks(extractor, batch[:args.batch_size], args.chunks[0], args.batch_size)  # warm-up
        for chunk in args.chunks:
            r = time_chunks(extractor, batch, chunk, args.batch_size)
            print(f"| {size} | {chunk} | {r['img_s']:.1f} | {r['user_s']:.1f} | {r['sys_s']:.1f} | {r['faults']:,} |",
                  flush=True)


if __name__ == "__main__":
    main()
