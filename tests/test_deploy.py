"""Operations against a real `prefect server`: prefect.yaml deployed to a process work pool and run
by `prefect worker start`, `gpuclust serve` registering a cron deployment, the Kubernetes GPU
work pool's base job template, and the `gpu` tag concurrency limit. Every process started here
carries a marker in its environment; none may be left when the module is done."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import REPO, free_port, seed_prefect_home
from prefect_home import wait_until_healthy

PREFECT = str(Path(sys.executable).parent / "prefect")
GPUCLUST = str(Path(sys.executable).parent / "gpuclust")
TEMPLATE = REPO / "configs" / "k8s" / "gpu-base-job-template.json"
FAST = {"dataset": "digits", "algorithms": ["kmeans"], "reducer": "pca", "backend": "cpu"}


def _marked(marker: str) -> list[int]:
    """PIDs of live processes whose environment carries ``marker`` (Linux /proc)."""
    needle = f"GPUCLUST_TEST_MARKER={marker}".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if needle in (proc / "environ").read_bytes().split(b"\0"):
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group ``proc`` leads (its own session), SIGKILL it after 30 s."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        except ProcessLookupError:
            pass


class Live:
    """A `prefect server` on 127.0.0.1 and the background processes a test starts against it."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.marker = uuid.uuid4().hex
        self.url = f"http://127.0.0.1:{free_port()}/api"
        self.env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": self.url,
                    "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false",
                    "PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_RUNNER_POLL_FREQUENCY": "2",
                    "PREFECT_LOGGING_LEVEL": "INFO", "COLUMNS": "250", "GPUCLUST_TEST_MARKER": self.marker}
        self.procs: list[subprocess.Popen] = []

    def spawn(self, args: list[str], name: str) -> subprocess.Popen:
        log = open(self.home / f"{name}.log", "w")
        proc = subprocess.Popen(args, env=self.env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        return (self.home / f"{name}.log").read_text()[-3000:]

    def cli(self, *args: str, timeout: int = 180) -> subprocess.CompletedProcess:
        done = subprocess.run([PREFECT, *args], env=self.env, cwd=REPO, capture_output=True, text=True,
                              timeout=timeout)
        assert done.returncode == 0, f"prefect {' '.join(args)}: {done.stdout[-2000:]}{done.stderr[-2000:]}"
        return done

    def client(self) -> Any:
        from prefect.client.orchestration import SyncPrefectClient

        return SyncPrefectClient(self.url)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory):
    if not Path("/proc/self/environ").exists():
        pytest.skip("needs Linux /proc to account for every process")
    server = Live(tmp_path_factory.mktemp("live-prefect"))
    seed_prefect_home(server.home)
    proc = server.spawn([PREFECT, "server", "start", "--host", "127.0.0.1", "--port",
                         str(urllib.request.urlparse(server.url).port)], "server")
    wait_until_healthy(server.url, lambda: proc.poll() is None, server.home / "server.log")
    yield server
    # In-process flows (test_gpu_tag_limit_...) sent logs and events to this server: deliver them
    # while it still answers. Left pointing at a stopped server, Prefect's log and event workers
    # would hold up the next test harness's teardown, which drains every one of them, for good.
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=60)
    EventsWorker.drain_all(timeout=60)
    for p in reversed(server.procs):  # the server last
        _stop(p)
    time.sleep(0.5)
    left = _marked(server.marker)
    for pid in left:  # never leave them running, but report them
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert left == [], f"processes left behind: {left}"


def _wait_for_final_state(live: Live, flow_run_id: Any, timeout: float, watch: subprocess.Popen, name: str) -> Any:
    with live.client() as client:
        deadline = time.monotonic() + timeout
        while True:
            run = client.read_flow_run(flow_run_id)
            if run.state and run.state.is_final():
                return run
            assert watch.poll() is None, f"{name} exited: {live.log(name)}"
            assert time.monotonic() < deadline, f"flow run still {run.state.name if run.state else None}: {live.log(name)}"
            time.sleep(1)


