"""Shared fixtures: an isolated Prefect home and cache per session, real data paths, ONE real
`prefect server` on 127.0.0.1 per test process (each xdist worker), and a CLI runner.

Starting a Prefect server costs 10-20 s on a busy 2-core machine, so every test in a process
shares one: `run_cli` points the flow commands at it and the `prefect_server` fixture hands it
out. A test about ephemeral mode (no server configured) says so with
``run_cli(..., shared_server=False)``. Each flow command against the shared server is forked from
a process that has imported its modules once (tests/forked_cli.py): a small run then takes about
3 s instead of 5 (bench/forked_cli.py). `prefect_harness` stays Prefect's own test harness, for flows called in this
process."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
from pathlib import Path

import pytest

# As many xdist workers as cores (`make test`): each worker, and every process it starts, computes
# on one thread. Native libraries otherwise start a thread per core in every worker, and the
# threads of one worker wait on each other while the other worker holds a core. Set here, before
# numpy, torch or FAISS load.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) >= (os.cpu_count() or 1):
    for _threads_var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(_threads_var, "1")

from forked_cli import CommandForker
import prefect_home
from prefect_home import die_with_parent, free_port
from gpu_ops.device import cuda_available, faiss_has_gpu, package_status
from test_install_routes import PID_FILE as PIP_PID_FILE, RESOLUTION_VAR as PIP_RESOLUTION_VAR

REPO = Path(__file__).resolve().parents[1]
# One scratch directory per pytest process (each xdist worker has its own). This file may be
# imported twice (as ``conftest`` and as ``tests.conftest``): the second import keeps the first's.
_owner, _, _dir = os.environ.get("GPUCLUST_TEST_SESSION_DIR", "").partition(":")
_SESSION_DIR = Path(_dir) if _owner == str(os.getpid()) else Path(tempfile.mkdtemp(prefix="gpuclust-tests-"))
if _owner != str(os.getpid()):  # made here: removed when this process exits (the shared server stopped before)
    atexit.register(shutil.rmtree, _SESSION_DIR, True)
os.environ["GPUCLUST_TEST_SESSION_DIR"] = f"{os.getpid()}:{_SESSION_DIR}"
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


#: This test process's shared `prefect server`, as JSON {"owner", "pid", "url", "home"}. Kept in the
#: environment, not in a module global: this file is imported both as ``conftest`` and as
#: ``tests.conftest``, and both copies must find the one server. ``owner`` is the pytest process
#: (each xdist worker has its own server); the CLI subprocesses inherit the variable and ignore it.
_SERVER_VAR = "GPUCLUST_TEST_PREFECT_SERVER"
_LAUNCHED: list[subprocess.Popen] = []
#: Background services of the shared server that no test here uses (schedules, automations,
#: late or paused runs, workers' heartbeats): each wakes up every few seconds for the whole
#: session. A test that needs them starts its own server (tests/test_deploy.py).
IDLE_SERVICES_OFF = {f"PREFECT_SERVER_SERVICES_{name}_ENABLED": "false" for name in (
    "SCHEDULER", "LATE_RUNS", "PAUSE_EXPIRATIONS", "CANCELLATION_CLEANUP", "FOREMAN", "REPOSSESSOR", "TRIGGERS",
    "DB_VACUUM")}
#: The session's migrated Prefect home (tests/prefect_home.py), built by the first pytest process.
PREFECT_TEMPLATE_VAR = "GPUCLUST_TEST_PREFECT_TEMPLATE"
#: Commands that run a Prefect flow (the others never need an API).
FLOW_COMMANDS = ("run", "assign")


def _server_record() -> dict | None:
    raw = os.environ.get(_SERVER_VAR)
    record = json.loads(raw) if raw else None
    return record if record and record["owner"] == os.getpid() else None


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def launch_prefect_server() -> dict:
    """Start this process's shared `prefect server` on 127.0.0.1 (own PREFECT_HOME and SQLite
    database) without waiting for it; a second call returns the same one."""
    record = _server_record()
    if record:
        return record
    home = Path(tempfile.mkdtemp(prefix="prefect-server-home-", dir=_SESSION_DIR))
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "false", **IDLE_SERVICES_OFF}
    env.pop("PREFECT_API_URL", None)
    command = [str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    template = prefect_home_template()
    if template:  # seeded from the template by the server's own process, which then becomes the server
        command = [sys.executable, str(Path(prefect_home.__file__)), "seed", str(template), str(home), *command]
    with open(home / "server.log", "w") as log:
        proc = subprocess.Popen(command,
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=die_with_parent())
    _LAUNCHED.append(proc)  # keeps the Popen (and its exit status) alive
    record = {"owner": os.getpid(), "pid": proc.pid, "url": f"http://127.0.0.1:{port}/api", "home": str(home)}
    os.environ[_SERVER_VAR] = json.dumps(record)
    return record


def shared_prefect_server() -> dict:
    """This process's shared `prefect server` (one per xdist worker), started on first use and
    healthy on return: {"url", "home", "pid"}. Stopped by PID when the session ends."""
    record = launch_prefect_server()
    if record.get("ready"):
        return record
    prefect_home.wait_until_healthy(record["url"], lambda: _alive(record["pid"]), Path(record["home"]) / "server.log")
    record["ready"] = True
    os.environ[_SERVER_VAR] = json.dumps(record)
    return record


def _stop_shared_prefect_server() -> None:
    record = _server_record()
    if not record:
        return
    import psutil

    del os.environ[_SERVER_VAR]
    for signum, wait in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(record["pid"], signum)
            psutil.Process(record["pid"]).wait(timeout=wait)
            return
        except (ProcessLookupError, psutil.NoSuchProcess):
            return
        except psutil.TimeoutExpired:
            continue


def _needs_server(item: pytest.Item) -> bool:
    fixtures = set(getattr(item, "fixturenames", ()))
    return "prefect_server" in fixtures or callable(getattr(getattr(item, "module", None), "run_cli", None))


#: Rough seconds each test file takes on a quiet 2-core machine. `make test` hands whole files to
#: two workers in collection order (`--dist loadfile --no-loadscope-reorder`); the heaviest go
#: first, so neither worker is left alone with a long file at the end. Unlisted files count as
#: DEFAULT_FILE_SECONDS; list a new file here once it takes more than about ten seconds.
FILE_SECONDS = {
    "test_stopping.py": 85, "test_incremental.py": 75, "test_cli.py": 65, "test_similar_assign.py": 60,
    "test_deep.py": 60, "test_bounded.py": 50, "test_heads.py": 50, "test_cluster_scale.py": 50,
    "test_parity.py": 45, "test_overhead.py": 45, "test_deploy.py": 45, "test_backbones.py": 45, "test_dask.py": 40,
    "test_report.py": 35, "test_store.py": 30, "test_report_map.py": 25, "test_rundir.py": 25,
    "test_deep_robust.py": 25, "test_store_integrity.py": 17, "test_flow.py": 16, "test_explore.py": 15,
    "test_quality.py": 14, "test_slurm.py": 13, "test_config_checks.py": 12, "test_forked_cli.py": 12,
    "test_stages.py": 11,
    # last: it reads the GPU extras' pip resolution, started in the background when the session began
    "test_install_routes.py": 0,
}
DEFAULT_FILE_SECONDS = 5


_PIP_RESOLUTION_TESTS = REPO / "tests" / "test_install_routes.py"


def _selects_pip_resolution(config: pytest.Config) -> bool:
    """Whether the command line's paths include tests/test_install_routes.py (a file or a folder above it)."""
    for arg in config.args or [str(config.rootpath)]:
        path = (config.invocation_params.dir / arg.split("::")[0]).resolve()
        if path == _PIP_RESOLUTION_TESTS or path in _PIP_RESOLUTION_TESTS.parents:
            return True
    return False


