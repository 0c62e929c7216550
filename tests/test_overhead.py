"""What a small run pays besides its stages: the packages the real `gpuclust` process imports
(recorded by tests/import_probe/sitecustomize.py), and which Prefect API it uses:
PREFECT_API_URL (checked), a server from `gpuclust server start`, or ephemeral mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import REPO, free_port, run_cli

PROBE = REPO / "tests" / "import_probe"
#: Packages a raw-pixel or Parquet-embedding k-means run has no use for.
NOT_NEEDED = ("torch", "torchvision", "timm", "umap", "openTSNE", "plotly", "numba")
FAST_RUN = ["--extractor", "raw", "--algorithm", "kmeans", "--reducer", "none", "--no-explore"]


def _probed_run(args: list[str], probe_dir: Path, api_url: str | None) -> tuple[subprocess.CompletedProcess, dict]:
    """Run the real CLI with the import probe; the gpuclust process's record."""
    probe_dir.mkdir()
    env = {"PYTHONPATH": os.pathsep.join([str(PROBE), os.environ.get("PYTHONPATH", "")]),
           "GPUCLUST_IMPORT_PROBE": str(probe_dir)}
    result = run_cli(args, api_url=api_url, env=env)
    records = [json.loads(p.read_text()) for p in probe_dir.glob("*.json")]
    mine = [r for r in records if Path(r["argv"][0]).name == "gpuclust"]
    assert len(mine) == 1, records
    return result, mine[0]["imports"]