def test_prefect_yaml_deployment_runs_on_a_process_worker(live, tmp_path):
    live.cli("work-pool", "create", "gpuclust-process", "--type", "process")
    live.cli("deploy", "--name", "nightly", "--name", "extract-nightly", "--no-prompt")  # from prefect.yaml
    with live.client() as client:
        deployment = client.read_deployment_by_name("cluster-images/nightly")
        assert deployment.work_pool_name == "gpuclust-process"
        assert [s.schedule.cron for s in deployment.schedules] == ["0 2 * * *"]
        assert deployment.pull_steps == [{"prefect.deployments.steps.set_working_directory":
                                          {"directory": str(REPO.resolve())}}]
        worker = live.spawn([PREFECT, "worker", "start", "--pool", "gpuclust-process", "--limit", "1"], "worker")
        config = {**FAST, "out": str(tmp_path / "run"), "cache_dir": str(tmp_path / "cache")}
        flow_run = client.create_flow_run_from_deployment(deployment.id, parameters={"config": config})
    run = _wait_for_final_state(live, flow_run.id, 300, worker, "worker")
    assert run.state.is_completed(), f"{run.state}: {live.log('worker')}"

    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["n"] == 1797 and metrics["algorithms"]["kmeans"]["acc"] > 0.6
    assert {"assignments.parquet", "map2d.parquet", "config.yaml", "report.html"} <= {
        p.name for p in (tmp_path / "run").iterdir()}
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with live.client() as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
    messages = "\n".join(log.message for log in logs)
    assert "extract: raw features of digits on cpu" in messages
    assert "cluster kmeans: backend" in messages and " on cpu " in messages

    # the extract-only deployment, sharded over a 2-worker Dask cluster inside the worker's flow run
    extract = {"dataset": "digits", "shard_rows": 600, "cache_dir": str(tmp_path / "cache-dask"),
               "task_runner": {"kind": "dask", "n_workers": 2, "processes": False}}
    with live.client() as client:
        deployment = client.read_deployment_by_name("extract-images/extract-nightly")
        flow_run = client.create_flow_run_from_deployment(deployment.id, parameters={"config": extract})
    run = _wait_for_final_state(live, flow_run.id, 180, worker, "worker")
    assert run.state.is_completed(), f"{run.state}: {live.log('worker')}"
    manifest = json.loads(next((tmp_path / "cache-dask").glob("stores/*/*/manifest.json")).read_text())
    assert manifest["complete"] and sorted(manifest["shards"]) == ["00000", "00001", "00002"]

    _stop(worker)
    assert worker.poll() is not None


def test_gpuclust_serve_shows_up_in_prefect_deployment_ls(live):
    serve = live.spawn([GPUCLUST, "serve", "--name", "serve-test", "--cron", "15 3 * * *", "--timezone",
                        "Europe/Berlin", "--algorithm", "kmeans", "--reducer", "pca"], "serve")
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + 180
    with live.client() as client:  # polled through the API: a `prefect` command per poll costs seconds of CPU
        while True:
            try:
                deployment = client.read_deployment_by_name("cluster-images/serve-test")
                break
            except ObjectNotFound:
                pass
            assert serve.poll() is None, f"gpuclust serve exited: {live.log('serve')}"
            assert time.monotonic() < deadline, f"not registered after 180 s: {live.log('serve')}"
            time.sleep(0.5)
    listing = live.cli("deployment", "ls").stdout
    assert "cluster-images/serve-test" in listing, listing
    assert [(s.schedule.cron, s.schedule.timezone) for s in deployment.schedules] == [("15 3 * * *", "Europe/Berlin")]
    assert deployment.parameters["config"]["algorithms"] == ["kmeans"]
    assert deployment.entrypoint == "flows.pipeline.cluster_images"
    _stop(serve)
    assert serve.poll() is not None


def _gpu_job_variables() -> dict[str, Any]:
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    gpu = next(d for d in spec["deployments"] if d["name"] == "gpu-nightly")
    return gpu["work_pool"]["job_variables"]


