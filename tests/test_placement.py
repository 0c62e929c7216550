"""Placement: the one decision of where each stage runs (backend, torch device, why), on this
machine and on described ones (CUDA visible or not, which GPU backends work), and what asks it:
the extraction and deep clustering devices, the Prefect `gpu` tag and `gpuclust backends`."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO, run_cli
from flows.tasks import GPU_TAG, cluster, configured, extract_features, uses_gpu
from gpu_ops.config import DEEP_ALGORITHMS, RunConfig
from gpu_ops.deep._common import resolve_device
from gpu_ops.device import Machine, cuda_available
from gpu_ops.errors import InputError
from gpu_ops.placement import (
    TORCH_STAGES,
    place,
    placement_for,
    placements_for_run,
)
from gpu_ops.registry import list_backends, resolve_backend

CUDA = Machine(cuda=True)  # a CUDA card, no GPU clustering package
CUDA_CUML = Machine(cuda=True, gpu_backends={"cuml"})
CUDA_FAISS = Machine(cuda=True, gpu_backends={"faiss-gpu"})
NO_CUDA = Machine(cuda=False, gpu_backends={"cuml", "faiss-gpu"})  # packages installed, no card


def _best_cpu(op: str) -> str:
    return resolve_backend(op, "cpu")[0].name


@pytest.mark.parametrize("algorithm", DEEP_ALGORITHMS)
def test_deep_algorithms_on_a_cuda_machine_are_gpu_placements(algorithm):
    p = place(algorithm, "auto", machine=CUDA)
    assert (p.stage, p.requested, p.backend, p.kind, p.torch_device) == (algorithm, "auto", "torch", "gpu", "cuda")
    assert (p.reason, p.fallbacks) == ("CUDA device visible", ())


@pytest.mark.parametrize("stage", TORCH_STAGES)
def test_gpu_requested_without_cuda_runs_on_cpu_and_says_so(stage, caplog):
    with caplog.at_level(logging.WARNING, logger="gpu_ops.placement"):
        p = place(stage, "gpu", machine=NO_CUDA)
    assert (p.kind, p.torch_device, p.requested) == ("cpu", "cpu", "gpu")
    assert p.fallbacks == ("cuda: no CUDA device visible",)
    assert [r.getMessage() for r in caplog.records] == [
        f"{stage}: backend 'gpu' requested but CUDA is not available: running on CPU"]


@pytest.mark.parametrize("stage", TORCH_STAGES)
def test_cpu_setting_keeps_torch_stages_off_a_cuda_card(stage):
    p = place(stage, "cpu", machine=CUDA)
    assert (p.kind, p.torch_device, p.reason, p.fallbacks) == ("cpu", "cpu", "backend cpu requested", ())


def test_extraction_follows_its_own_override_and_deep_clustering_the_global_setting():
    cfg = RunConfig(backend="cpu", backends={"extract": "gpu"})
    assert placement_for(cfg, "extract", CUDA).torch_device == "cuda"
    assert placement_for(cfg, "idec", CUDA).torch_device == "cpu"
    cfg = RunConfig(backend="gpu", backends={"extract": "cpu"})
    assert placement_for(cfg, "extract", CUDA).torch_device == "cpu"
    assert placement_for(cfg, "idec", CUDA).torch_device == "cuda"


def test_unknown_torch_setting_is_an_input_error_naming_the_choices():
    with pytest.raises(InputError) as info:
        place("extract", "cuda")
    assert str(info.value) == "unknown extract backend 'cuda'; expected one of: auto, cpu, gpu"
    with pytest.raises(InputError) as info:
        place("dbscan")
    assert str(info.value).startswith("unknown stage 'dbscan'; expected one of: ")
    assert "idec" in str(info.value) and "umap-kmeans" in str(info.value) and "extract" in str(info.value)


def test_kmeans_goes_to_the_gpu_backend_the_machine_has():
    assert [place("kmeans", "auto", machine=m).backend for m in (CUDA_CUML, CUDA_FAISS)] == ["cuml", "faiss-gpu"]
    p = place("kmeans", "auto", machine=CUDA_FAISS)
    assert (p.kind, p.torch_device, p.reason) == ("gpu", "cuda", "CUDA device and faiss-gpu available; skipped cuml: "
                                                                  "cuml not available")
    # A CUDA card but no GPU k-means package: the CPU runs it, and that is a recorded fallback.
    p = place("kmeans", "auto", machine=CUDA)
    assert (p.backend, p.kind, p.torch_device) == (_best_cpu("kmeans"), "cpu", "cpu")
    assert p.fallbacks == ("cuml: cuml not available", "faiss-gpu: faiss-gpu not available")
    # No card: CPU is the plan under auto, not a fallback.
    p = place("kmeans", "auto", machine=NO_CUDA)
    assert (p.kind, p.fallbacks) == ("cpu", ())
    assert "cuml: no CUDA device visible" in p.reason


def test_a_named_gpu_backend_the_described_machine_lacks_is_an_input_error():
    with pytest.raises(InputError) as info:
        place("kmeans", "auto", overrides={"kmeans": "cuml"}, machine=CUDA_FAISS)
    assert str(info.value) == "kmeans backend 'cuml' is not usable here: cuml not available"


def test_umap_kmeans_is_placed_op_by_op_with_the_per_op_overrides():
    p = placement_for(RunConfig(backends={"kmeans": "cpu"}), "umap-kmeans", CUDA_CUML)
    assert [(q.stage, q.backend, q.kind) for q in p.parts] == [("umap", "cuml", "gpu"),
                                                              ("kmeans", _best_cpu("kmeans"), "cpu")]
    assert (p.backend, p.kind, p.torch_device) == (f"cuml+{_best_cpu('kmeans')}", "gpu", "cuda")
    assert p.reason == f"umap -> cuml on cuda, kmeans -> {_best_cpu('kmeans')} on cpu"
    p = placement_for(RunConfig(), "umap-kmeans", CUDA)
    assert p.kind == "cpu" and p.fallbacks[0] == "umap cuml: cuml not available"


def test_gpu_tag_follows_the_placement_of_every_algorithm():
    """Deep clustering on CUDA holds the card like any GPU backend: its task carries the `gpu` tag."""
    cfg = RunConfig()
    for algorithm in DEEP_ALGORITHMS:
        assert uses_gpu(cfg, algorithm, CUDA), algorithm
        tagged = configured(cluster, cfg, "cluster", gpu=uses_gpu(cfg, algorithm, CUDA))
        assert GPU_TAG in tagged.tags
        assert not uses_gpu(cfg, algorithm, NO_CUDA), algorithm
    assert GPU_TAG in configured(extract_features, cfg, "extract", gpu=uses_gpu(cfg, "extract", CUDA)).tags
    assert uses_gpu(cfg, "umap-kmeans", CUDA_CUML)
    assert uses_gpu(cfg, "kmeans", CUDA_CUML) and uses_gpu(cfg, "kmeans", CUDA_FAISS)
    assert not uses_gpu(cfg, "kmeans", CUDA)  # a card but no GPU k-means package
    assert not uses_gpu(cfg, "gmm", CUDA_CUML)  # no GPU backend at all
    assert not uses_gpu(cfg, "none", CUDA_CUML)  # no map
    cpu = RunConfig(backend="cpu")
    for stage in ("extract", "umap-kmeans", "kmeans", *DEEP_ALGORITHMS):
        assert not uses_gpu(cpu, stage, CUDA_CUML), stage
    assert GPU_TAG not in configured(cluster, cpu, "cluster", gpu=uses_gpu(cpu, "idec", CUDA_CUML)).tags


def test_run_placements_cover_every_stage_in_order():
    cfg = RunConfig(algorithms=["kmeans", "idec", "umap-kmeans"], reducer="tsne")
    placed = placements_for_run(cfg, CUDA_CUML)
    assert [(p.stage, p.kind) for p in placed] == [("extract", "gpu"), ("kmeans", "gpu"), ("idec", "gpu"),
                                                   ("umap-kmeans", "gpu"), ("tsne", "gpu")]
    placed = placements_for_run(cfg.model_copy(update={"reducer": "none"}), NO_CUDA)
    assert [(p.stage, p.kind) for p in placed] == [("extract", "cpu"), ("kmeans", "cpu"), ("idec", "cpu"),
                                                   ("umap-kmeans", "cpu")]


@pytest.mark.skipif(cuda_available(), reason="this machine has CUDA")
def test_deep_device_names_ask_the_placement():
    assert resolve_device("auto").type == "cpu"
    assert resolve_device("cuda:1").type == "cpu"
    with pytest.raises(InputError) as info:
        resolve_device("tpu")
    assert str(info.value) == "unknown device 'tpu'; expected one of: auto, cpu, cuda, cuda:N"


NO_TORCH_SCRIPT = textwrap.dedent("""
    import json, sys
    from gpu_ops.placement import op_backend
    spec, res = op_backend("kmeans", "auto", without_torch=True)
    print(json.dumps({"backend": spec.name, "kind": spec.kind, "requested": res.requested, "reason": res.reason,
                      "torch": "torch" in sys.modules}))
