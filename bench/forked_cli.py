"""A small `gpuclust run` as the test suite starts it: a fresh ``gpuclust`` process against a running
Prefect server, side by side with the same command forked from tests/forked_cli.py's forker, in
one run (alternating, so both see the same machine).

    .venv/bin/python -m bench.forked_cli --repeats 4

Prints each run's wall seconds and, per way, the median; the fresh process's CPU seconds too (a
forked child is reaped by the forker, so its CPU time is not visible here).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from forked_cli import CommandForker  # noqa: E402

RUN = ["run", "--dataset", "digits", "--limit", "300", "--algorithm", "kmeans", "--k", "10", "--reducer", "pca",
       "--no-explore"]


def start_server(home: Path) -> tuple[subprocess.Popen, str]:
    """A `prefect server start` on a free 127.0.0.1 port with its own home; healthy on return."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_UI_ENABLED": "false",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    proc = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/api"
    for _ in range(240):
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("prefect server did not start in 120 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="bench-forked-"))
    env = {**os.environ, "PREFECT_HOME": str(scratch / "home"), "GPUCLUST_CACHE": str(scratch / "cache")}
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):  # as `make test` runs
        env.setdefault(name, "1")
    server, url = start_server(scratch / "server-home")
    env["PREFECT_API_URL"] = url
    forker = CommandForker(env, scratch / "forker.log")
    walls: dict[str, list[float]] = {"fresh": [], "forked": []}
    try:
        forker.prepared_environ()  # its imports, once
        for i in range(args.repeats):
            before = os.times()
            start = time.perf_counter()
            fresh = subprocess.run([str(Path(sys.executable).parent / "gpuclust"), *RUN, "--out",
                                    str(scratch / f"fresh{i}")], capture_output=True, text=True, env=env, cwd=REPO)
            walls["fresh"].append(time.perf_counter() - start)
            after = os.times()
            cpu = after.children_user + after.children_system - before.children_user - before.children_system
            start = time.perf_counter()
            forked = forker.run([*RUN, "--out", str(scratch / f"forked{i}")], env, REPO, scratch, 600)
            walls["forked"].append(time.perf_counter() - start)
            assert fresh.returncode == 0 and forked is not None and forked.returncode == 0, (fresh.stderr, forked)
            print(f"run {i}: fresh {walls['fresh'][-1]:.2f} s ({cpu:.2f} CPU-s), forked {walls['forked'][-1]:.2f} s")
    finally:
        forker.close()
        server.terminate()
        server.wait()
    for way, values in walls.items():
        print(f"{way}: median {statistics.median(values):.2f} s over {len(values)} runs")


if __name__ == "__main__":
    main()
