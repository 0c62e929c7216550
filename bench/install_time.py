"""`make install` with uv against pip alone, side by side in one run: each installer builds its own
fresh virtual environment from this checkout (`make install VENV=... INSTALLER=...`), timed from
the `venv` to the stamp, and the two environments' package sets are compared (they must be the same
releases; uv itself, pip and setuptools aside).

    python3 -m bench.install_time --out /tmp/install.json               # uv, then pip
    python3 -m bench.install_time --installers pip uv uv --out /tmp/install.json

Each install downloads what its installer has not kept: pip's cache stays empty behind an index
that sends no cache headers, uv keeps its wheels (``UV_CACHE_DIR``, default ``~/.cache/uv``).
``--cold-uv`` gives every uv install a new, empty uv cache (a machine that never ran uv).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
#: Packages that only one of the installers puts into the environment.
INSTALLER_PACKAGES = frozenset({"uv", "pip", "setuptools", "gpuclust"})


def package_set(python: Path) -> dict[str, str]:
    """The environment's distributions: canonical name -> version (installer packages left out)."""
    code = "import importlib.metadata as m, json; print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))"
    found = json.loads(subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout)
    named = {canonicalize_name(name): version for name, version in found.items()}
    return {name: version for name, version in named.items() if name not in INSTALLER_PACKAGES}


def timed_install(installer: str, venv: Path, env: dict[str, str]) -> dict:
    """`make install` into ``venv`` with ``installer``: wall and CPU seconds (the make and everything it ran)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.run(["make", "-s", "-B", "install", f"VENV={venv}", f"INSTALLER={installer}"], cwd=REPO, env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"make install INSTALLER={installer} failed:\n{proc.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    result = {"installer": installer, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
              "fell_back_to_pip": "uv could not install" in proc.stdout}
    if result["fell_back_to_pip"]:  # uv's own error lines (pip's warnings left out)
        result["uv_error"] = [line for line in proc.stderr.splitlines() if not line.startswith("WARNING")][-5:]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--installers", nargs="+", choices=("uv", "pip"), default=["uv", "pip"])
    parser.add_argument("--cold-uv", action="store_true", help="a new, empty uv cache for every uv install")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    results, sets = [], {}
    with tempfile.TemporaryDirectory(prefix="install-time-") as scratch:
        for i, installer in enumerate(args.installers):
            env = dict(os.environ)
            if installer == "uv" and args.cold_uv:
                env["UV_CACHE_DIR"] = str(Path(scratch) / f"uv-cache-{i}")
            venv = Path(scratch) / f"venv-{i}-{installer}"
            result = timed_install(installer, venv, env)
            sets[i] = package_set(venv / "bin" / "python")
            result["packages"] = len(sets[i])
            result["same_set_as_first"] = sets[i] == sets[0]
            if not result["same_set_as_first"]:
                result["differs"] = sorted(set(sets[i].items()) ^ set(sets[0].items()))
            results.append(result)
            print(json.dumps(result), flush=True)
            shutil.rmtree(venv)
    args.out.write_text(json.dumps({"cold_uv": args.cold_uv, "runs": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
