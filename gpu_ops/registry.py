"""Backend registry: one table of (op, backend) -> estimator factory, and the one rule that picks
an op's backend (:func:`resolve_backend`; :mod:`gpu_ops.placement` asks it for every op).

Every op (``kmeans``, ``agglomerative``, ``tsne``, ``umap``, ``pca``) has backends that speak the
scikit-learn estimator protocol: ``__init__`` stores parameters, ``fit(X)`` returns ``self``,
results land in ``labels_`` / ``cluster_centers_`` / ``inertia_`` / ``embedding_``.

``backend`` may be ``"auto"`` (GPU when usable, else CPU), ``"gpu"``, ``"cpu"`` or a backend's
own name (``"faiss-cpu"``). A GPU backend that is not usable, or that does not support the
requested parameters, falls back to the best CPU backend; the reason is logged and kept in the
returned :class:`Resolution` so the run can record which backend actually ran and why.
"""

from __future__ import annotations

import logging
from typing import Any

# The ops packages: importing them registers every backend of every op in the table.
import gpu_ops.cluster  # noqa: F401
import gpu_ops.reduce  # noqa: F401
from gpu_ops.backend_table import BACKENDS, BackendSpec, Resolution
from gpu_ops.device import BACKEND_CHOICES, Machine, cuda_available
from gpu_ops.errors import InputError, choice_error

log = logging.getLogger(__name__)

def list_ops() -> list[str]:
    return sorted(BACKENDS)


def list_backends(op: str) -> list[BackendSpec]:
    """Backends of ``op``, best first (GPU before CPU, then by priority)."""
    if op not in BACKENDS:
        raise choice_error("op", op, list(BACKENDS))
    return sorted(BACKENDS[op].values(), key=lambda s: (s.kind != "gpu", s.priority))


def backend_names(op: str) -> list[str]:
    """Every value a backend setting of ``op`` may take: auto, gpu, cpu and each backend's name."""
    return [*BACKEND_CHOICES, *(s.name for s in list_backends(op))]


def check_backend_name(op: str, backend: str) -> None:
    """InputError unless ``backend`` is a valid setting for ``op`` (whether or not it is usable here)."""
    names = backend_names(op)
    if backend not in names:
        raise choice_error(f"{op} backend", backend, names)


def estimator_keywords(op: str) -> frozenset[str] | None:
    """The keywords some backend of ``op`` takes (None: a backend takes any)."""
    found: set[str] = set()
    for spec in list_backends(op):
        keywords = spec.keywords()
        if keywords is None:
            return None
        found |= keywords
    return frozenset(found)


def check_estimator_keywords(op: str, params: dict[str, Any]) -> None:
    """InputError naming the first keyword no backend of ``op`` takes, and the valid ones."""
    valid = estimator_keywords(op)
    if valid is None:
        return
    for name in params:
        if name not in valid:
            raise InputError(f"unknown {op} parameter {name!r}; expected one of: {', '.join(sorted(valid))}")


def backend_status(spec: BackendSpec, machine: Machine | None = None) -> tuple[bool, str]:
    """(usable, why) of ``spec`` here, or on ``machine`` when one is described (GPU backends only:
    CPU backends are always checked for real)."""
    if machine is None or spec.kind == "cpu":
        return spec.usable()
    return machine.gpu_backend_status(spec.name)


def resolve_backend(op: str, backend: str = "auto", params: dict[str, Any] | None = None,
                    machine: Machine | None = None) -> tuple[BackendSpec, Resolution]:
    """Pick the backend for ``op`` on this machine (or on a described ``machine``).

    Raises :class:`InputError` for an unknown name, or a named backend that is not usable here.
    """
    params = params or {}
    specs = list_backends(op)
    check_backend_name(op, backend)

    fallbacks: list[str] = []

    if backend not in BACKEND_CHOICES:
        spec = next(s for s in specs if s.name == backend)
        ok, why = backend_status(spec, machine)
        if not ok:
            raise InputError(f"{op} backend {backend!r} is not usable here: {why}")
        problem = spec.unsupported(params)
        if problem is None:
            return spec, Resolution(op, backend, spec.name, spec.kind, f"requested by name; {why}")
        # A named GPU backend that cannot honour the parameters is a fallback whatever the machine.
        fallbacks.append(f"{spec.name}: {problem}")
        candidates = [s for s in specs if s.kind == "cpu"]
    elif backend == "cpu":
        candidates = [s for s in specs if s.kind == "cpu"]
    else:
        candidates = specs

    for spec in candidates:
        ok, why = backend_status(spec, machine)
        if not ok:
            fallbacks.append(f"{spec.name}: {why}")
            continue
        problem = spec.unsupported(params)
        if problem is not None:
            fallbacks.append(f"{spec.name}: {problem}")
            continue
        reason = why if not fallbacks else f"{why}; skipped " + "; ".join(fallbacks)
        gpu_skipped = [f for f in fallbacks if _is_gpu(op, f.split(":")[0])]
        # On a machine without CUDA, "auto" choosing CPU is the plan, not a fallback.
        is_fallback = spec.kind == "cpu" and bool(gpu_skipped) and (
            backend != "auto" or (machine.cuda if machine is not None else cuda_available()))
        res = Resolution(op, backend, spec.name, spec.kind, reason, gpu_skipped if is_fallback else [], fallbacks)
        if is_fallback:
            log.warning("%s: falling back to CPU backend %r: %s", op, spec.name, "; ".join(gpu_skipped))
        else:
            log.info("%s: using backend %r (%s)", op, spec.name, reason)
        return spec, res
    raise InputError(f"no usable {op} backend here: " + "; ".join(fallbacks))


def _is_gpu(op: str, name: str) -> bool:
    spec = BACKENDS.get(op, {}).get(name)
    return bool(spec and spec.kind == "gpu")


def create_estimator(op: str, backend: str = "auto", **params: Any) -> tuple[Any, Resolution]:
    """Resolve the backend for ``op`` and build its estimator with ``params``.

    A keyword that no backend of ``op`` takes (a misspelling) raises InputError listing the valid
    ones. A keyword that only other backends take (``knn`` of umap-learn, ``n_jobs`` of openTSNE)
    is a tuning hint for those and is not passed to the chosen one; parameters that change the
    result where a backend lacks them are turned away by its ``unsupported`` check first.
    """
    check_estimator_keywords(op, params)
    spec, resolution = resolve_backend(op, backend, params)
    accepted = spec.keywords()
    if accepted is not None:
        params = {k: v for k, v in params.items() if k in accepted}
    return spec.factory(**params), resolution
