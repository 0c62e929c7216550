"""One autoencoder pretraining epoch on a quiet machine, then beside one busy process, in one script.

Each epoch runs in a fresh worker process (the OpenMP wait policy is read once, when the runtime
loads): the conv autoencoder of the deep-clustering defaults (32-64-128 -> 10, batch 64, random
affine augmentation), on MNIST-test (10,000 images), at ``--threads`` torch threads. The busy
process is a pure-Python loop (``while True: pass``). Modes:

* ``spin``: the old behaviour, OpenMP threads spin at barriers (``GPUCLUST_OMP_WAIT=spin``);
* ``passive``: the default, ``import gpu_ops`` sets ``OMP_WAIT_POLICY=PASSIVE`` before torch loads.

    .venv/bin/python bench/load.py                       # both modes, 2 threads
    .venv/bin/python bench/load.py --modes passive --repeats 3

Prints the machine's load average, each epoch's seconds and the loaded / quiet ratio per mode.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = {"spin": {"GPUCLUST_OMP_WAIT": "spin"}, "passive": {}}


def worker(args: argparse.Namespace) -> int:
    """Train one epoch and print ``{"seconds": ...}`` as the last line of stdout."""
    sys.path.insert(0, str(ROOT))
    import numpy as np
    import torch

    import gpu_ops  # noqa: F401  (before torch: the OpenMP wait policy)
    from gpu_ops.data import load_dataset
    from gpu_ops.deep import train_autoencoder

    torch.set_num_threads(args.threads)
    ds = load_dataset(f"idx:{args.data}", "test")
    images = np.asarray(ds.items)[: args.n]
    _, hist = train_autoencoder(images, "conv", latent_dim=10, epochs=1, batch_size=64, seed=0, device="cpu",
                                progress=False, augment=True)
    record = next(h for h in hist if h["phase"] == "pretrain")
    print(json.dumps({"seconds": record["seconds"], "loss": record["loss"], "threads": torch.get_num_threads(),
                      "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}), flush=True)
    return 0


def run_epoch(mode: str, args: argparse.Namespace) -> dict:
    """One epoch in a fresh worker process of ``mode``; its JSON record plus the spin count torch's
    libgomp reported (``OMP_DISPLAY_ENV=VERBOSE``: 300000 by default, 0 with a passive wait policy)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GPUCLUST_OMP_WAIT")}
    env.update(MODES[mode], OMP_DISPLAY_ENV="VERBOSE", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--threads", str(args.threads),
           "--n", str(args.n), "--data", args.data]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"worker failed ({done.returncode}):\n{done.stderr[-3000:]}")
    record = json.loads(done.stdout.strip().splitlines()[-1])
    spins = re.findall(r"GOMP_SPINCOUNT = '(\d+)'", done.stdout + done.stderr)
    record["spincount"] = ",".join(sorted(set(spins))) or "?"
    return record


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default="spin,passive", help=f"comma list of {', '.join(MODES)}")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n", type=int, default=10_000, help="MNIST-test images per epoch")
    ap.add_argument("--repeats", type=int, default=1, help="epochs per condition (the median is reported)")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "mnist"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        if m not in MODES:
            ap.error(f"unknown mode {m!r}; expected some of: {', '.join(MODES)}")
    print(f"# {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"# cpus {os.cpu_count()}, torch threads {args.threads}, n {args.n}, repeats {args.repeats}", flush=True)
    rows = []
    for mode in modes:
        times: dict[str, list[float]] = {"quiet": [], "loaded": []}
        loads: dict[str, list[float]] = {"quiet": [], "loaded": []}
        spincount = "?"
        for _ in range(args.repeats):
            for condition in ("quiet", "loaded"):
                busy = None
                if condition == "loaded":
                    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
                    time.sleep(1.0)
                try:
                    loads[condition].append(os.getloadavg()[0])
                    rec = run_epoch(mode, args)
                finally:
                    if busy is not None:
                        busy.kill()
                        busy.wait()
                spincount = rec["spincount"]
                times[condition].append(rec["seconds"])
                print(f"{mode:8s} {condition:6s} epoch {rec['seconds']:7.1f} s  loss {rec['loss']:.4f}  "
                      f"load average {loads[condition][-1]:.2f}  GOMP_SPINCOUNT {spincount}", flush=True)
        quiet, loaded = statistics.median(times["quiet"]), statistics.median(times["loaded"])
        rows.append((mode, spincount, quiet, loaded, loaded / quiet, statistics.median(loads["quiet"]),
                     statistics.median(loads["loaded"])))
    print()
    print("| mode | libgomp spin count | quiet epoch s | beside a busy process s | ratio | load avg (quiet / loaded start) |")
    print("|---|---|---|---|---|---|")
    for mode, spincount, quiet, loaded, ratio, lq, ll in rows:
        print(f"| {mode} | {spincount} | {quiet:.1f} | {loaded:.1f} | {ratio:.2f}x | {lq:.2f} / {ll:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