def pytest_configure(config: pytest.Config) -> None:
    """Under xdist, the controller starts in the background the migrated Prefect home that fresh homes
    are seeded from, the compilation of umap-learn's kernels (tests/warm_umap.py), and the GPU extras'
    pip resolution (about 1-3 minutes, nearly all of it waiting on the package index), so the test
    process that runs tests/test_install_routes.py finds it done instead of waiting for it."""
    xdist_controller = (getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput")
                        and not config.option.collectonly)
    if xdist_controller and PREFECT_TEMPLATE_VAR not in os.environ:
        _start_prefect_home_template()
        _start_umap_warmup()
    if not xdist_controller or PIP_RESOLUTION_VAR in os.environ or not _selects_pip_resolution(config):
        return
    directory = Path(tempfile.mkdtemp(prefix="pip-resolution-", dir=_SESSION_DIR))
    with open(directory / "resolve.log", "w") as log:
        _LAUNCHED.append(subprocess.Popen([sys.executable, str(_PIP_RESOLUTION_TESTS), str(directory)],
                                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                          preexec_fn=die_with_parent()))
    (directory / PIP_PID_FILE).write_text(str(_LAUNCHED[-1].pid))  # the fixture sees it end
    os.environ[PIP_RESOLUTION_VAR] = str(directory)  # the workers inherit it


