"""Shared fixtures: an isolated Prefect home and cache per session, real data paths, a Prefect
test harness, a real `prefect server` on 127.0.0.1, and a CLI runner."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from gpu_ops.device import cuda_available, faiss_has_gpu, package_status

REPO = Path(__file__).resolve().parents[1]
_SESSION_DIR = Path(tempfile.mkdtemp(prefix="gpuclust-tests-"))
os.environ["PREFECT_HOME"] = str(_SESSION_DIR / "prefect-home")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "180"
os.environ["PREFECT_LOGGING_LEVEL"] = os.environ.get("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ["GPUCLUST_CACHE"] = str(_SESSION_DIR / "cache")
os.environ.pop("PREFECT_API_URL", None)


def shared_data() -> Path:
    """``../shared/data`` beside the checkout (or $GPUCLUST_DATA)."""
    for candidate in (os.environ.get("GPUCLUST_DATA"), REPO / "shared" / "data", REPO.parent / "shared" / "data"):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    pytest.skip("shared data directory not found (set GPUCLUST_DATA)")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return shared_data()


@pytest.fixture(scope="session")
def mnist_test(data_dir: Path):
    """MNIST test split: X (10000, 784) float32 in [0, 1], y (10000,) int32."""
    import numpy as np

    from gpu_ops.data import load_dataset

    ds = load_dataset(f"idx:{data_dir / 'mnist'}", "test")
    return ds.items.reshape(len(ds), -1).astype(np.float32) / 255.0, np.asarray(ds.labels)


@pytest.fixture(scope="session")
def cifar_folder(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200 real CIFAR-10 test JPEGs (20 per class) in class-named subfolders."""
    out = tmp_path_factory.mktemp("cifar")
    per_class: dict[str, int] = {}
    with tarfile.open(data_dir / "cifar10_jpg" / "cifar10_test_jpg.tar.gz") as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) != 3:
                continue
            if per_class.get(parts[1], 0) >= 20:
                continue
            per_class[parts[1]] = per_class.get(parts[1], 0) + 1
            target = out / parts[1] / parts[2]
            target.parent.mkdir(exist_ok=True)
            target.write_bytes(tar.extractfile(member).read())  # type: ignore[union-attr]
    return out


@pytest.fixture(scope="session")
def prefect_harness():
    """One Prefect test harness (temporary database + server) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory):
    """A real `prefect server start` on 127.0.0.1 with its own PREFECT_HOME; stopped by PID."""
    home = tmp_path_factory.mktemp("prefect-server-home")
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "false"}
    log = open(home / "server.log", "w")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"prefect server exited: {(home / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
    else:
        proc.kill()
        raise RuntimeError("prefect server did not become healthy in 180 s")
    yield {"url": url, "home": home, "pid": proc.pid}
    os.killpg(proc.pid, 15)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()
    log.close()


def run_cli(args: list[str], *, api_url: str | None = None, cwd: Path | None = None,
            timeout: int = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the installed ``gpuclust`` command; against ``api_url`` when given, else ephemeral.
    ``env``: variables set on top of this process's environment (e.g. a scratch ``HOME``)."""
    env = {**os.environ, **(env or {})}
    if api_url:
        env["PREFECT_API_URL"] = api_url
    exe = Path(sys.executable).parent / "gpuclust"
    return subprocess.run([str(exe), *args], capture_output=True, text=True, env=env, cwd=cwd or REPO, timeout=timeout)


# GPU tests (tests/gpu): skip with the reason where CUDA or the GPU packages are missing.
@pytest.fixture
def one_torch_thread():
    """One intra-op torch thread for the test: on a busy 2-core machine two OpenMP threads spin
    against each other and run several times slower than one."""
    import torch

    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="session")
def cuml_gpu() -> None:
    """Skip unless CUDA is visible and cuML imports."""
    if not cuda_available():
        pytest.skip("no CUDA device visible")
    # package_status catches every import failure (a broken CUDA install raises more than
    # ImportError), so the test skips with the reason instead of erroring.
    ok, why = package_status("cuml")
    if not ok:
        pytest.skip(why)


@pytest.fixture(scope="session")
def faiss_gpu() -> None:
    """Skip unless faiss is a GPU build and sees a GPU."""
    if not cuda_available():
        pytest.skip("no CUDA device visible")
    if not faiss_has_gpu():
        pytest.skip("faiss is not a GPU build, or it sees no GPU")