""")


def test_streaming_kmeans_auto_is_decided_without_importing_torch():
    """Streaming k-means runs within a small memory budget: with no GPU k-means package installed,
    `auto` must not probe CUDA (the probe imports torch, ~600 MB)."""
    gpu_names = [s.name for s in list_backends("kmeans") if s.kind == "gpu"]
    if any(s.usable()[0] for s in list_backends("kmeans") if s.kind == "gpu"):
        pytest.skip("a GPU k-means backend is usable here")
    out = subprocess.run([sys.executable, "-c", NO_TORCH_SCRIPT], capture_output=True, text=True, cwd=REPO,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if not result["reason"].endswith(f"; no GPU backend installed ({', '.join(gpu_names)})"):
        pytest.skip(f"a GPU k-means package is installed here: {result['reason']}")
    assert (result["backend"], result["kind"], result["requested"]) == (_best_cpu("kmeans"), "cpu", "auto")
    assert not result["torch"]


def test_backends_command_lists_every_stage_with_its_device_and_reason():
    result = run_cli(["backends"])
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    device, reason = ("cuda", "CUDA device visible") if cuda_available() else ("cpu", "no CUDA device visible")
    for stage in ("extract", *DEEP_ALGORITHMS):
        assert f"{stage}: auto -> torch on {device} ({reason})" in lines, stage
    assert place("kmeans").summary() in lines
    composite = [line for line in lines if line.startswith("umap-kmeans: ")]
    assert len(composite) == 1
    assert re.fullmatch(r"umap-kmeans: auto -> \S+\+\S+ on (cuda|cpu) \(umap -> \S+ on (cuda|cpu), "
                        r"kmeans -> \S+ on (cuda|cpu)\)", composite[0]), composite[0]
    for op in ("kmeans", "agglomerative", "tsne", "umap", "pca"):  # every op still lists its backends
        assert any(line.startswith(f"{op}: auto -> ") for line in lines), op
    assert "  - cuml        gpu  unusable: no CUDA device visible" in lines or cuda_available()