def _render(template: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """What a worker makes of a base job template and job variables, with Prefect's own helpers
    (BaseJobConfiguration.from_template_and_values without its block/variable look-ups)."""
    from prefect.utilities.templating import apply_values
    from prefect.workers.base import BaseJobConfiguration

    variables = BaseJobConfiguration._get_base_config_defaults(template["variables"]["properties"])
    variables.update(values)
    return apply_values(copy.deepcopy(template["job_configuration"]), variables)


def test_gpu_job_template_renders_the_gpu_request_and_image():
    template = json.loads(TEMPLATE.read_text())
    from prefect.utilities.templating import find_placeholders

    used = {p.name for p in find_placeholders(template["job_configuration"])}
    assert used <= set(template["variables"]["properties"]), "a placeholder without a variable"
    job = _render(template, _gpu_job_variables())
    pod = job["job_manifest"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == "ghcr.io/your-org/gpuclust:0.1.0"
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 1}  # no cpu/memory unless set
    assert container["resources"]["requests"] == {"nvidia.com/gpu": 1}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert {v["name"] for v in pod["volumes"]} == {"dshm", "cache"}
    assert job["env"]["GPUCLUST_CACHE"] == "/cache/gpuclust"
    two = _render(template, {"gpu_count": 2, "image": "registry.local/gpuclust:dev", "memory_limit": "64Gi"})
    c2 = two["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert c2["resources"]["limits"] == {"nvidia.com/gpu": 2, "memory": "64Gi"} and c2["image"].startswith("registry")


def test_kubernetes_gpu_pool_accepts_the_template(live):
    live.cli("work-pool", "create", "gpuclust-k8s-gpu", "--type", "kubernetes", "--base-job-template", str(TEMPLATE))
    with live.client() as client:
        pool = client.read_work_pool("gpuclust-k8s-gpu")
    assert pool.type == "kubernetes" and pool.base_job_template == json.loads(TEMPLATE.read_text())

    from prefect.client.orchestration import get_client
    from prefect.workers.base import BaseJobConfiguration
    from pydantic import ConfigDict

    class KubernetesJob(BaseJobConfiguration):  # the kubernetes worker's fields, without the package
        model_config = ConfigDict(extra="allow")

    async def render() -> Any:
        async with get_client() as client:
            return await KubernetesJob.from_template_and_values(pool.base_job_template, _gpu_job_variables(),
                                                               client=client)

    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: live.url}):
        job = asyncio.run(render())
    container = job.job_manifest["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1 and container["image"].endswith("gpuclust:0.1.0")


def test_gpu_tag_limit_lets_one_gpu_task_run_at_a_time(live):
    from prefect import flow, task
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.tasks import GPU_TAG, configured
    from gpu_ops.config import make_config

    live.cli("concurrency-limit", "create", GPU_TAG, "1")
    config = make_config(timeouts={"cluster": 120})

    @task
    def hold(seconds: float) -> tuple[float, float]:
        start = time.monotonic()
        time.sleep(seconds)
        return start, time.monotonic()

    @flow
    def two_tasks(gpu: bool) -> list[tuple[float, float]]:
        held = configured(hold, config, "cluster", gpu=gpu)
        assert held.tags == ({GPU_TAG} if gpu else set()) and held.timeout_seconds == 120
        futures = [held.submit(1.5), held.submit(1.5)]
        return [f.result() for f in futures]

    with temporary_settings({PREFECT_API_URL: live.url}):
        (s1, e1), (s2, e2) = sorted(two_tasks(gpu=True))
        (c1, d1), (c2, d2) = sorted(two_tasks(gpu=False))
    assert s2 >= e1, "two gpu-tagged tasks held the card at once"
    assert c2 < d1, "untagged tasks should have run side by side (the check above would prove nothing)"


def test_no_flows_module_shadows_an_installed_package():
    """Prefect puts an entrypoint's directory (flows/) on sys.path: a flows/distributed.py would
    hide Dask's `distributed` from every flow run a worker starts."""
    import importlib.util

    clashes = [p.stem for p in (REPO / "flows").glob("*.py")
               if p.stem != "__init__" and importlib.util.find_spec(p.stem) is not None]
    assert clashes == []
