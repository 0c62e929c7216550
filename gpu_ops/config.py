"""Typed run configuration (pydantic v2): what the CLI, YAML files and the flow all share."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from gpu_ops.errors import InputError, choice_error

DEEP_ALGORITHMS = ("n2d", "dkm", "dec", "idec")
#: UMAP-space algorithms: ``umap_dims`` applies to them.
UMAP_ALGORITHMS = ("umap-graph", "umap-kmeans")
#: Clustering heads trained in torch on the store's embeddings (:mod:`gpu_ops.heads`).
HEAD_ALGORITHMS = ("scan", "temi", "turtle")
ALGORITHMS = (*UMAP_ALGORITHMS, "kmeans", "agglomerative", "hdbscan", "gmm", *DEEP_ALGORITHMS, *HEAD_ALGORITHMS)
#: Algorithms with settings of their own that ``algorithm_options`` may change.
TUNABLE_ALGORITHMS = (*DEEP_ALGORITHMS, *HEAD_ALGORITHMS)
#: numpy's seeding range (``np.random.RandomState`` and FAISS take a 32-bit unsigned seed).
SEED_MAX = 2**32 - 1


def _user_path(value: object) -> object:
    """Paths may be given as strings (YAML, JSON deployment parameters); ``~`` is the home directory."""
    if isinstance(value, str) and not value.strip():  # Path("") is ".", the working directory
        raise ValueError('"" is an empty path; name a directory')
    if isinstance(value, (str, Path)):
        return Path(value).expanduser()
    return value


#: A path field: a ``Path`` or a string (the model is otherwise strict about types).
UserPath = Annotated[Path, BeforeValidator(_user_path), Field(strict=False)]


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

    model_config = ConfigDict(extra="forbid", strict=True)

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

    model_config = ConfigDict(extra="forbid", strict=True)

    extract: float | None = Field(12 * 3600, gt=0)
    cluster: float | None = Field(6 * 3600, gt=0)
    reduce: float | None = Field(6 * 3600, gt=0)
    evaluate: float | None = Field(3600, gt=0)
    explore: float | None = Field(3600, gt=0)
    write: float | None = Field(3600, gt=0)
    report: float | None = Field(3600, gt=0)


class RunConfig(BaseModel):
    """Everything one ``gpuclust run`` needs. Defaults are the settings that cluster well on
    the embedded default (digits): raw pixels, ``umap-graph`` (UMAP to 10-d, k-means
    micro-clusters merged by modularity on the neighbour graph), a UMAP map.

    Validation is strict and complete, so the command line, YAML files and deployment parameters
    all get the same one-line error before any work: values of the wrong type are refused even
    where Python would convert them (``k: true``, ``limit: "5"``, ``seed: 1.5``); dataset kinds,
    extractors, backends (global, and per op in ``backends``), algorithms and reducers must be
    known names; and an option set to anything but its default where it does not apply
    (:data:`APPLIES`: ``split`` on a dataset without splits, ``linkage`` without agglomerative,
    ...) is an error. Messages name the command-line option or the config file a value came
    from when :func:`validate_config` is told (validation context ``flags`` / ``file``).
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    dataset: str = Field("digits", description="digits | idx:DIR | folder:DIR | npz:FILE | usps:FILE | parquet:DIR")
    split: Literal["train", "test", "all"] = "all"
    limit: int | None = Field(None, ge=1, description="use only the first N items")
    extractor: str = Field("raw", description="raw | resnet18|34|50 | efficientnet_lite0|1|2 | autoencoder | "
                           "timm:NAME | torchvision:NAME | backbones joined by + (rows concatenated)")
    weights: str | None = Field(None, description="none | imagenet | PATH to a state_dict (unset: the extractor's default, ImageNet for pretrained networks)")
    flip_average: bool = Field(False, description="average each image's features with its mirror image's")
    image_size: int | None = Field(None, ge=8, description="input size for the extractor (its default when unset)")
    batch_size: int = Field(256, ge=1)
    latent_dim: int = Field(10, ge=2, le=256, description="autoencoder latent size (extractor autoencoder)")
    ae_epochs: int = Field(20, ge=0, description="autoencoder pretraining epochs (extractor autoencoder)")
    deep_epochs: int | None = Field(None, ge=0, description="autoencoder pretraining epochs of deep clustering (unset: by data size)")
    num_workers: int | None = Field(None, ge=0, description="loader worker processes (auto when unset)")
    shard_rows: int = Field(4096, ge=1, description="rows per Parquet part: the unit an interrupted extraction resumes from")
    decode_on_device: bool = Field(False, description="decode JPEG batches on the GPU (image folders, pretrained extractors)")
    wait_for_store: bool = Field(True, description="another run writing the same embedding store: wait for it "
                                 "(false: fail at once, naming it)")
    algorithms: list[str] = Field(default_factory=lambda: ["umap-graph"])
    algorithm_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="settings of the deep methods and clustering heads, by algorithm, e.g. "
        "{scan: {n_heads: 20}, idec: {dec_max_iter: 2000}} (fields of gpu_ops.deep.DeepConfig and of "
        "gpu_ops.heads' ScanConfig, TemiConfig, TurtleConfig)")
    k: int | Literal["auto"] = 10
    k_range: tuple[int, int] = Field((2, 20), description="k=auto: the smallest and largest k tried")
    linkage: Literal["ward", "average", "complete", "single"] = "ward"
    n_init: int = Field(10, ge=1)
    max_iter: int = Field(100, ge=1)
    umap_dims: int = Field(10, ge=1, description="dimensions of the UMAP space umap-graph and umap-kmeans cluster in")
    distance_threshold: float | None = Field(None, gt=0, description="agglomerative: cut the tree at this merge "
                                             "height instead of at k")
    min_cluster_size: int = Field(15, ge=2, description="hdbscan: the smallest group that counts as a cluster")
    covariance_type: Literal["full", "tied", "diag", "spherical"] = Field("diag", description="gmm covariance")
    memory_mb: int | None = Field(None, ge=16, description="memory budget of the run: every stage streams the "
                                  "store in batches sized from it, k-means runs out of core, the 2-D map is fitted "
                                  "on a sample it holds, explore searches neighbours within k-means cells (None: "
                                  "k-means and clustering load the store); scan, temi, turtle: memory-map the head's "
                                  "rows when they need more than half of it")
    map_sample_rows: int | None = Field(None, ge=2, description="fit the 2-D map on at most this many rows (a "
                                        "uniform sample) and place the others by their nearest fitted rows "
                                        "(unset: 20000, fewer when memory_mb is small)")
    tsne_perplexities: list[float] = Field(default_factory=list, description="tsne map: also map these "
                                           "perplexities (tsne_sweep.npz; the report shows them side by side)")
    reducer: Literal["umap", "tsne", "pca", "none"] = "umap"
    explore: bool = Field(True, description="find duplicates and outliers, flag dark, bright, blurry and tiny "
                          "images (duplicates.parquet, outliers.parquet): one more pass over the images")
    backend: str = Field("auto", description="auto | gpu | cpu, for every op")
    backends: dict[str, str] = Field(default_factory=dict, description="per-op override, e.g. {kmeans: sklearn}; "
                                     "extract takes auto | gpu | cpu")
    seed: int = Field(0, description=f"random seed, 0..{SEED_MAX}")
    out: UserPath | None = None
    cache_dir: UserPath | None = None
    task_runner: TaskRunnerConfig = Field(default_factory=TaskRunnerConfig,
                                          description="local, or a Dask cluster for extraction and k-means")
    timeouts: StageTimeouts = Field(default_factory=StageTimeouts, description="per-stage time limits (seconds)")

    @field_validator("dataset")
    @classmethod
    def _known_dataset_kind(cls, value: str, info: ValidationInfo) -> str:
        from gpu_ops.data import dataset_kind

        _checked(info, "dataset", lambda: dataset_kind(value))
        return value

    @field_validator("extractor")
    @classmethod
    def _known_extractor(cls, value: str, info: ValidationInfo) -> str:
        from gpu_ops.features import check_extractor

        _checked(info, "extractor", lambda: check_extractor(value))
        return value

    @field_validator("algorithms", mode="before")
    @classmethod
    def _split_algorithms(cls, value: object) -> object:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        return value

    @field_validator("algorithms")
    @classmethod
    def _known_algorithms(cls, value: list[str], info: ValidationInfo) -> list[str]:
        if not value:
            raise _error(info, "algorithms", f"{_name(info, 'algorithms')} needs at least one algorithm")
        for name in value:
            if name not in ALGORITHMS:
                raise _error(info, "algorithms", f"{_name(info, 'algorithms')}: unknown algorithm {name!r}; "
                             f"expected one of: {', '.join(ALGORITHMS)}")
        return list(dict.fromkeys(value))

    @field_validator("algorithm_options")
    @classmethod
    def _known_algorithm_options(cls, value: dict[str, dict[str, Any]], info: ValidationInfo) -> dict[str, dict[str, Any]]:
        where = _name(info, "algorithm_options")
        for algorithm, options in value.items():
            if algorithm not in TUNABLE_ALGORITHMS:
                raise _error(info, "algorithm_options", f"{where}: {algorithm!r} has no options to set; the "
                             f"algorithms that do: {', '.join(TUNABLE_ALGORITHMS)}")
            try:
                check_algorithm_options(algorithm, options)
            except InputError as exc:
                raise _error(info, "algorithm_options", f"{where} {algorithm}: {exc}") from None
        return value

    @field_validator("k", mode="before")
    @classmethod
    def _positive_k(cls, value: object, info: ValidationInfo) -> object:
        if value != "auto" and not (_is_int(value) and value >= 1):  # type: ignore[operator]
            raise _error(info, "k", f"{_name(info, 'k')} must be a positive integer or auto; got {value!r}")
        return value

    @field_validator("k_range", mode="before")
    @classmethod
    def _sane_k_range(cls, value: object, info: ValidationInfo) -> object:
        pair = tuple(value) if isinstance(value, (list, tuple)) else None
        if not (pair and len(pair) == 2 and all(_is_int(v) for v in pair) and 2 <= pair[0] <= pair[1]):
            raise _error(info, "k_range", f"{_name(info, 'k_range')} must be two integers [low, high] with "
                         f"2 <= low <= high; got {value!r}")
        return pair

    @field_validator("seed", mode="before")
    @classmethod
    def _seed_in_range(cls, value: object, info: ValidationInfo) -> object:
        if not (_is_int(value) and 0 <= value <= SEED_MAX):  # type: ignore[operator]
            raise _error(info, "seed", f"{_name(info, 'seed')} must be an integer from 0 to {SEED_MAX}; got {value!r}")
        return value

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, value: str, info: ValidationInfo) -> str:
        from gpu_ops.device import BACKEND_CHOICES

        return _one_of(info, "backend", value, BACKEND_CHOICES)

    @field_validator("backends")
    @classmethod
    def _known_op_backends(cls, value: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        from gpu_ops.device import BACKEND_CHOICES
        from gpu_ops.registry import check_backend_name, list_ops

        torch_stages = ("extract", *DEEP_ALGORITHMS, *HEAD_ALGORITHMS)
        ops = [*list_ops(), *torch_stages]
        for op, name in value.items():
            if op not in ops:
                raise _error(info, "backends", f"unknown op {op!r} in {_name(info, 'backends')}; "
                             f"expected one of: {', '.join(sorted(ops))}")
            if op in torch_stages:  # these run in torch: a device choice, no named backends
                if name not in BACKEND_CHOICES:
                    raise _error(info, "backends", str(choice_error("extract backend", name, BACKEND_CHOICES)))
            else:
                _checked(info, "backends", lambda: check_backend_name(op, name))
        return value

    @model_validator(mode="after")
    def _options_apply(self, info: ValidationInfo) -> "RunConfig":
        for rule in APPLIES:
            if rule.field in self.model_fields_set and not rule.applies(self) and not _is_default(self, rule.field):
                raise _error(info, rule.field, f"{_name(info, rule.field)} does not apply to {rule.context(self)}; "
                             f"it is for {rule.target}")
        for algorithm in self.algorithm_options:
            if algorithm not in self.algorithms:
                raise _error(info, "algorithm_options", f"{_name(info, 'algorithm_options')} {algorithm} does not "
                             f"apply to {_algorithms_context(self)}; it is for runs of {algorithm}")
        return self

    def options_for(self, algorithm: str) -> dict[str, Any]:
        """The settings ``algorithm_options`` gives ``algorithm`` (empty when none)."""
        return dict(self.algorithm_options.get(algorithm, {}))

    def backend_for(self, op: str) -> str:
        """The backend setting for ``op`` (per-op override, else the global one)."""
        return self.backends.get(op, self.backend)

    def cache_root(self) -> Path:
        return self.cache_dir or default_cache_root()


def check_algorithm_options(algorithm: str, options: object) -> None:
    """Refuse options that ``algorithm`` does not have, or values it cannot use (InputError, one
    line naming the algorithm, the option and the value). The deep methods' and heads' own config
    classes do the checking, imported only when options are given (they import torch)."""
    if algorithm not in TUNABLE_ALGORITHMS:
        raise choice_error("algorithm with options", algorithm, TUNABLE_ALGORITHMS)
    if not isinstance(options, dict) or not all(isinstance(key, str) for key in options):
        raise InputError(f"expected a mapping of option names to values; got {options!r}")
    if algorithm in HEAD_ALGORITHMS:
        from gpu_ops.heads import head_config

        head_config(algorithm, **options)
    else:
        from gpu_ops.deep import DeepConfig

        DeepConfig.from_overrides(None, **options)


# ---------------------------------------------------------------- options that apply only sometimes


def _kind(cfg: RunConfig) -> str:
    return cfg.dataset.partition(":")[0]


def _has_split(cfg: RunConfig) -> bool:
    from gpu_ops.data import SPLIT_KINDS

    return _kind(cfg) in SPLIT_KINDS


def _pretrained(cfg: RunConfig) -> bool:
    return cfg.extractor not in ("raw", "autoencoder")


def _any_deep(cfg: RunConfig) -> bool:
    return any(a in DEEP_ALGORITHMS for a in cfg.algorithms)


def _dataset_context(cfg: RunConfig) -> str:
    return "the digits dataset" if _kind(cfg) == "digits" else f"{_kind(cfg)}: datasets"


def _algorithms_context(cfg: RunConfig) -> str:
    return f"algorithms {', '.join(cfg.algorithms)}"


@dataclass(frozen=True)
class Applies:
    """``field`` means something only where ``applies(cfg)``; ``context`` names what the run has instead."""

    field: str
    applies: Callable[[RunConfig], bool]
    context: Callable[[RunConfig], str]
    target: str


#: Where each option applies: one table for every entry point.
APPLIES: tuple[Applies, ...] = (
    Applies("split", _has_split, _dataset_context, "idx: and usps: datasets (the others have no train/test split)"),
    Applies("decode_on_device", lambda c: _kind(c) == "folder", _dataset_context,
            "JPEG folders (folder: datasets) with a pretrained extractor"),
    Applies("decode_on_device", _pretrained, lambda c: f"extractor {c.extractor}",
            "JPEG folders (folder: datasets) with a pretrained extractor"),
    Applies("weights", _pretrained, lambda c: f"extractor {c.extractor}",
            "the pretrained extractors (every one but raw and autoencoder)"),
    Applies("flip_average", _pretrained, lambda c: f"extractor {c.extractor}",
            "the pretrained extractors (every one but raw and autoencoder)"),
    Applies("latent_dim", lambda c: c.extractor == "autoencoder" or _any_deep(c),
            lambda c: f"extractor {c.extractor} with {_algorithms_context(c)}",
            f"the autoencoder extractor and the deep algorithms ({', '.join(DEEP_ALGORITHMS)})"),
    Applies("ae_epochs", lambda c: c.extractor == "autoencoder", lambda c: f"extractor {c.extractor}",
            "the autoencoder extractor"),
    Applies("deep_epochs", _any_deep, _algorithms_context, f"the deep algorithms ({', '.join(DEEP_ALGORITHMS)})"),
    Applies("linkage", lambda c: "agglomerative" in c.algorithms, _algorithms_context, "agglomerative"),
    Applies("distance_threshold", lambda c: "agglomerative" in c.algorithms, _algorithms_context, "agglomerative"),
    Applies("min_cluster_size", lambda c: "hdbscan" in c.algorithms, _algorithms_context, "hdbscan"),
    Applies("covariance_type", lambda c: "gmm" in c.algorithms, _algorithms_context, "gmm"),
    Applies("map_sample_rows", lambda c: c.reducer != "none", lambda c: f"reducer {c.reducer}",
            "runs with a 2-D map (reducer umap, tsne or pca)"),
    Applies("umap_dims", lambda c: any(a in UMAP_ALGORITHMS for a in c.algorithms), _algorithms_context,
            " and ".join(UMAP_ALGORITHMS)),
    Applies("k_range", lambda c: c.k == "auto", lambda c: f"k={c.k}", "k=auto (the range k is chosen from)"),
    Applies("tsne_perplexities", lambda c: c.reducer == "tsne", lambda c: f"reducer {c.reducer}", "reducer tsne"),
)


# ---------------------------------------------------------------- messages


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_default(cfg: RunConfig, name: str) -> bool:
    return getattr(cfg, name) == type(cfg).model_fields[name].get_default(call_default_factory=True)


def _context(info: ValidationInfo | None) -> dict[str, Any]:
    return info.context if info is not None and isinstance(info.context, dict) else {}


def _name(info: ValidationInfo | None, field: str) -> str:
    """How a message names ``field``: its command-line option when it came from one."""
    return _context(info).get("flags", {}).get(field, field)


def _prefix(info: ValidationInfo | None, field: str) -> str:
    """``FILE: `` when ``field`` came from a config file, else nothing."""
    ctx = _context(info)
    return f"{ctx['file']}: " if ctx.get("file") and field not in ctx.get("flags", {}) else ""


def _error(info: ValidationInfo | None, field: str, message: str) -> InputError:
    """A complete one-line message (validation_message passes it on as it is)."""
    return InputError(_prefix(info, field) + message)


def _one_of(info: ValidationInfo, field: str, value: str, choices: Sequence[str]) -> str:
    """``value`` when it is one of ``choices``; else the standard "unknown ..." error for ``field``."""
    if value not in choices:
        raise _error(info, field, str(choice_error(field, value, choices)))
    return value


def _checked(info: ValidationInfo, field: str, check: Callable[[], object]) -> None:
    """Run ``check``; its InputError gains the config file's name when ``field`` came from one."""
    try:
        check()
    except InputError as exc:
        raise _error(info, field, str(exc)) from None


def validation_message(exc: ValidationError, flags: Mapping[str, str] | None = None,
                       file: str | os.PathLike[str] | None = None) -> str:
    """One line from pydantic's error: where (option, field, file), the bad value, what was expected.

    Messages of this module's own checks are complete and passed on as they are.
    """
    err = exc.errors()[0]
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, InputError):
        return str(cause)
    loc = [str(p) for p in err["loc"]]
    flags = flags or {}
    dotted = ".".join(loc)
    if dotted in flags:
        where = flags[dotted]
    elif loc and loc[0] in flags:
        where = ".".join([flags[loc[0]], *loc[1:]])
    else:
        where = (f"{file}: " if file and loc else "") + (dotted or "config")
    msg = err["msg"].removeprefix("Value error, ")
    return f"{where}: {msg} (got {err.get('input')!r})" if "input" in err and err["type"] != "value_error" else f"{where}: {msg}"


def validate_config(values: Mapping[str, object], *, flags: Mapping[str, str] | None = None,
                    file: str | os.PathLike[str] | None = None) -> RunConfig:
    """Build a RunConfig from ``values``; a bad value is a one-line InputError.

    ``flags`` maps the fields (or dotted nested fields) given on the command line to their
    options (``{"k": "--k"}``), so messages name the option; the other values came from
    ``file`` (a config file), which messages then name.
    """
    context = {"flags": dict(flags or {}), "file": str(file) if file else None}
    try:
        return RunConfig.model_validate(dict(values), context=context)
    except ValidationError as exc:
        raise InputError(validation_message(exc, flags, file)) from None


def make_config(**values: object) -> RunConfig:
    """Build a RunConfig, turning validation errors into one-line InputErrors."""
    return validate_config(values)


def load_config_file(path: Path) -> dict[str, object]:
    """Read a YAML config into a dict (validated later, merged with command-line flags)."""
    if not path.is_file():
        raise InputError(f"{path}: config file does not exist")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read the config file ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise InputError(f"{path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} on line {line}); "
                         "save the config file as UTF-8") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping of settings at the top level")
    return data
