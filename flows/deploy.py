"""Deployments: ``gpuclust serve`` (one machine, no work pool) and the names that ``prefect.yaml``,
the work pools and the README share.

Three ways to run the flows on a schedule (README, "Operations"):

1. ``gpuclust serve --cron "0 2 * * *" ...``: :func:`serve` registers a deployment with a cron
   schedule and runs its flow runs in subprocesses of this command; stop it with Ctrl-C (its
   schedule is paused on shutdown).
2. ``prefect deploy --name nightly`` (``prefect.yaml``) to the process work pool
   :data:`PROCESS_POOL`, run by ``prefect worker start --pool gpuclust-process``.
3. ``prefect deploy --name gpu-nightly`` to the Kubernetes pool :data:`K8S_GPU_POOL`, created
   with :data:`K8S_GPU_TEMPLATE` (requests ``nvidia.com/gpu``, runs the gpuclust image).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gpu_ops.config import RunConfig
from gpu_ops.errors import InputError

REPO = Path(__file__).resolve().parents[1]
PROCESS_POOL = "gpuclust-process"
K8S_GPU_POOL = "gpuclust-k8s-gpu"
K8S_GPU_TEMPLATE = REPO / "configs" / "k8s" / "gpu-base-job-template.json"
NIGHTLY_CRON = "0 2 * * *"


def flow_parameters(config: RunConfig) -> dict[str, Any]:
    """A RunConfig as deployment parameters (JSON types: what the API stores and the UI edits)."""
    return {"config": json.loads(config.model_dump_json())}


def require_server() -> str:
    """The Prefect API URL, or InputError: schedules need a server that outlives this process."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise InputError("serving needs a Prefect server: start one with `prefect server start` and point at it "
                         "with `prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api`")
    return str(url)


def serve(config: RunConfig, *, cron: str = NIGHTLY_CRON, timezone: str = "UTC", name: str = "nightly",
          extract_only: bool = False) -> None:
    """Register ``cluster-images/<name>`` (or ``extract-images/<name>``) with a cron schedule and
    run its scheduled runs here until interrupted (one at a time: a slow night never overlaps
    the next). The flow is referenced by module path, so runs work from any directory."""
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron

    from flows.pipeline import cluster_images, extract_images

    require_server()
    try:
        schedule = Cron(cron, timezone=timezone)
    except Exception as exc:  # noqa: BLE001 - croniter / zoneinfo say what is wrong
        raise InputError(f"--cron {cron!r} / --timezone {timezone!r}: {exc}") from None
    target = extract_images if extract_only else cluster_images
    target.serve(name=name, schedules=[schedule], parameters=flow_parameters(config), limit=1,
                 tags=["gpuclust"], entrypoint_type=EntrypointType.MODULE_PATH,
                 description=f"gpuclust {target.name} of {config.dataset} on cron {cron!r} ({timezone})")
