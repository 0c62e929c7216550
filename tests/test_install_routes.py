"""The GPU install routes, checked on a CPU machine.

- pip: every ``gpu-cu*`` extra, with the project's own dependencies, resolves as one set for
  Linux x86-64 / Python 3.12 (``pip install --dry-run --report``), on one RAPIDS release and one
  CUDA major, with raft-dask for cuml.dask and at most one ``faiss`` build. Only the wheels'
  metadata travels: pip's ``fast-deps`` reads each wheel's METADATA with HTTP range requests
  (the index here serves no PEP 658 metadata files; a plain dry run downloads every wheel,
  gigabytes). Skipped, with the reason, where no package index answers.
- conda-env.yml and configs/k8s/Dockerfile name the same RAPIDS release, CUDA major and FAISS.
- A CPU machine with an extra's pure-Python part (dask-cuda) still imports gpuclust, and
  ``gpuclust backends`` and the cuML-on-Dask probe say what is missing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
GPU_EXTRAS = sorted(e for e in PYPROJECT["project"]["optional-dependencies"] if re.fullmatch(r"gpu-cu\d+", e))
#: manylinux_2_17 ... manylinux_2_28: glibc 2.28 (RHEL 8, Ubuntu 20.04 and newer), the RAPIDS wheels' floor
PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in range(17, 29)] + ["manylinux2014_x86_64", "linux_x86_64"]
#: RAPIDS distributions that must all come from one release (names without the -cuXX suffix)
RAPIDS = ("cuml", "libcuml", "cudf", "libcudf", "pylibcudf", "dask-cudf", "raft-dask", "pylibraft", "libraft", "rmm",
          "librmm", "dask-cuda", "rapids-dask-dependency", "cuvs", "libcuvs")


#: tests/conftest.py starts this file as a script in the background and names its directory here
RESOLUTION_VAR = "GPUCLUST_TEST_PIP_RESOLUTION"
RESULT_FILE = "resolved.json"
PID_FILE = "pid"  #: the background resolution's process id, written by its launcher


def _pip(*args: str, timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", **(env or {})})


@lru_cache(maxsize=1)
def _index_problem() -> str | None:
    """None when pip's configured index answers for a RAPIDS package, else why not."""
    try:
        out = _pip("index", "versions", "cuml-cu13", timeout=90)
    except subprocess.TimeoutExpired:
        return "no package index answered within 90 s (pip index versions cuml-cu13)"
    if out.returncode != 0 or "Available versions" not in out.stdout:
        last = (out.stderr.strip().splitlines() or ["?"])[-1]
        return f"no package index reachable for cuml-cu13 ({last})"
    return None


def _requirements(extra: str) -> list[str]:
    """The project's dependencies plus ``extra``'s (self-references such as gpuclust[x] expanded)."""
    extras = PYPROJECT["project"]["optional-dependencies"]
    out = list(PYPROJECT["project"]["dependencies"])
    todo = [extra]
    while todo:
        for spec in extras[todo.pop()]:
            req = Requirement(spec)
            if req.name == "gpuclust":
                todo.extend(req.extras)
            else:
                out.append(spec)
    return out


def _dry_run(extra: str, workdir: Path) -> dict:
    report = workdir / f"{extra}.json"
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    scratch = workdir / f"tmp-{extra}"  # pip unpacks whole wheels (up to 0.9 GB) here, and may leave them
    scratch.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        out = _pip("install", "--dry-run", "--use-feature=fast-deps", "--ignore-installed", "--only-binary=:all:",
                   "--python-version", "3.12", *platforms, "--target", str(workdir / f"target-{extra}"),
                   "--report", str(report), "--progress-bar", "off", *_requirements(extra), timeout=900,
                   env={"TMPDIR": str(scratch)})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    seconds = time.perf_counter() - t0
    # "Downloading x.whl (554.6 MB)" is a whole wheel; "x.whl.metadata" and range reads are not
    wheels = re.findall(r"Downloading (\S+\.whl) \(([^)]*)\)", out.stdout)
    return {"extra": extra, "rc": out.returncode, "stderr": out.stderr[-3000:], "seconds": seconds,
            "wheels_downloaded": [f"{name} ({size})" for name, size in wheels if not name.startswith("file:")],
            "install": json.loads(report.read_text())["install"] if out.returncode == 0 else []}


