"""What both clustering heads share: settings, the input transform, the multi-head network,
rows streamed from a store, kNN mining, per-epoch scores, and the saved head.

A head is trained on rows after :class:`InputTransform` (centre, optional PCA whitening, L2
normalisation). The transform is fitted on a sample of the store and applied batch by batch as
the store is streamed, so the raw embeddings are never all in memory at once; the transformed
rows live in memory when they fit the budget, else in a memory-mapped scratch file.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from gpu_ops.errors import InputError

log = logging.getLogger("gpu_ops.heads")

#: Rows the input transform (mean, PCA) is fitted on: a uniform sample of larger stores.
FIT_SAMPLE_ROWS = 50_000
#: Rows scored at a time when every row is predicted (evaluation, the final labels).
PREDICT_BATCH_ROWS = 8192
#: Share of ``memory_mb`` the transformed rows may take in memory before they go to a memory map.
ROWS_MEMORY_SHARE = 0.5
#: File format version of a saved head.
HEAD_FORMAT = 1


# ----------------------------------------------------------------------------- settings


@dataclass
class HeadConfig:
    """Settings both heads share; :class:`~gpu_ops.heads.scan.ScanConfig` and
    :class:`~gpu_ops.heads.temi.TemiConfig` add their own and set the paper defaults."""

    n_heads: int = 10  #: heads trained at once; the one with the lowest objective is kept
    neighbors: int = 20  #: nearest neighbours mined per row (cosine)
    epochs: int = 100
    batch_size: int = 512
    lr: float = 1e-3
    weight_decay: float = 1e-4
    hidden: int = 0  #: width of the hidden layer (0: linear heads)
    pca_dim: int | None = None  #: project the input on its first principal axes (None: no PCA)
    whiten: bool = False  #: with ``pca_dim``: scale each principal axis to unit variance
    l2_normalize: bool = True  #: L2-normalise each (transformed) row before the head
    progress: bool = False  #: log every epoch at INFO level

    @classmethod
    def from_overrides(cls, **overrides: Any) -> "HeadConfig":
        """The defaults with ``overrides``; an unknown name or a bad value is a one-line InputError."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise InputError(f"unknown {cls.algorithm_name()} option(s) {', '.join(map(repr, unknown))}; "
                             f"expected some of: {', '.join(sorted(names))}")
        cfg = cls(**overrides)
        cfg.validate()
        return cfg

    @classmethod
    def algorithm_name(cls) -> str:
        return "head"

    def _positive_ints(self) -> tuple[str, ...]:
        return ("n_heads", "neighbors", "batch_size")

    def validate(self) -> None:
        """Refuse values no run can use (one line naming the option and the value)."""
        name = self.algorithm_name()
        for key in self._positive_ints():
            value = getattr(self, key)
            if not _is_int(value) or value < 1:
                raise InputError(f"{name} {key} must be a positive integer; got {value!r}")
        for key in ("epochs", "hidden"):
            value = getattr(self, key)
            if not _is_int(value) or value < 0:
                raise InputError(f"{name} {key} must be an integer >= 0; got {value!r}")
        if self.pca_dim is not None and (not _is_int(self.pca_dim) or self.pca_dim < 1):
            raise InputError(f"{name} pca_dim must be a positive integer or None; got {self.pca_dim!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise InputError(f"{name} lr must be a positive number; got {self.lr!r}")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise InputError(f"{name} weight_decay must be a number >= 0; got {self.weight_decay!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


# ----------------------------------------------------------------------------- input transform


@dataclass
class InputTransform:
    """Row preprocessing: ``x - mean``, then ``@ components / scale`` (PCA projection, whitened
    or not, when fitted with a ``pca_dim``), then L2 normalisation (when ``l2``), then ``gain``.
    With ``blocks`` (output column ranges, one per representation space) the projection is
    block-diagonal and each block is L2-normalised on its own. Stored with every saved head."""

    mean: np.ndarray
    components: np.ndarray | None = None  #: (d, p) principal axes
    scale: np.ndarray | None = None  #: (p,) square roots of the explained variances
    l2: bool = True
    blocks: tuple[tuple[int, int], ...] | None = None  #: output columns [start, stop) of each space
    gain: float = 1.0  #: factor on every transformed row (after the L2 normalisation)

    @property
    def in_dim(self) -> int:
        return int(self.mean.shape[0])

    @property
    def out_dim(self) -> int:
        return int(self.components.shape[1]) if self.components is not None else self.in_dim

    @property
    def spaces(self) -> tuple[tuple[int, int], ...]:
        """Output column ranges of the representation spaces (one range when not fitted per space)."""
        return self.blocks if self.blocks is not None else ((0, self.out_dim),)

    @classmethod
    def fit(cls, sample: np.ndarray, pca_dim: int | None, l2: bool, whiten: bool = False) -> "InputTransform":
        """Fit the mean (and the PCA projection to ``pca_dim`` dimensions, whitened when
        ``whiten``) on ``sample`` (m, d)."""
        X = np.asarray(sample, dtype=np.float64)
        mean = X.mean(axis=0)
        if pca_dim is None:
            return cls(mean.astype(np.float32), None, None, l2)
        components, scale = principal_axes(X - mean, pca_dim, whiten)
        return cls(mean.astype(np.float32), components, scale, l2)

    @classmethod
    def fit_spaces(cls, sample: np.ndarray, spaces: list[tuple[int, int]], pca_dim: int | None,
                   gain: float = 1.0) -> "InputTransform":
        """Fit one centring, PCA projection (to at most ``pca_dim`` axes, not whitened) and L2
        normalisation per representation space, ``spaces`` being input column ranges of ``sample``."""
        X = np.asarray(sample, dtype=np.float64)
        mean = X.mean(axis=0)
        parts = [principal_axes(X[:, a:b] - mean[a:b], pca_dim or b - a, False)[0] for a, b in spaces]
        components = np.zeros((X.shape[1], sum(c.shape[1] for c in parts)), dtype=np.float32)
        blocks, col = [], 0
        for (a, b), c in zip(spaces, parts):
            components[a:b, col:col + c.shape[1]] = c
            blocks.append((col, col + c.shape[1]))
            col += c.shape[1]
        return cls(mean.astype(np.float32), components, np.ones(col, np.float32), True, tuple(blocks), float(gain))

    def __call__(self, X: np.ndarray) -> np.ndarray:
        """Transformed rows, float32 (n, out_dim)."""
        Z = np.asarray(X, dtype=np.float32) - self.mean
        if self.components is not None:
            Z = (Z @ self.components) / self.scale
        if self.l2:
            for a, b in self.spaces:
                Z[:, a:b] /= np.maximum(np.linalg.norm(Z[:, a:b], axis=1, keepdims=True), 1e-12)
        if self.gain != 1.0:
            Z *= np.float32(self.gain)
        return np.ascontiguousarray(Z, dtype=np.float32)

    def state(self) -> dict[str, Any]:
        return {"mean": torch.from_numpy(self.mean),
                "components": None if self.components is None else torch.from_numpy(self.components),
                "scale": None if self.scale is None else torch.from_numpy(self.scale), "l2": self.l2,
                "blocks": None if self.blocks is None else [list(b) for b in self.blocks], "gain": self.gain}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "InputTransform":
        def arr(t: Any) -> np.ndarray | None:
            return None if t is None else np.asarray(t.numpy() if hasattr(t, "numpy") else t, dtype=np.float32)

        blocks = state.get("blocks")
        return cls(arr(state["mean"]), arr(state["components"]), arr(state["scale"]), bool(state["l2"]),  # type: ignore[arg-type]
                   None if blocks is None else tuple((int(a), int(b)) for a, b in blocks), float(state.get("gain", 1.0)))


def principal_axes(Xc: np.ndarray, pca_dim: int, whiten: bool) -> tuple[np.ndarray, np.ndarray]:
    """The first ``pca_dim`` principal axes (d, p) float32 of centred rows ``Xc`` (m, d), and the
    scale (p,) each is divided by: the square root of its variance when ``whiten``, else 1."""
    p = min(int(pca_dim), Xc.shape[1], Xc.shape[0])
    cov = Xc.T @ Xc / max(1, Xc.shape[0] - 1)
    evals, evecs = np.linalg.eigh(cov)
    order = np.argsort(evals)[::-1][:p]
    scale = np.sqrt(np.maximum(evals[order], 1e-12 * max(float(evals.max()), 1e-30)))
    if not whiten:
        scale = np.ones_like(scale)
    return evecs[:, order].astype(np.float32), scale.astype(np.float32)


# ----------------------------------------------------------------------------- the network


class MultiHead(nn.Module):
    """``n_heads`` independent heads evaluated in one batched pass: (b, d) -> (n_heads, b, k) logits.

    ``hidden == 0``: linear heads (SCAN on frozen features). ``hidden > 0``: Linear -> GELU ->
    Linear. ``bottleneck > 0`` (TEMI's DINO-style head): the hidden output goes through a
    bottleneck layer, is L2-normalised, and a weight-normalised linear layer without bias gives
    the logits (cosine-like values whose scale each output's gain sets).
    """

    def __init__(self, dim: int, k: int, n_heads: int, hidden: int = 0, bottleneck: int = 0) -> None:
        super().__init__()
        self.dim, self.k, self.n_heads, self.hidden, self.bottleneck = dim, k, n_heads, hidden, bottleneck
        sizes = [dim] + ([hidden] if hidden else []) + ([bottleneck] if bottleneck else [])
        if not bottleneck:
            sizes.append(k)
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            bound = 1.0 / math.sqrt(fan_in)  # nn.Linear's default initialisation
            self.weights.append(nn.Parameter(torch.empty(n_heads, fan_in, fan_out).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(n_heads, 1, fan_out).uniform_(-bound, bound)))
        if bottleneck:
            bound = 1.0 / math.sqrt(bottleneck)
            self.last_v = nn.Parameter(torch.empty(n_heads, bottleneck, k).uniform_(-bound, bound))
            self.last_g = nn.Parameter(torch.ones(n_heads, 1, k))

    def arch(self) -> dict[str, int]:
        return {"dim": self.dim, "k": self.k, "n_heads": self.n_heads, "hidden": self.hidden,
                "bottleneck": self.bottleneck}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.unsqueeze(0).expand(self.n_heads, -1, -1)
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = torch.baddbmm(b, h, w)
            if i < len(self.weights) - 1:
                h = nn.functional.gelu(h)
        if self.bottleneck:
            h = nn.functional.normalize(h, dim=-1)
            v = self.last_v / self.last_v.norm(dim=1, keepdim=True).clamp_min(1e-12)
            h = torch.bmm(h, v) * self.last_g
        return h

    @torch.no_grad()
    def reorder_outputs(self, orders: np.ndarray) -> "MultiHead":
        """A copy whose head ``h`` gives, as output ``j``, this model's output ``orders[h, j]``
        (``orders`` (n_heads, k), each row a permutation of 0..k-1)."""
        out = copy.deepcopy(self)
        index = torch.as_tensor(np.asarray(orders, dtype=np.int64))
        last = [out.last_v, out.last_g] if self.bottleneck else [out.weights[-1], out.biases[-1]]
        for param in last:
            for h in range(self.n_heads):
                param[h] = param[h][..., index[h].to(param.device)]
        return out

    def single(self, head: int) -> "MultiHead":
        """A one-head copy of head ``head``."""
        one = MultiHead(self.dim, self.k, 1, self.hidden, self.bottleneck)
        with torch.no_grad():
            for (name, dst), src in zip(one.named_parameters(), self.parameters()):
                dst.copy_(src[head:head + 1])
        return one


# ----------------------------------------------------------------------------- rows


class Rows:
    """The transformed rows (n, p): a tensor on the training device when they fit the memory
    budget, else a memory-mapped float32 file read batch by batch."""

    def __init__(self, data: np.ndarray, device: torch.device) -> None:
        self.data = data
        self.n, self.dim = int(data.shape[0]), int(data.shape[1])
        self.device = device
        self.on_device = None if isinstance(data, np.memmap) else torch.from_numpy(np.asarray(data)).to(device)

    def take(self, idx: np.ndarray) -> torch.Tensor:
        """Rows ``idx`` (any order, repeats allowed) as float32 (len(idx), p) on the device."""
        if self.on_device is not None:
            return self.on_device[torch.from_numpy(np.asarray(idx, dtype=np.int64)).to(self.device)]
        order = np.argsort(idx, kind="stable")  # sorted reads walk the file forwards
        out = np.empty((len(idx), self.dim), dtype=np.float32)
        out[order] = self.data[np.asarray(idx)[order]]
        return torch.from_numpy(out).to(self.device)

    def batches(self, rows: int = PREDICT_BATCH_ROWS):
        """Every row in order, ``rows`` at a time, on the device."""
        for start in range(0, self.n, rows):
            if self.on_device is not None:
                yield self.on_device[start:start + rows]
            else:
                yield torch.from_numpy(np.ascontiguousarray(self.data[start:start + rows])).to(self.device)


def transformed_rows(source: Any, transform: InputTransform, memory_mb: int | None,
                     scratch: Path | None) -> np.ndarray:
    """Stream ``source`` (a :class:`~gpu_ops.cluster.sources.BatchedSource`) through ``transform``
    into an array: in memory when ``memory_mb`` is None or the rows take at most
    :data:`ROWS_MEMORY_SHARE` of it, else a memory map ``scratch/head-rows.npy``."""
    n, p = source.count(), transform.out_dim
    nbytes = n * p * 4
    if memory_mb is None or nbytes <= ROWS_MEMORY_SHARE * memory_mb * 2**20 or scratch is None:
        out: np.ndarray = np.empty((n, p), dtype=np.float32)
    else:
        scratch.mkdir(parents=True, exist_ok=True)
        out = np.lib.format.open_memmap(scratch / "head-rows.npy", mode="w+", dtype=np.float32, shape=(n, p))
        log.info("head rows (%d x %d, %.0f MB) memory-mapped in %s", n, p, nbytes / 2**20, scratch)
    start = 0
    for X in source.batches():
        out[start:start + len(X)] = transform(X)
        start += len(X)
    if isinstance(out, np.memmap):
        out.flush()
    return out


def mine_neighbors(Z: np.ndarray, n_neighbors: int, backend: str = "auto") -> tuple[np.ndarray, dict[str, Any]]:
    """Each row's ``n_neighbors`` nearest other rows by cosine similarity, through the ``knn`` op:
    (indices int64 (n, n_neighbors), the backend resolution)."""
    from gpu_ops.registry import create_estimator

    n = Z.shape[0]
    if not 1 <= n_neighbors <= n - 1:
        raise InputError(f"neighbors={n_neighbors} needs at least {n_neighbors + 1} rows; the store has {n}")
    est, resolution = create_estimator("knn", backend, metric="cosine")
    _, idx = est.fit(Z).kneighbors(n_neighbors=n_neighbors)
    return idx, resolution


# ----------------------------------------------------------------------------- training helpers


def seeded(seed: int) -> np.random.Generator:
    """Seed torch (CPU and CUDA) and return the numpy generator the batches are drawn from."""
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    return np.random.default_rng(seed)


@torch.no_grad()
def predict_all(model: nn.Module, rows: Rows, temperature: float = 1.0) -> torch.Tensor:
    """Softmax probabilities of every head for every row: (n_heads, n, k) float32 on the CPU."""
    model.eval()
    out = [torch.softmax(model(x) / temperature, dim=-1).cpu() for x in rows.batches()]
    model.train()
    return torch.cat(out, dim=1)


def scores(labels: np.ndarray | None, pred: np.ndarray) -> dict[str, float]:
    """ACC/NMI/ARI of ``pred`` when ``labels`` are known, else {}."""
    if labels is None:
        return {}
    from gpu_ops.metrics import evaluate

    return evaluate(labels, pred)


def resolve_torch_device(device: str) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``gpu`` -> the torch device (CUDA only when usable)."""
    from gpu_ops.device import BACKEND_CHOICES
    from gpu_ops.placement import torch_device

    setting = "gpu" if str(device).startswith("cuda") else str(device)
    if setting not in BACKEND_CHOICES:
        raise InputError(f"unknown device {device!r}; expected one of: auto, cpu, cuda, gpu")
    return torch.device(torch_device(setting))


# ----------------------------------------------------------------------------- results and the saved head


@dataclass
class HeadResult:
    """What a head's training returns.

    ``labels`` (n,) int64 argmax of the kept head; ``kept_head`` its index among the
    ``objectives`` (each head's final unsupervised objective, lower is better); ``history`` one
    record per epoch (``phase``, ``epoch``, ``loss`` of the kept head, ``head``, and
    ``acc``/``nmi``/``ari`` when labels were given); ``model`` the kept head (one-head
    :class:`MultiHead`); ``transform`` its input transform.
    """

    algorithm: str
    labels: np.ndarray
    kept_head: int
    objectives: list[float]
    history: list[dict[str, Any]]
    model: MultiHead
    transform: InputTransform
    device: str
    config: dict[str, Any]
    knn_backend: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    temperature: float = 1.0
    #: ``model`` holds one head per representation space and a row's probabilities are the mean
    #: of theirs (TURTLE); otherwise ``model`` is one head.
    mean_of_heads: bool = False

    def save(self, path: str | Path) -> Path:
        """Write the kept head (weights, input transform, k, dim, settings) atomically to ``path``."""
        from gpu_ops.fsutil import atomic_path

        doc = {"format": HEAD_FORMAT, "algorithm": self.algorithm, "k": self.model.k, "dim": self.transform.in_dim,
               "arch": self.model.arch(), "state_dict": self.model.state_dict(), "transform": self.transform.state(),
               "temperature": self.temperature, "kept_head": self.kept_head, "objectives": self.objectives,
               "config": self.config, "mean_of_heads": self.mean_of_heads}
        with atomic_path(Path(path)) as tmp:
            torch.save(doc, tmp)
        return Path(path)


class LoadedHead:
    """A saved head, ready to assign new rows of the same features."""

    def __init__(self, doc: dict[str, Any], path: Path) -> None:
        self.path = path
        self.algorithm: str = doc["algorithm"]
        self.k: int = int(doc["k"])
        self.dim: int = int(doc["dim"])
        self.transform = InputTransform.from_state(doc["transform"])
        self.temperature = float(doc.get("temperature", 1.0))
        self.objectives = list(doc.get("objectives", []))
        self.kept_head = int(doc.get("kept_head", 0))
        self.mean_of_heads = bool(doc.get("mean_of_heads", False))
        self.model = MultiHead(**doc["arch"])
        self.model.load_state_dict(doc["state_dict"])
        self.model.eval()

    @torch.no_grad()
    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Cluster probabilities (n, k) float32 of rows ``X`` (n, dim)."""
        X = np.asarray(X)
        if X.ndim != 2 or X.shape[1] != self.dim:
            raise InputError(f"{self.path}: the head takes rows of {self.dim} features; got shape {X.shape}")
        out = []
        for start in range(0, X.shape[0], PREDICT_BATCH_ROWS):
            z = torch.from_numpy(self.transform(X[start:start + PREDICT_BATCH_ROWS]))
            probs = torch.softmax(self.model(z) / self.temperature, dim=-1)
            out.append((probs.mean(dim=0) if self.mean_of_heads else probs[0]).numpy())
        return np.concatenate(out) if out else np.empty((0, self.k), np.float32)

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Cluster ids (n,) int64."""
        return self.predict_proba(X).argmax(axis=1).astype(np.int64)


def load_head(path: str | Path) -> LoadedHead:
    """Load a head saved by a ``scan``, ``temi`` or ``turtle`` run (``model-<algorithm>.pt`` in the run directory)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no saved head there (a scan, temi or turtle run writes model-<algorithm>.pt)")
    try:
        doc = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise InputError(f"{path}: not a saved clustering head ({type(exc).__name__})") from None
    if not isinstance(doc, dict) or doc.get("format") != HEAD_FORMAT or "state_dict" not in doc:
        raise InputError(f"{path}: not a saved clustering head (format {HEAD_FORMAT} expected)")
    return LoadedHead(doc, path)


def config_dict(cfg: HeadConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def timed() -> Callable[[], float]:
    t0 = time.perf_counter()
    return lambda: round(time.perf_counter() - t0, 3)
