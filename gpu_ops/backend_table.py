"""The table of backends: what every op module uses to register its estimators.

Op modules (``gpu_ops.cluster.*``, ``gpu_ops.reduce.*``) import :func:`register_backend` and
:func:`requires` from here; :mod:`gpu_ops.registry` answers questions about the filled table.
This module imports no op module, so registering never cycles back into the registry.
"""


from __future__ import annotations

import importlib.util
import inspect
import logging
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from gpu_ops.device import cuda_available, package_status

log = logging.getLogger(__name__)

Kind = Literal["gpu", "cpu"]
Availability = Callable[[], tuple[bool, str]]
SupportCheck = Callable[[dict[str, Any]], "str | None"]


@dataclass(frozen=True)
class BackendSpec:
    """One registered backend of one op."""

    op: str
    name: str
    kind: Kind
    priority: int
    factory: Callable[..., Any]
    availability: Availability
    unsupported: SupportCheck
    description: str = ""

    def usable(self) -> tuple[bool, str]:
        """(usable here, why)."""
        return self.availability()

    def keywords(self) -> frozenset[str] | None:
        """The keyword arguments the estimator takes (None: not known, any is passed on).

        Read from the factory's own named parameters, else from the ``__init__`` of the class
        its return annotation names (factories are ``def f(**params) -> Estimator``).
        """
        return _keywords(self.factory)


@dataclass
class Resolution:
    """Which backend was picked for an op, and why; JSON-friendly via :meth:`as_dict`."""

    op: str
    requested: str
    backend: str
    kind: Kind
    reason: str
    fallbacks: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "op": self.op,
            "requested": self.requested,
            "backend": self.backend,
            "kind": self.kind,
            "reason": self.reason,
            "fallbacks": list(self.fallbacks),
            "skipped": list(self.skipped),
        }


#: op -> backend name -> spec, filled by :func:`register_backend` as op modules are imported.
BACKENDS: dict[str, dict[str, BackendSpec]] = {}


def requires(*modules: str, gpu: bool = False) -> Availability:
    """Availability check: every module is usable (and, if ``gpu``, CUDA is usable).

    GPU packages are really imported (they can fail for driver or CUDA-version reasons); CPU
    packages are only looked up, which keeps ``auto`` cheap.
    """

    def check() -> tuple[bool, str]:
        if gpu and not cuda_available():
            return False, "no CUDA device visible"
        for module in modules:
            if gpu:
                ok, why = package_status(module)
            else:
                ok = importlib.util.find_spec(module) is not None
                why = f"{module} not installed"
            if not ok:
                return False, why
        return True, ("CUDA device and " if gpu else "") + ", ".join(modules) + " importable"

    return check


def _supports_everything(_params: dict[str, Any]) -> str | None:
    return None


def register_backend(
    op: str,
    name: str,
    *,
    kind: Kind,
    priority: int,
    availability: Availability,
    unsupported: SupportCheck = _supports_everything,
    description: str = "",
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering ``factory(**params) -> estimator`` as backend ``name`` of ``op``.

    Lower ``priority`` wins under ``auto``. ``unsupported(params)`` returns a reason string when
    the backend cannot honour the parameters (that triggers a logged fallback), else None.
    """

    def decorate(factory: Callable[..., Any]) -> Callable[..., Any]:
        BACKENDS.setdefault(op, {})[name] = BackendSpec(
            op, name, kind, priority, factory, availability, unsupported, description
        )
        return factory

    return decorate


def _named_parameters(func: Callable[..., Any]) -> frozenset[str] | None:
    """Named keyword parameters of ``func``; None when it also takes ``**kwargs``."""
    params = list(inspect.signature(func).parameters.values())
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return frozenset(p.name for p in params
                     if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
                     and p.name != "self")


def _keywords(factory: Callable[..., Any]) -> frozenset[str] | None:
    named = _named_parameters(factory)
    if named is not None:
        return named
    try:
        returned = typing.get_type_hints(factory).get("return")
    except Exception:  # noqa: BLE001 - an unresolvable annotation only means "not known"
        return None
    return _named_parameters(returned.__init__) if inspect.isclass(returned) else None