def _digits_parquet(directory: Path) -> Path:
    """Digits as 64-d float32 embeddings with labels, in the store's Parquet format."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    emb = bunch.data.astype(np.float32) / 16.0
    directory.mkdir()
    pq.write_table(pa.table({
        "image_id": [f"d{i:04d}" for i in range(len(emb))],
        "label": pa.array(bunch.target.astype(np.int32)),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), emb.shape[1]),
    }), directory / "part-00000.parquet")
    return directory


@pytest.mark.parametrize("dataset", ["digits", "parquet", "folder"])
def test_raw_and_parquet_runs_import_no_torch_and_matplotlib_only_in_the_report(prefect_server, tmp_path, dataset,
                                                                                 request):
    specs = {"digits": lambda: "digits", "parquet": lambda: f"parquet:{_digits_parquet(tmp_path / 'emb')}",
             "folder": lambda: f"folder:{request.getfixturevalue('cifar_folder')}"}
    result, imports = _probed_run(["run", "--dataset", specs[dataset](), *FAST_RUN, "--out", str(tmp_path / "run")],
                                  tmp_path / "probe", prefect_server["url"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["n"] == (200 if dataset == "folder" else 1797)
    assert result.stdout.splitlines()[0] == f"Prefect: server at {prefect_server['url']}"
    assert [name for name in NOT_NEEDED if name in imports] == [], {n: imports[n] for n in NOT_NEEDED if n in imports}
    # matplotlib is first imported inside the report task, and only there
    assert "flows/tasks.py:build_report" in imports["matplotlib"], imports["matplotlib"]
    assert "prefect" in imports and "faiss" in imports  # the probe sees what the run needs


def test_unreachable_prefect_api_url_stops_with_one_line(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/api"  # nothing listens there
    started = time.monotonic()
    result = run_cli(["run", *FAST_RUN, "--out", str(tmp_path / "run")], api_url=url)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        f"gpuclust: error: PREFECT_API_URL={url} does not answer ([Errno 111] Connection refused); start that "
        "server (or `gpuclust server start`), or unset PREFECT_API_URL to run without one"]
    assert result.stdout == "" and not (tmp_path / "run").exists()
    assert time.monotonic() - started < 120  # no waiting for a server that is not there


def _flow_runs(api_url: str) -> list[dict]:
    request = urllib.request.Request(f"{api_url}/flow_runs/filter", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_server_start_is_used_by_later_runs_and_stop_leaves_no_process(tmp_path):
    home = tmp_path / "prefect-home"
    env = {"PREFECT_HOME": str(home), "PREFECT_UI_ENABLED": "false"}
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    state = home / "gpuclust-server.json"
    pid = None
    try:
        started = run_cli(["server", "start", "--port", str(port)], env=env, timeout=300)
        assert started.returncode == 0, started.stderr[-2000:]
        pid = json.loads(state.read_text())["pid"]
        assert started.stdout.strip() == (f"started Prefect server at {url} (pid {pid}); "
                                          f"log: {home / 'gpuclust-server.log'}")
        assert psutil.Process(pid).cmdline()[1:4] == ["-m", "prefect", "server"]
        again = run_cli(["server", "start", "--port", str(port)], env=env)
        assert again.returncode == 0 and again.stdout.startswith(f"already running: Prefect server at {url} (pid {pid})")
        status = run_cli(["server", "status"], env=env)
        assert status.returncode == 0 and status.stdout.startswith(f"running at {url} (pid {pid}, answering)")

        run = run_cli(["run", *FAST_RUN, "--limit", "300", "--out", str(tmp_path / "run")], env=env, shared_server=False)
        assert run.returncode == 0, run.stderr[-3000:]
        assert run.stdout.splitlines()[0] == f"Prefect: server at {url} (started by `gpuclust server start`)"
        runs = _flow_runs(url)
        assert [(r["flow_id"] is not None, r["state_type"]) for r in runs] == [(True, "COMPLETED")]

        stopped = run_cli(["server", "stop"], env=env)
        assert stopped.returncode == 0 and stopped.stdout.strip() == f"stopped the Prefect server at {url} (pid {pid})"
        assert not state.exists()
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        with pytest.raises(OSError):
            urllib.request.urlopen(f"{url}/health", timeout=2)
        status = run_cli(["server", "status"], env=env)
        assert status.returncode == 1 and status.stdout.strip() == f"not running (no {state})"
    finally:
        if pid is not None and psutil.pid_exists(pid):
            try:
                os.killpg(pid, 9)
            except ProcessLookupError:
                pass


def test_stale_server_record_is_removed_and_the_run_says_ephemeral_mode(tmp_path):
    home = tmp_path / "prefect-home"
    home.mkdir()
    state = home / "gpuclust-server.json"
    # this test's own pid with another start time: a pid reused by another process
    state.write_text(json.dumps({"pid": os.getpid(), "url": "http://127.0.0.1:9/api", "log": "x", "started": 1.0}))
    run = run_cli(["run", *FAST_RUN, "--limit", "300", "--out", str(tmp_path / "run")],
                  env={"PREFECT_HOME": str(home)}, shared_server=False)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"gpuclust: removed stale {state}: its server (pid {os.getpid()}) is not running" in run.stderr
    assert run.stdout.splitlines()[0] == ("Prefect: ephemeral mode (a temporary server for this run; "
                                          "`gpuclust server start` keeps one)")
    assert not state.exists() and psutil.pid_exists(os.getpid())
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["n"] == 300


def test_digits_read_without_scikit_learn_match_load_digits(tmp_path):
    code = ("import sys; import numpy as np; from gpu_ops.data import load_dataset; "
            "ds = load_dataset('digits', 'all', None); np.savez(sys.argv[1], items=ds.items, labels=ds.labels); "
            "print('sklearn' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "d.npz")], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
    from sklearn.datasets import load_digits

    from gpu_ops.data.base import to_uint8_images

    bunch = load_digits()
    got = np.load(tmp_path / "d.npz")
    np.testing.assert_array_equal(got["labels"], bunch.target.astype(np.int32))
    np.testing.assert_array_equal(got["items"], to_uint8_images(bunch.images / 16.0, "digits"))


@pytest.mark.parametrize("env, expected", [({}, "None"), ({"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "60"}, "60")])
def test_a_run_in_the_terminal_sends_heartbeats_only_when_asked(env, expected):
    """Prefect's heartbeat thread keeps a finished flow waiting up to a second: `gpuclust run`
    turns heartbeats off unless the user set their frequency, which it then keeps."""
    probe = ("from flows.api_server import foreground_run_settings\n"
             "from prefect.settings import get_current_settings\n"
             "with foreground_run_settings():\n"
             "    print(get_current_settings().flows.heartbeat_frequency)\n")
    clean = {k: v for k, v in os.environ.items() if "HEARTBEAT" not in k}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO,
                         env={**clean, **env, "PYTHONPATH": str(REPO)}, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == expected
