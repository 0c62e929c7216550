"""`run_cli`'s forked commands (tests/forked_cli.py) behave as the installed `gpuclust` script does:
the same exit status, output and run directory; the variables a test changes reach them; any other
change of environment makes them a plain subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, command_forker, shared_prefect_server
from forked_cli import CommandForker, unsafe_threads

SMALL_RUN = ["run", "--dataset", "digits", "--limit", "300", "--algorithm", "kmeans", "--k", "10", "--reducer", "pca",
             "--no-explore"]


def _installed(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "gpuclust"), *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=600)


@pytest.fixture(scope="module")
def forker() -> CommandForker:
    forker = command_forker()
    if not forker.usable():
        pytest.skip(f"this process's command forker does not fork: {forker.refused}")
    return forker


def test_a_forked_command_matches_the_installed_script(forker, tmp_path):
    env = {**forker.env, "PREFECT_API_URL": shared_prefect_server()["url"]}
    assert forker.serves(env)
    bad = ["run", "--k", "ten", "--out", str(tmp_path / "bad")]
    forked, installed = forker.run(bad, env, REPO, tmp_path, 600), _installed(bad, env)
    assert (forked.returncode, forked.stdout, forked.stderr) == (installed.returncode, installed.stdout,
                                                                 installed.stderr)
    assert forked.returncode == 2 and forked.stderr == "gpuclust: error: --k must be a positive integer or auto; got 'ten'\n"

    runs = {}
    for how in ("forked", "installed"):
        out = tmp_path / how
        args = [*SMALL_RUN, "--out", str(out)]
        result = forker.run(args, env, REPO, tmp_path, 600) if how == "forked" else _installed(args, env)
        assert result.returncode == 0, result.stderr[-2000:]
        runs[how] = json.loads((out / "metrics.json").read_text())["algorithms"]["kmeans"]
        assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tmp_path / "forked").iterdir())
    assert runs["forked"]["acc"] == runs["installed"]["acc"] >= 0.8


def test_a_cache_variable_reaches_the_forked_command_and_other_variables_do_not_fork(forker, tmp_path):
    cache = tmp_path / "cache-file"
    cache.write_text("not a folder")
    env = {**forker.env, "PREFECT_API_URL": shared_prefect_server()["url"], "GPUCLUST_CACHE": str(cache)}
    assert forker.serves(env)
    result = forker.run([*SMALL_RUN, "--out", str(tmp_path / "run")], env, REPO, tmp_path, 600)
    assert result.returncode == 2 and str(cache) in result.stderr, result.stderr
    assert not forker.serves({**env, "OMP_NUM_THREADS": "7"})
    # gpu_ops sets OMP_WAIT_POLICY on import unless it is set: the forker's is not this command's
    assert forker.prepared_environ()["OMP_WAIT_POLICY"] == "PASSIVE"
    assert not forker.serves({**env, "OMP_WAIT_POLICY": "ACTIVE"})
    # defaults the forker's imports set (the command's own imports would set them too)
    for name in forker.prepared_environ().keys() - forker.env.keys():
        assert name not in env and forker.serves(env)
    assert not forker.serves({**env, "PREFECT_API_URL": "http://127.0.0.1:1/api"})


THREAD_PROBE = """
import sys, threading
sys.path.insert(0, sys.argv[1])
from forked_cli import unsafe_threads
counts = [len(unsafe_threads())]
import pyarrow  # starts jemalloc's background thread, which allows a fork
counts.append(len(unsafe_threads()))
stop = threading.Event()
threading.Thread(target=stop.wait).start()
counts.append(len(unsafe_threads()))
stop.set()
print(counts)
"""


def test_a_thread_started_anywhere_counts_against_forking():
    """The forker reads its threads from the kernel: jemalloc's is allowed, any other one is not."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", THREAD_PROBE, str(REPO / "tests")], capture_output=True,
                            text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[0, 0, 1]"
