"""Typed run configuration (pydantic v2): what the CLI, YAML files and the flow all share."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gpu_ops.errors import InputError

DEEP_ALGORITHMS = ("n2d", "dkm", "dec", "idec")
ALGORITHMS = ("umap-kmeans", "kmeans", "agglomerative", "hdbscan", "gmm", *DEEP_ALGORITHMS)
REDUCERS = ("umap", "tsne", "pca", "none")


def default_cache_root() -> Path:
    """Where embedding stores and model checkpoints live: ``$GPUCLUST_CACHE`` or ~/.cache/gpuclust."""
    env = os.environ.get("GPUCLUST_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gpuclust"


TASK_RUNNERS = ("local", "dask", "dask-cuda", "slurm", "pbs")


class TaskRunnerConfig(BaseModel):
    """Where the flow's heavy stages run. ``local``: in the flow's own process (the default).
    The others spread extraction (one Prefect task per store shard, each writing its own Parquet
    parts) and k-means (distributed Lloyd, or cuML's Dask KMeans on GPU workers) over a Dask
    cluster: ``dask`` a LocalCluster (or the scheduler at ``address``), ``dask-cuda`` a
    LocalCUDACluster (one worker per GPU), ``slurm`` / ``pbs`` dask-jobqueue clusters whose
    ``cluster_kwargs`` (queue, account, cores, memory, walltime, job_extra_directives, ...) go to
    SLURMCluster / PBSCluster."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["local", "dask", "dask-cuda", "slurm", "pbs"] = "local"
    address: str | None = Field(None, description="scheduler of a running Dask cluster, e.g. tcp://10.0.0.5:8786 "
                                "(implies kind dask)")
    n_workers: int | None = Field(None, ge=1, description="dask: LocalCluster workers; dask-cuda: workers (default "
                                  "one per visible GPU); slurm/pbs: batch jobs to submit")
    threads_per_worker: int = Field(1, ge=1)
    processes: bool = Field(True, description="dask: worker processes (False: threads in the flow's process)")
    init_sample_rows: int = Field(100_000, ge=1, description="distributed k-means: rows gathered to the driver "
                                  "for the initial fit before exact Lloyd passes over every partition")
    cluster_kwargs: dict[str, Any] = Field(default_factory=dict, description="extra keyword arguments for the "
                                           "Dask cluster class")

    def model_post_init(self, _context: Any) -> None:
        if self.address and self.kind == "local":
            self.kind = "dask"


class StageTimeouts(BaseModel):
    """Seconds each stage may run before Prefect fails it (None: no limit)."""

    model_config = ConfigDict(extra="forbid")

    extract: float | None = Field(12 * 3600, gt=0)
    cluster: float | None = Field(6 * 3600, gt=0)
    reduce: float | None = Field(6 * 3600, gt=0)
    evaluate: float | None = Field(3600, gt=0)
    write: float | None = Field(3600, gt=0)
    report: float | None = Field(3600, gt=0)


class RunConfig(BaseModel):
    """Everything one ``gpuclust run`` needs. Defaults are the settings that cluster well on
    the embedded default (digits): raw pixels, UMAP to 10-d then k-means, a UMAP map."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = Field("digits", description="digits | idx:DIR | folder:DIR | npz:FILE | usps:FILE | parquet:DIR")
    split: Literal["train", "test", "all"] = "all"
    limit: int | None = Field(None, ge=1, description="use only the first N items")
    extractor: str = "raw"
    weights: str | None = Field(None, description="none | imagenet | PATH to a state_dict (unset: the extractor's default, ImageNet for pretrained networks)")
    image_size: int | None = Field(None, ge=8, description="input size for the extractor (its default when unset)")
    batch_size: int = Field(256, ge=1)
    latent_dim: int = Field(10, ge=2, le=256, description="autoencoder latent size (extractor autoencoder)")
    ae_epochs: int = Field(20, ge=0, description="autoencoder pretraining epochs (extractor autoencoder)")
    deep_epochs: int | None = Field(None, ge=0, description="autoencoder pretraining epochs of deep clustering (unset: by data size)")
    num_workers: int | None = Field(None, ge=0, description="loader worker processes (auto when unset)")
    shard_rows: int = Field(4096, ge=1, description="rows per Parquet part: the unit an interrupted extraction resumes from")
    decode_on_device: bool = Field(False, description="decode JPEG batches on the GPU (image folders, pretrained extractors)")
    algorithms: list[str] = Field(default_factory=lambda: ["umap-kmeans"])
    k: int | Literal["auto"] = 10
    k_range: tuple[int, int] = (2, 20)
    linkage: Literal["ward", "average", "complete", "single"] = "ward"
    n_init: int = Field(10, ge=1)
    max_iter: int = Field(100, ge=1)
    umap_dims: int = Field(10, ge=1, description="dimensions of the UMAP space umap-kmeans clusters in")
    distance_threshold: float | None = Field(None, gt=0, description="agglomerative: cut the tree at this merge "
                                             "height instead of at k")
    min_cluster_size: int = Field(15, ge=2, description="hdbscan: the smallest group that counts as a cluster")
    covariance_type: Literal["full", "tied", "diag", "spherical"] = Field("diag", description="gmm covariance")
    memory_mb: int | None = Field(None, ge=16, description="kmeans: stream the store through out-of-core k-means "
                                  "within this memory budget (None: load it)")
    tsne_perplexities: list[float] = Field(default_factory=list, description="tsne map: also map these "
                                           "perplexities (tsne_sweep.npz; the report shows them side by side)")
    reducer: Literal["umap", "tsne", "pca", "none"] = "umap"
    backend: str = Field("auto", description="auto | gpu | cpu, for every op")
    backends: dict[str, str] = Field(default_factory=dict, description="per-op override, e.g. {kmeans: sklearn}")
    seed: int = 0
    out: Path | None = None
    cache_dir: Path | None = None
    task_runner: TaskRunnerConfig = Field(default_factory=TaskRunnerConfig,
                                          description="local, or a Dask cluster for extraction and k-means")
    timeouts: StageTimeouts = Field(default_factory=StageTimeouts, description="per-stage time limits (seconds)")

    @field_validator("algorithms", mode="before")
    @classmethod
    def _split_algorithms(cls, value: object) -> object:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        return value

    @field_validator("algorithms")
    @classmethod
    def _known_algorithms(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one algorithm is needed")
        for name in value:
            if name not in ALGORITHMS:
                raise ValueError(f"unknown algorithm {name!r}; expected one of: {', '.join(ALGORITHMS)}")
        return list(dict.fromkeys(value))

    def backend_for(self, op: str) -> str:
        """The backend setting for ``op`` (per-op override, else the global one)."""
        return self.backends.get(op, self.backend)

    def cache_root(self) -> Path:
        return self.cache_dir or default_cache_root()


def validation_message(exc: ValidationError) -> str:
    """One line from pydantic's error: the field, the bad value, what was expected."""
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "config"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{where}: {msg} (got {err.get('input')!r})" if "input" in err and err["type"] != "value_error" else f"{where}: {msg}"


def make_config(**values: object) -> RunConfig:
    """Build a RunConfig, turning validation errors into one-line InputErrors."""
    try:
        return RunConfig(**values)
    except ValidationError as exc:
        raise InputError(validation_message(exc)) from None


def load_config_file(path: Path) -> dict[str, object]:
    """Read a YAML config into a dict (validated later, merged with command-line flags)."""
    if not path.is_file():
        raise InputError(f"{path}: config file does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping of settings at the top level")
    return data
