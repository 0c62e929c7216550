"""Where each stage of a run runs, decided in one place.

:func:`place` answers, for a stage (``extract``, an op such as ``kmeans`` or ``umap``, a deep
clustering algorithm such as ``idec``, or a composite algorithm such as ``umap-kmeans``) and the
run's backend settings (global ``auto | gpu | cpu`` plus per-op overrides), which backend runs it,
whether that is on a GPU, which torch device it uses, and why. Ops ask the backend registry
(:func:`gpu_ops.registry.resolve_backend`, the one rule for op -> backend); torch stages
(extraction, deep clustering) are decided here from the CUDA probe.

The extraction device, deep clustering's device, the ``gpu`` task tag and ``gpuclust backends``
all ask :func:`place` (through :func:`placement_for` for a run's config). Every function takes an
optional :class:`~gpu_ops.device.Machine` to decide for a described machine instead of this one.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Mapping

from gpu_ops.config import DEEP_ALGORITHMS, HEAD_ALGORITHMS
from gpu_ops.device import BACKEND_CHOICES, Machine, cuda_available
from gpu_ops.errors import choice_error
from gpu_ops.backend_table import BackendSpec, Resolution
from gpu_ops.registry import list_backends, list_ops, resolve_backend

if TYPE_CHECKING:
    from gpu_ops.config import RunConfig

log = logging.getLogger(__name__)

Kind = Literal["gpu", "cpu"]
TorchDevice = Literal["cuda", "cpu"]

EXTRACT = "extract"
#: Stages that run in torch: their placement is the torch device.
TORCH_STAGES = (EXTRACT, *DEEP_ALGORITHMS, *HEAD_ALGORITHMS)
#: Algorithms that chain ops; each op is placed on its own and the algorithm holds a GPU when any does.
COMPOSITES: dict[str, tuple[str, ...]] = {"umap-kmeans": ("umap", "kmeans"), "umap-graph": ("umap", "kmeans", "knn")}
TORCH_BACKEND = "torch"


@dataclass(frozen=True)
class Placement:
    """Where one stage runs and why."""

    stage: str
    requested: str  #: the setting asked for: auto, gpu, cpu or a backend's name
    backend: str  #: the registry backend (``faiss-cpu``), ``torch``, or ``a+b`` for a composite
    kind: Kind
    torch_device: TorchDevice  #: the device the stage's work lands on
    reason: str
    fallbacks: tuple[str, ...] = ()  #: GPU backends wanted but not used, each ``name: why``
    parts: tuple["Placement", ...] = ()  #: a composite's op placements

    def summary(self) -> str:
        """One line: ``stage: requested -> backend on device (reason)``."""
        return f"{self.stage}: {self.requested} -> {self.backend} on {self.torch_device} ({self.reason})"

    def as_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "requested": self.requested, "backend": self.backend, "kind": self.kind,
                "torch_device": self.torch_device, "reason": self.reason, "fallbacks": list(self.fallbacks),
                "parts": [p.as_dict() for p in self.parts]}


def stages() -> tuple[str, ...]:
    """Every stage :func:`place` knows: extract, the registry's ops, composites, deep algorithms."""
    return (EXTRACT, *list_ops(), *COMPOSITES, *DEEP_ALGORITHMS, *HEAD_ALGORITHMS)


def _gpu_backend_installed(name: str) -> bool:
    """Whether GPU backend ``name``'s package is installed at all, checked without importing torch."""
    if name == "cuml":
        return importlib.util.find_spec("cuml") is not None
    if name == "faiss-gpu":
        if importlib.util.find_spec("faiss") is None:
            return False
        from gpu_ops.cluster.kmeans import import_faiss

        return hasattr(import_faiss(), "StandardGpuResources")
    return True  # a backend this check does not know: only the real probe can tell