def resolve_extras(workdir: Path) -> dict:
    """Every gpu-cu* extra resolved by pip, the dry runs side by side: {"runs": {extra: run}}, or
    {"skip": why} where no package index answers."""
    problem = _index_problem()
    if problem:
        return {"skip": problem}
    with ThreadPoolExecutor(len(GPU_EXTRAS)) as pool:
        runs = list(pool.map(lambda e: _dry_run(e, workdir), GPU_EXTRAS))
    return {"runs": {run["extra"]: run for run in runs}}


def _prefetched(directory: Path, timeout: float = 1200) -> dict:
    """The resolution tests/conftest.py started in the background when the session began (pip
    mostly waits on the index, so the other tests run meanwhile)."""
    import psutil

    result, pid_file = directory / RESULT_FILE, directory / PID_FILE
    deadline = time.monotonic() + timeout
    while not result.is_file():
        gone = pid_file.is_file() and _ended(int(pid_file.read_text()), psutil)
        if (gone and not result.is_file()) or time.monotonic() > deadline:
            why = "ended" if gone else f"ran {timeout:.0f} s"
            raise RuntimeError(f"the background pip resolution {why} without writing {result}: "
                               f"{(directory / 'resolve.log').read_text()[-2000:]}")
        time.sleep(1)
    return json.loads(result.read_text())


