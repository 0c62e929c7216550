"""bench/gpu_check.py (`make gpu-check`) on a CPU machine: it refuses to run without CUDA, saying
so; its dry run writes every part, in run order, into one JSON of figures; a part that cannot
run fails the command instead of skipping."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import gpu_check
from gpu_ops.device import cuda_available

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.gpu_check", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.skipif(cuda_available(), reason="this machine has CUDA")
def test_without_cuda_it_says_so_and_fails(tmp_path):
    out = _run("--out", str(tmp_path / "f.json"))
    assert out.returncode == 2
    assert out.stderr.strip() == ("gpu-check: error: no CUDA device visible (torch.cuda.is_available() is False): "
                                  "this check runs on a GPU machine")
    assert not (tmp_path / "f.json").exists()


def test_the_dry_run_writes_every_part_in_order(tmp_path):
    out = _run("--dry-run", "--parts", "cuml,torch,faiss", "--out", str(tmp_path / "f.json"))
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if line.startswith("gpu-check: part ")]
    assert [line.split()[2] for line in lines] == ["torch", "faiss", "cuml"]
    figures = json.loads((tmp_path / "f.json").read_text())
    assert figures["order"] == ["torch", "faiss", "cuml"] == list(figures["parts"])
    assert figures["device"] == {"name": "none (dry run)"}
    assert figures["versions"]["torch"] and figures["versions"]["python"]
    assert list(figures["parts"]["torch"]["steps"]) == ["pytest", "resnet50_model", "jpeg_decode",
                                                        "resnet50_end_to_end", "deep_mnist70k"]
    assert list(figures["parts"]["faiss"]["steps"]) == ["pytest", "kmeans_1m_256_k20000"]
    assert list(figures["parts"]["cuml"]["steps"]) == ["pytest", "kmeans_1m_256_k20000", "tsne_mnist70k",
                                                       "umap_mnist70k"]
    # what this machine lacks for each part is named (faiss-cpu has no GPU, cuML is absent here)
    assert figures["parts"]["torch"]["missing"] is None
    assert figures["parts"]["faiss"]["missing"] == "faiss is not a GPU build, or it sees no GPU"
    assert figures["parts"]["cuml"]["missing"].startswith("cuml not importable (ModuleNotFoundError")


def test_parts_merge_into_one_file_as_they_finish(tmp_path):
    path = tmp_path / "f.json"
    assert _run("--dry-run", "--parts", "faiss", "--out", str(path)).returncode == 0
    first = json.loads(path.read_text())
    assert first["order"] == ["faiss"]
    gpu_check.write_part(path, "torch", {"status": "passed", "steps": {"resnet50_model": {"images_per_s": 1.0}}},
                         {"name": "X"})
    merged = json.loads(path.read_text())
    assert merged["order"] == ["torch", "faiss"]
    assert merged["parts"]["faiss"] == first["parts"]["faiss"]  # an earlier part's figures stay
    assert merged["device"] == {"name": "X"}
    assert not path.with_name("f.json.tmp").exists()


def test_a_part_whose_packages_are_missing_fails_instead_of_skipping(tmp_path):
    part = gpu_check.Part("cuml", "cuML", gpu_check.missing_for_cuml, [gpu_check.Step("never", lambda ctx: {})])
    ctx = gpu_check.Context(out=tmp_path / "f.json", data=None, scratch=tmp_path)
    result = gpu_check.run_part(part, ctx, dry_run=False)
    assert result["status"] == "failed"
    assert result["error"].startswith("part cuml needs cuML: cuml not importable (ModuleNotFoundError")
    assert result["steps"] == {}


def test_a_skipped_gpu_test_fails_its_part(tmp_path):
    report = tmp_path / "junit.xml"
    report.write_text('<testsuites><testsuite name="pytest" tests="3" failures="0" errors="0" skipped="1">'
                      '<testcase name="test_a"/><testcase name="test_b"/>'
                      '<testcase name="test_c"><skipped message="faiss is not a GPU build"/></testcase>'
                      '</testsuite></testsuites>')
    counts = gpu_check.junit_counts(report)
    assert counts == {"tests": 3, "failures": 0, "errors": 0, "skipped": 1,
                      "skip_reasons": ["test_c: faiss is not a GPU build"]}
    with pytest.raises(gpu_check.CheckFailed) as err:
        gpu_check.check_pytest("faiss", 0, counts)
    assert str(err.value) == "pytest faiss: 1 test(s) skipped on a GPU machine: test_c: faiss is not a GPU build"
    with pytest.raises(gpu_check.CheckFailed, match=r"^pytest cuml: no GPU test ran$"):
        gpu_check.check_pytest("cuml", 5, {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "skip_reasons": []})
    gpu_check.check_pytest("torch", 0, {**counts, "skipped": 0, "skip_reasons": []})  # all ran and passed


def test_an_unknown_part_is_refused(tmp_path):
    out = _run("--dry-run", "--parts", "torch,tpu", "--out", str(tmp_path / "f.json"))
    assert out.returncode == 2
    assert out.stderr.strip() == "gpu-check: error: unknown part(s) ['tpu']; expected some of: torch, faiss, cuml"


def test_wheels_are_packed_into_transfers_and_joined_byte_for_byte(tmp_path):
    """bench/gpu_wheels.py: wheels cut into folders of at most the transfer size; each folder's
    join.sh, run as the folders arrive one by one, rebuilds every wheel exactly."""
    import os
    import random

    from bench.gpu_wheels import pack

    rng = random.Random(0)
    src = tmp_path / "src"
    src.mkdir()
    sizes = {"a-1.0-py3-none-any.whl": 3000, "b-1.0-py3-none-any.whl": 5000, "big-1.0-cp312-x86_64.whl": 20000}
    for name, size in sizes.items():
        (src / name).write_bytes(bytes(rng.randrange(256) for _ in range(size)))
    folders = pack(sorted(src.iterdir()), tmp_path / "out", "faiss", 8000)
    assert [f.name for f in folders] == [f"faiss-{i:02d}" for i in range(len(folders))]
    for folder in folders:
        assert sum(f.stat().st_size for f in folder.iterdir() if f.name != "join.sh") <= 8000
    wheels = tmp_path / "wheels"
    for folder in folders:  # one transfer at a time, as they reach the GPU machine
        done = subprocess.run(["bash", str(folder / "join.sh")], env={**os.environ, "WHEELS": str(wheels)},
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in wheels.glob("*.whl")) == sorted(sizes)
    for name in sizes:
        assert (wheels / name).read_bytes() == (src / name).read_bytes()
    assert list((wheels / ".parts").iterdir()) == []