def op_backend(op: str, backend: str = "auto", params: dict[str, Any] | None = None, *,
               machine: Machine | None = None, without_torch: bool = False) -> tuple[BackendSpec, Resolution]:
    """The registry's backend for ``op`` under setting ``backend`` (see :func:`resolve_backend`).

    ``without_torch``: when none of the op's GPU backends is installed, decide ``auto`` as the
    CPU without probing CUDA. The probe imports torch, whose import alone costs ~600 MB of
    resident memory: more than a small streaming ``memory_mb`` budget. With no GPU package
    there is nothing for CUDA to enable, so the answer is known without asking.
    """
    if without_torch and machine is None and backend == "auto":
        gpu_names = [s.name for s in list_backends(op) if s.kind == "gpu"]
        if not any(_gpu_backend_installed(name) for name in gpu_names):
            spec, res = resolve_backend(op, "cpu", params)
            why = f"no GPU backend installed ({', '.join(gpu_names)})" if gpu_names else "no GPU backend"
            return spec, dataclasses.replace(res, requested=backend, reason=f"{res.reason}; {why}")
    return resolve_backend(op, backend, params, machine=machine)


def _place_torch(stage: str, setting: str, machine: Machine | None) -> Placement:
    if setting not in BACKEND_CHOICES:
        raise choice_error(f"{stage} backend", setting, BACKEND_CHOICES)
    if setting == "cpu":
        return Placement(stage, setting, TORCH_BACKEND, "cpu", "cpu", "backend cpu requested")
    if machine.cuda if machine is not None else cuda_available():
        return Placement(stage, setting, TORCH_BACKEND, "gpu", "cuda", "CUDA device visible")
    if setting == "gpu":
        log.warning("%s: backend 'gpu' requested but CUDA is not available: running on CPU", stage)
        return Placement(stage, setting, TORCH_BACKEND, "cpu", "cpu", "no CUDA device visible: running on CPU",
                         ("cuda: no CUDA device visible",))
    return Placement(stage, setting, TORCH_BACKEND, "cpu", "cpu", "no CUDA device visible")


def _place_op(op: str, setting: str, params: dict[str, Any] | None, machine: Machine | None) -> Placement:
    spec, res = op_backend(op, setting, params, machine=machine)
    return Placement(op, setting, spec.name, spec.kind, "cuda" if spec.kind == "gpu" else "cpu", res.reason,
                     tuple(res.fallbacks))


def _combine(stage: str, setting: str, parts: tuple[Placement, ...]) -> Placement:
    gpu = any(p.kind == "gpu" for p in parts)
    return Placement(stage, setting, "+".join(p.backend for p in parts), "gpu" if gpu else "cpu",
                     "cuda" if gpu else "cpu", ", ".join(f"{p.stage} -> {p.backend} on {p.torch_device}" for p in parts),
                     tuple(f"{p.stage} {f}" for p in parts for f in p.fallbacks), parts)


def place(stage: str, backend: str = "auto", *, overrides: Mapping[str, str] | None = None,
          params: dict[str, Any] | None = None, machine: Machine | None = None) -> Placement:
    """Where ``stage`` runs under global setting ``backend`` and per-op ``overrides``.

    ``params`` are an op's estimator parameters (a GPU backend that cannot honour them falls
    back). Raises :class:`~gpu_ops.errors.InputError` for an unknown stage or setting, or a
    named backend that is not usable here.
    """
    overrides = overrides or {}
    setting = overrides.get(stage, backend)
    if stage in TORCH_STAGES:
        return _place_torch(stage, setting, machine)
    if stage in COMPOSITES:
        return _combine(stage, setting, tuple(place(op, backend, overrides=overrides, machine=machine)
                                              for op in COMPOSITES[stage]))
    if stage in list_ops():
        return _place_op(stage, setting, params, machine)
    raise choice_error("stage", stage, stages())


def torch_device(backend: str = "auto", machine: Machine | None = None) -> TorchDevice:
    """The torch device (``cuda`` or ``cpu``) for setting ``backend`` (``auto | gpu | cpu``)."""
    return _place_torch(TORCH_BACKEND, backend, machine).torch_device


def placement_for(cfg: RunConfig, stage: str, machine: Machine | None = None) -> Placement:
    """:func:`place` with the run's settings: ``cfg.backend`` and the per-op ``cfg.backends``."""
    return place(stage, cfg.backend, overrides=cfg.backends, machine=machine)


def placements_for_run(cfg: RunConfig, machine: Machine | None = None) -> list[Placement]:
    """Every stage of the run in order: extraction, each algorithm, then the map's reducer."""
    names = [EXTRACT, *cfg.algorithms, *([cfg.reducer] if cfg.reducer != "none" else [])]
    return [placement_for(cfg, name, machine) for name in names]