def _ended(pid: int, psutil) -> bool:
    """Whether process ``pid`` is gone or a zombie (ended, not yet reaped by its launcher)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_background_resolution_that_ends_without_a_result_fails_at_once(tmp_path):
    """A resolution process that ended (here: exited at once, left unreaped as under pytest) without
    writing its result fails the waiting fixture within seconds, with its log, not after 20 minutes."""
    (tmp_path / "resolve.log").write_text("pip: killed")
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    (tmp_path / PID_FILE).write_text(str(proc.pid))
    with pytest.raises(RuntimeError, match=r"the background pip resolution ended without writing .*pip: killed"):
        _prefetched(tmp_path, timeout=1200)  # "ended", not "ran 1200 s": it saw the process end
    proc.wait()


@pytest.fixture(scope="module")
def resolved(tmp_path_factory) -> dict[str, dict]:
    """Every gpu-cu* extra resolved by pip: read from the resolution started with the session
    (GPUCLUST_TEST_PIP_RESOLUTION), else run here."""
    started = os.environ.get(RESOLUTION_VAR)
    outcome = _prefetched(Path(started)) if started else resolve_extras(tmp_path_factory.mktemp("pip-dry-run"))
    if "error" in outcome:
        raise RuntimeError(f"the pip resolution failed: {outcome['error']}")
    if "skip" in outcome:
        pytest.skip(outcome["skip"])
    for run in outcome["runs"].values():
        print(f"{run['extra']}: {len(run['install'])} distributions in {run['seconds']:.0f} s")
    return outcome["runs"]


def _versions(run: dict) -> dict[str, str]:
    return {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"] for i in run["install"]}


def _cuda_major(extra: str) -> str:
    return extra.removeprefix("gpu-cu")


def test_there_is_an_extra_per_cuda_major():
    assert GPU_EXTRAS == ["gpu-cu12", "gpu-cu13"]
    assert PYPROJECT["project"]["optional-dependencies"]["gpu"] == ["gpuclust[gpu-cu13]"]


@pytest.mark.parametrize("extra", GPU_EXTRAS)
def test_each_gpu_extra_resolves_as_one_set_from_metadata_only(resolved, extra):
    run = resolved[extra]
    assert run["rc"] == 0, f"pip cannot resolve gpuclust[{extra}] for Linux x86-64 / Python 3.12:\n{run['stderr']}"
    assert run["wheels_downloaded"] == [], f"whole wheels downloaded (no range requests?): {run['wheels_downloaded']}"
    versions = _versions(run)
    cu = _cuda_major(extra)

    # cuML with raft-dask (cuml.dask's NCCL comms), dask-cuda and dask-cudf: the multi-GPU route
    for name in (f"cuml-cu{cu}", f"cudf-cu{cu}", f"raft-dask-cu{cu}", f"dask-cudf-cu{cu}", "dask-cuda",
                 f"cupy-cuda{cu}x", "torch", "torchvision"):
        assert name in versions, f"{extra}: {name} missing from the resolved set"
    # one RAPIDS release
    releases = {name: Version(v).release[:2] for name, v in versions.items()
                if re.sub(rf"-cu{cu}$", "", name) in RAPIDS}
    assert len(set(releases.values())) == 1, f"{extra}: RAPIDS packages from several releases: {releases}"
    # one CUDA major: no library built for another one (torch's CUDA wheels included)
    other = sorted(n for n in versions if re.search(r"-cu(\d+)$", n) and not n.endswith(f"-cu{cu}"))
    assert other == [], f"{extra}: CUDA {cu} set pulls libraries for another CUDA major: {other}"
    if "cuda-toolkit" in versions:
        assert Version(versions["cuda-toolkit"]).major == int(cu)
    # exactly one build of the `faiss` module
    faiss = sorted(n for n in versions if n.startswith("faiss"))
    assert len(faiss) == 1, f"{extra}: {faiss}"
    # torchvision decodes JPEG batches on the device (0.20+)
    assert Version(versions["torchvision"]) >= Version("0.20")


def test_the_cuda12_set_has_faiss_gpu_and_the_cuda13_set_routes_kmeans_to_cuml(resolved):
    cu12, cu13 = _versions(resolved["gpu-cu12"]), _versions(resolved["gpu-cu13"])
    assert "faiss-gpu-cu12" in cu12
    assert "faiss-cpu" in cu13 and not any(n.startswith("faiss-gpu") for n in cu13)
    readme = (REPO / "README.md").read_text()
    assert "gpu-cu13" in readme and "k-means runs on cuML" in readme


def test_torchvision_is_new_enough_for_batched_jpeg_decoding():
    pins = [Requirement(r) for r in PYPROJECT["project"]["dependencies"] if Requirement(r).name == "torchvision"]
    assert len(pins) == 1
    spec: SpecifierSet = pins[0].specifier
    assert not spec.contains("0.19.1") and spec.contains("0.20.0") and spec.contains("0.29.1")


# ------------------------------------------------------------------------------------------
# conda and Docker: one RAPIDS release


def _conda_pins() -> dict[str, str]:
    env = yaml.safe_load((REPO / "conda-env.yml").read_text())
    pins = {}
    for dep in env["dependencies"]:
        if isinstance(dep, str):
            name, _, version = dep.split("::")[-1].partition("=")  # `channel::name=version`
            pins[name.strip()] = version.lstrip("=").strip()
    return pins


def _dockerfile() -> tuple[str, dict[str, str]]:
    """The Dockerfile's base image and the conda packages it pins (``name=version``)."""
    text = (REPO / "configs" / "k8s" / "Dockerfile").read_text()
    image = re.search(r"^ARG RAPIDS_IMAGE=(\S+)$", text, re.M)
    assert image, "the Dockerfile names its RAPIDS base image in `ARG RAPIDS_IMAGE=`"
    pins = dict(re.findall(r'"([a-z][a-z0-9-]+)=([0-9][^"\s]*)"', text))
    return image.group(1), pins