def _start_prefect_home_template() -> None:
    """Build the migrated Prefect home that fresh homes are seeded from (tests/prefect_home.py), in
    the background; the test processes inherit where."""
    directory = Path(tempfile.mkdtemp(prefix="prefect-home-template-", dir=_SESSION_DIR))
    with open(directory / "build.log", "w") as log:
        _LAUNCHED.append(subprocess.Popen([sys.executable, prefect_home.__file__, "build", str(directory)],
                                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                          preexec_fn=die_with_parent()))
    os.environ[PREFECT_TEMPLATE_VAR] = str(directory)


def _start_umap_warmup() -> None:
    """Compile umap-learn's kernels into numba's cache once, in the background (tests/warm_umap.py)."""
    with open(Path(tempfile.mkdtemp(prefix="umap-warmup-", dir=_SESSION_DIR)) / "warmup.log", "w") as log:
        _LAUNCHED.append(subprocess.Popen([sys.executable, str(REPO / "tests" / "warm_umap.py")], cwd=REPO,
                                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                          preexec_fn=die_with_parent()))


def prefect_home_template() -> Path | None:
    """The session's migrated Prefect home (None when the session builds none: without xdist)."""
    directory = os.environ.get(PREFECT_TEMPLATE_VAR)
    return Path(directory) if directory else None


def seed_prefect_home(home: Path) -> None:
    """Give a fresh Prefect home (no database yet) the template's migrated database."""
    prefect_home.seed(home, prefect_home_template())


def pytest_unconfigure(config: pytest.Config) -> None:
    """Stop a background pip resolution the session did not wait for (deselected or interrupted)."""
    directory = os.environ.pop(PIP_RESOLUTION_VAR, None)
    for proc in _LAUNCHED:
        if directory and proc.args[-1] == directory and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """Heaviest files first (see FILE_SECONDS; the order within a file is kept); boot the shared
    server and the command forker while the first tests run when any collected test may use them."""
    weight = {item: FILE_SECONDS.get(item.path.name, DEFAULT_FILE_SECONDS) for item in items}
    items.sort(key=lambda item: -weight[item])  # a stable sort: files stay contiguous and in order
    if not config.option.collectonly and any(_needs_server(item) for item in items):
        launch_prefect_server()
        command_forker()


@pytest.fixture(scope="session", autouse=True)
def _shared_prefect_server_stops():
    yield
    for forker in _FORKERS:
        forker.close()
    _stop_shared_prefect_server()


#: Variables the harness itself sets while tests run (pytest's own, the shared server's record).
_HARNESS_VARIABLES = frozenset({"PYTEST_CURRENT_TEST", _SERVER_VAR, PIP_RESOLUTION_VAR, PREFECT_TEMPLATE_VAR})