def test_conda_env_and_dockerfile_name_the_same_rapids_release():
    conda = _conda_pins()
    image, docker = _dockerfile()
    match = re.fullmatch(r"rapidsai/base:(\d+\.\d+)-cuda(\d+)-py(\d+\.\d+)", image)
    assert match, image
    release, cuda_major, python = match.groups()
    # conda: cuML, cuDF, dask-cuda and raft-dask (cuml.dask needs it; conda's cuml no longer pulls it)
    for name in ("cuml", "cudf", "dask-cuda", "raft-dask", "libcuvs"):
        assert conda.get(name) == release, f"conda-env.yml: {name}={conda.get(name)}, the Docker image has {release}"
    assert conda["cuda-version"].split(".")[0] == cuda_major
    assert conda["python"] == python
    # FAISS built against that cuVS in both, and raft-dask added to the image's RAPIDS
    assert conda.get("faiss-gpu-cuvs") and docker.get("faiss-gpu-cuvs") == conda["faiss-gpu-cuvs"]
    for name in ("raft-dask", "dask-cuda", "libcuvs"):
        assert docker.get(name) == release, f"Dockerfile: {name}={docker.get(name)}, expected {release}"
    assert "faiss-gpu-cu13-cuvs" not in (REPO / "configs" / "k8s" / "Dockerfile").read_text()


# ------------------------------------------------------------------------------------------
# A CPU machine with an extra's pure-Python part still works


def test_gpuclust_works_beside_dask_cuda_without_cuda_libraries(tmp_path):
    """dask-cuda is the pure-Python part of the GPU extras (its CUDA dependencies are not): with
    it on the path and no CUDA library, gpuclust imports, ``gpuclust backends`` runs, and the
    dask-cuda and cuML-on-Dask routes say what is missing instead of failing on import."""
    problem = _index_problem()
    if problem:
        pytest.skip(problem)
    spec = next(s for s in PYPROJECT["project"]["optional-dependencies"]["gpu-cu13"] if s.startswith("dask-cuda"))
    target = tmp_path / "site"
    got = _pip("install", "--no-deps", "--only-binary=:all:", "--target", str(target), spec.replace("[cu13]", ""),
               timeout=300, env={"PIP_CACHE_DIR": str(tmp_path / "cache")})
    assert got.returncode == 0, got.stderr[-2000:]
    assert (target / "dask_cuda").is_dir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(target)])}
    probe = subprocess.run([sys.executable, "-c", (
        "import gpu_ops, flows.cli\n"
        "from gpu_ops import distributed as gd\n"
        "from gpu_ops.errors import InputError\n"
        "print('status:', gd.cuml_dask_worker_status()['reason'])\n"
        "try:\n"
        "    with gd.dask_cluster('dask-cuda', n_workers=1):\n"
        "        print('dask-cuda: started')\n"
        "except InputError as exc:\n"
        "    print('dask-cuda:', exc)\n")], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert probe.returncode == 0, probe.stderr[-3000:]
    lines = dict(line.split(": ", 1) for line in probe.stdout.splitlines() if ": " in line)
    assert lines["status"].startswith("cupy not importable on ")
    assert re.fullmatch(r"task runner 'dask-cuda' needs \S+ \(pip install 'gpuclust\[gpu\]'\)", lines["dask-cuda"]), \
        probe.stdout
    backends = subprocess.run([str(Path(sys.executable).with_name("gpuclust")), "backends"], capture_output=True, text=True,
                              timeout=300, env=env, cwd=tmp_path)
    assert backends.returncode == 0, backends.stderr[-3000:]
    assert "CUDA available: False" in backends.stdout
    assert "kmeans: auto -> faiss-cpu on cpu" in backends.stdout


if __name__ == "__main__":
    # python tests/test_install_routes.py DIR: resolve every extra into DIR/resolved.json (atomically)
    out_dir = Path(sys.argv[1])
    try:
        outcome = resolve_extras(out_dir)
    except Exception as exc:  # the waiting fixture reports it
        outcome = {"error": f"{type(exc).__name__}: {exc}"}
    partial = out_dir / (RESULT_FILE + ".partial")
    partial.write_text(json.dumps(outcome))
    partial.replace(out_dir / RESULT_FILE)