@pytest.fixture(autouse=True)
def _environment_restored():
    """Each test leaves ``os.environ`` as it found it. A process-based Dask cluster that a test starts
    itself leaves variables in the process that starts it (its Nanny sets PYTHONHASHSEED and
    MALLOC_TRIM_THRESHOLD_ there for good; gpuclust's own clusters put them back): later commands
    would inherit them, and could not fork from the command forker."""
    before = dict(os.environ)
    yield
    for name in set(os.environ) - set(before) - _HARNESS_VARIABLES:
        del os.environ[name]
    for name, value in before.items():
        if os.environ.get(name) != value and name not in _HARNESS_VARIABLES:
            os.environ[name] = value


@pytest.fixture(scope="session")
def prefect_server() -> dict:
    """A real `prefect server start` on 127.0.0.1 with its own PREFECT_HOME (this process's
    shared server)."""
    return shared_prefect_server()


@pytest.fixture(scope="session")
def prefect_harness():
    """One Prefect test harness (temporary database + server) for the whole session. Not the shared
    server: tests/test_flow.py reads a flow's task runs back as soon as it returns, and the shared
    server had not always recorded them yet."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def run_cli(args: list[str], *, api_url: str | None = None, shared_server: bool = True, cwd: Path | None = None,
            timeout: int = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the installed ``gpuclust`` command.

    Flow commands (``run``, ``assign``) run against ``api_url`` (or a ``PREFECT_API_URL`` in
    ``env``), else against this process's shared Prefect server. ``shared_server=False``: no
    PREFECT_API_URL at all, what a user who configured none gets (ephemeral mode: the command
    starts a server of its own). ``env``: variables set on top of this process's environment
    (e.g. a scratch ``HOME``). A flow command against the shared server is forked from
    :func:`command_forker` where its environment allows (see tests/forked_cli.py)."""
    env = {**{k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}, **(env or {})}
    if not shared_server:
        assert api_url is None and "PREFECT_API_URL" not in env, "shared_server=False with an API URL"
    elif api_url:
        env["PREFECT_API_URL"] = api_url
    elif args and args[0] in FLOW_COMMANDS and "PREFECT_API_URL" not in env:
        env["PREFECT_API_URL"] = shared_prefect_server()["url"]
    if not shared_server or args[:2] == ["server", "start"]:  # a server of its own, on this home
        seed_prefect_home(Path(env["PREFECT_HOME"]))
    if args and args[0] in FLOW_COMMANDS and (forked := _run_forked(args, env, cwd or REPO, timeout)):
        return forked
    exe = Path(sys.executable).parent / "gpuclust"
    return subprocess.run([str(exe), *args], capture_output=True, text=True, env=env, cwd=cwd or REPO, timeout=timeout)


_FORKERS: list[CommandForker] = []
_FORKER_LOCK = threading.Lock()


def _run_forked(args: list[str], env: dict[str, str], cwd: Path, timeout: int) -> subprocess.CompletedProcess | None:
    """The command forked from this process's forker; None where it cannot be: another server,
    another environment, the forker busy in another thread or refusing to fork."""
    record = _server_record()
    if not record or env.get("PREFECT_API_URL") != record["url"]:
        return None
    forker = command_forker()
    if not (forker.usable() and forker.serves(env) and _FORKER_LOCK.acquire(blocking=False)):
        return None
    try:
        with tempfile.TemporaryDirectory(dir=_SESSION_DIR) as scratch:
            return forker.run(args, env, cwd, Path(scratch), timeout)
    finally:
        _FORKER_LOCK.release()


def command_forker() -> CommandForker:
    """This process's command forker (tests/forked_cli.py), started on first use with the environment a
    flow command against the shared server gets: the flow commands of `run_cli` that keep that
    environment fork from it instead of starting a fresh interpreter (seconds of imports each)."""
    if not _FORKERS or _FORKERS[-1].refused is None and not _FORKERS[-1].usable():
        env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
        env["PREFECT_API_URL"] = launch_prefect_server()["url"]  # its imports need no answer from it
        log = Path(tempfile.mkdtemp(prefix="command-forker-", dir=_SESSION_DIR)) / "forker.log"
        _FORKERS.append(CommandForker(env, log, preexec_fn=die_with_parent()))
    return _FORKERS[-1]


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
