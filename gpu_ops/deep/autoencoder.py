"""Autoencoders for deep clustering and for the ``autoencoder`` feature extractor.

Two designs:

* ``dense``: the d-500-500-2000-z stack used by DEC, IDEC, DKM and N2D (ReLU, linear latent,
  sigmoid output for images, linear output for float vectors).
* ``conv``: the classic MNIST convolutional autoencoder (Conv 5x5/2 -> 32, 5x5/2 -> 64,
  3x3/2 -> 128, dense -> z; mirrored with transposed convolutions; sigmoid output, MSE). Any
  small square grayscale or RGB size works: the decoder restores the exact encoder shapes, and
  large or non-square images are resized (default cap 64 px).

:func:`train_autoencoder` pretrains with Adam and MSE, shows a tqdm bar with the per-epoch loss,
writes checkpoints atomically (temp file + ``os.replace``) and reuses a checkpoint made for the
same data and configuration instead of training again. :func:`encode` maps images to latent
vectors with a trained model.
"""

from __future__ import annotations

import json
import hashlib
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from gpu_ops.deep._common import (
    Amp,
    atomic_torch_save,
    autocast,
    evaluate_labels,
    format_metrics,
    images_to_tensor,
    log,
    quick_kmeans,
    resolve_device,
    seed_everything,
)
from gpu_ops.errors import InputError, choice_error

ARCHS = ("dense", "conv")
#: Bump when the architectures or the training recipe change, so old checkpoints stop matching.
CHECKPOINT_FORMAT = 2


class DenseAutoencoder(nn.Module):
    """d-500-500-2000-z MLP autoencoder (DEC/IDEC/N2D).

    Input (n, c, h, w) images in [0, 1] (flattened inside) or (n, d) vectors.
    """

    def __init__(self, input_shape: Sequence[int], latent_dim: int = 10,
                 hidden: Sequence[int] = (500, 500, 2000), sigmoid_output: bool = True) -> None:
        super().__init__()
        self.input_shape = tuple(int(s) for s in input_shape)
        d = int(np.prod(self.input_shape))
        dims = [d, *hidden]
        enc: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            enc += [nn.Linear(a, b), nn.ReLU(inplace=True)]
        enc.append(nn.Linear(dims[-1], latent_dim))
        dec: list[nn.Module] = [nn.Linear(latent_dim, dims[-1]), nn.ReLU(inplace=True)]
        rdims = dims[::-1]
        for i, (a, b) in enumerate(zip(rdims[:-1], rdims[1:])):
            dec.append(nn.Linear(a, b))
            if i < len(rdims) - 2:
                dec.append(nn.ReLU(inplace=True))
        if sigmoid_output:
            dec.append(nn.Sigmoid())
        self.encoder = nn.Sequential(*enc)
        self.decoder = nn.Sequential(*dec)
        self.latent_dim = int(latent_dim)

    def reset_parameters(self) -> None:
        """torch's default initialisation of every linear layer."""
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                mod.reset_parameters()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x.flatten(1))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z).view(z.shape[0], *self.input_shape)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encode(x)
        return z, self.decode(z)


class ConvAutoencoder(nn.Module):
    """Strided-conv encoder, transposed-conv decoder (classic MNIST CAE), sigmoid output.

    Input (n, c, s, s) in [0, 1]; any s >= 8. The decoder asks each transposed convolution for
    the encoder's exact intermediate size, so odd sizes (28 -> 14 -> 7 -> 3) round-trip.
    """

    def __init__(self, input_shape: Sequence[int], latent_dim: int = 10,
                 filters: Sequence[int] = (32, 64, 128)) -> None:
        super().__init__()
        c, h, w = (int(s) for s in input_shape)
        if min(h, w) < 8:
            raise InputError(f"conv autoencoder needs images of at least 8x8; got {h}x{w}")
        f1, f2, f3 = (int(f) for f in filters)
        self.input_shape = (c, h, w)
        self.conv1 = nn.Conv2d(c, f1, 5, stride=2, padding=2)
        self.conv2 = nn.Conv2d(f1, f2, 5, stride=2, padding=2)
        self.conv3 = nn.Conv2d(f2, f3, 3, stride=2, padding=0 if min(h, w) >= 16 else 1)
        with torch.no_grad():
            probe = torch.zeros(1, c, h, w)
            s1 = self.conv1(probe)
            s2 = self.conv2(s1)
            s3 = self.conv3(s2)
        self._sizes = [tuple(probe.shape[-2:]), tuple(s1.shape[-2:]), tuple(s2.shape[-2:])]
        self._bottleneck = tuple(s3.shape[1:])
        flat = int(np.prod(self._bottleneck))
        self.fc_enc = nn.Linear(flat, latent_dim)
        self.fc_dec = nn.Linear(latent_dim, flat)
        self.deconv3 = nn.ConvTranspose2d(f3, f2, 3, stride=2, padding=self.conv3.padding)
        self.deconv2 = nn.ConvTranspose2d(f2, f1, 5, stride=2, padding=2)
        self.deconv1 = nn.ConvTranspose2d(f1, c, 5, stride=2, padding=2)
        self.latent_dim = int(latent_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He init, zero biases: with torch's default init the signal shrinks through the stack,
        Adam then inflates the latent code and the sigmoid decoder saturates (stuck at the mean image)."""
        for mod in self.modules():
            if isinstance(mod, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                nn.init.kaiming_uniform_(mod.weight, nonlinearity="relu")
                nn.init.zeros_(mod.bias)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        return self.fc_enc(x.flatten(1))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc_dec(z)).view(z.shape[0], *self._bottleneck)
        x = F.relu(self.deconv3(x, output_size=self._sizes[2]))
        x = F.relu(self.deconv2(x, output_size=self._sizes[1]))
        return torch.sigmoid(self.deconv1(x, output_size=self._sizes[0]))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encode(x)
        return z, self.decode(z)


@dataclass
class AutoencoderConfig:
    """Everything that determines a pretrained autoencoder (and so its checkpoint key)."""

    arch: Literal["dense", "conv"] = "dense"
    latent_dim: int = 10
    epochs: int = 50
    batch_size: int = 256
    lr: float = 1e-3
    seed: int = 0
    #: Random affine augmentation (±10°, ±2/28 shift, ±10% scale) of each batch while pretraining.
    augment: bool = False
    #: Square side the images are resized to; None keeps the native size up to ``max_side``.
    image_size: int | None = None
    max_side: int = 64
    hidden: tuple[int, ...] = (500, 500, 2000)
    filters: tuple[int, ...] = (32, 64, 128)
    #: Learning rate decays by a cosine schedule to ``lr * lr_min_factor`` over the epochs.
    lr_min_factor: float = 0.1
    #: Start the sigmoid output at the data's mean (see :func:`start_at_the_mean`).
    output_bias_init: bool = True

    def validate(self) -> None:
        if self.arch not in ARCHS:
            raise choice_error("autoencoder arch", self.arch, ARCHS)
        for name in ("latent_dim", "epochs", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < (0 if name == "epochs" else 1):
                raise InputError(f"autoencoder {name} must be a {'non-negative' if name == 'epochs' else 'positive'} integer; got {value!r}")
        if not self.lr > 0:
            raise InputError(f"autoencoder lr must be > 0; got {self.lr!r}")


class AEHistory(list):
    """Per-epoch records of one pretraining (a list of dicts).

    ``from_checkpoint`` is True when the model was loaded instead of trained (the list is then
    empty and ``checkpoint_history`` holds the records saved with the checkpoint).
    """

    def __init__(self, records: list[dict[str, Any]] | None = None, *, from_checkpoint: bool = False,
                 checkpoint: Path | None = None, checkpoint_history: list[dict[str, Any]] | None = None,
                 seconds: float = 0.0) -> None:
        super().__init__(records or [])
        self.from_checkpoint = from_checkpoint
        self.checkpoint = checkpoint
        self.checkpoint_history = checkpoint_history or []
        self.seconds = seconds


def build_autoencoder(arch: str, input_shape: Sequence[int], latent_dim: int = 10, *,
                      hidden: Sequence[int] = (500, 500, 2000), filters: Sequence[int] = (32, 64, 128),
                      vectors: bool = False) -> nn.Module:
    """Make an untrained autoencoder for inputs of ``input_shape`` ((c, h, w) or (d,))."""
    if arch not in ARCHS:
        raise choice_error("autoencoder arch", arch, ARCHS)
    if arch == "conv":
        if vectors or len(input_shape) != 3:
            raise InputError(f"the conv autoencoder needs images; got inputs of shape {tuple(input_shape)} (use arch='dense')")
        return ConvAutoencoder(input_shape, latent_dim, filters)
    return DenseAutoencoder(input_shape, latent_dim, hidden, sigmoid_output=not vectors)


def data_fingerprint(images: np.ndarray) -> str:
    """sha256 (16 hex) of the array's dtype, shape and bytes."""
    from gpu_ops.data.base import hash_array

    return hash_array(np.asarray(images))


def checkpoint_key(fingerprint: str, cfg: AutoencoderConfig) -> str:
    """Hash of data fingerprint + architecture + hyperparameters (+ checkpoint format)."""
    blob = json.dumps({"data": fingerprint, "format": CHECKPOINT_FORMAT, **asdict(cfg)}, sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def checkpoint_file(checkpoint_path: Path, cfg: AutoencoderConfig, key: str) -> Path:
    """A directory (existing, or a path without suffix) gets one file per key; a file path is used as is."""
    checkpoint_path = Path(checkpoint_path)
    if checkpoint_path.is_dir() or (not checkpoint_path.exists() and checkpoint_path.suffix == ""):
        return checkpoint_path / f"ae-{cfg.arch}-z{cfg.latent_dim}-{key}.pt"
    return checkpoint_path


def random_affine(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random small affine warp per image (rotation ±10°, shift ±~7%, scale ±10%)."""
    n = x.shape[0]
    dev = x.device
    r = torch.rand(n, 4, generator=gen).to(dev)
    angle = (r[:, 0] * 2 - 1) * math.radians(10)
    scale = 1.0 + (r[:, 1] * 2 - 1) * 0.1
    tx = (r[:, 2] * 2 - 1) * 0.14
    ty = (r[:, 3] * 2 - 1) * 0.14
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@torch.no_grad()
def encode_tensor(model: nn.Module, X: torch.Tensor, batch_size: int = 1024,
                  device: torch.device | None = None) -> np.ndarray:
    """Latent vectors of a preprocessed tensor, (n, z) float32 numpy."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, X.shape[0], batch_size):
        xb = X[start:start + batch_size].to(device, non_blocking=True)
        with autocast(device):
            z = model.encode(xb)
        out.append(z.float().cpu())
    model.train(was_training)
    return torch.cat(out).numpy().astype(np.float32, copy=False)


def model_inputs(model: nn.Module, images: np.ndarray,
                 device: str | torch.device) -> tuple[nn.Module, torch.Tensor, torch.device]:
    """``model`` on the resolved ``device`` and ``images`` (n, h, w[, c]) uint8 (or (n, d) vectors)
    preprocessed as at training time (scaling, resize); InputError when they do not fit the model."""
    dev = resolve_device(device)
    model = model.to(dev)
    X = images_to_tensor(images, getattr(model, "image_size", None), getattr(model, "max_side", 64))
    expected = tuple(getattr(model, "input_shape", X.shape[1:]))
    if tuple(X.shape[1:]) != expected:
        raise InputError(f"images preprocess to shape {tuple(X.shape[1:])} but the autoencoder was trained on {expected}")
    return model, X, dev


def encode(model: nn.Module, images: np.ndarray, batch_size: int = 1024, device: str | torch.device = "auto") -> np.ndarray:
    """Latent vectors of ``images`` (n, h, w[, c]) uint8 (or (n, d) vectors): (n, latent) float32.

    The images get the same preprocessing (scaling, resize) as at training time.
    """
    model, X, dev = model_inputs(model, images, device)
    return encode_tensor(model, X, batch_size, dev)


def encode_with_error(model: nn.Module, images: np.ndarray, batch_size: int = 1024,
                      device: str | torch.device = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Latent vectors of ``images`` as :func:`encode` gives them, and each image's reconstruction
    error (mean squared error of the decoded image in the model's [0, 1] input scale): (n, latent)
    and (n,) float32."""
    model, X, dev = model_inputs(model, images, device)
    was_training = model.training
    model.eval()
    codes, errors = [], []
    with torch.no_grad():
        for start in range(0, X.shape[0], batch_size):
            xb = X[start:start + batch_size].to(dev, non_blocking=True)
            with autocast(dev):
                z, recon = model(xb)
            codes.append(z.float().cpu())
            errors.append(((recon.float() - xb.float()) ** 2).flatten(1).mean(dim=1).cpu())
    model.train(was_training)
    return torch.cat(codes).numpy().astype(np.float32), torch.cat(errors).numpy().astype(np.float32)


def move_data(X: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Keep the whole (preprocessed) dataset on the GPU when it is small enough."""
    if device.type == "cuda" and X.element_size() * X.nelement() < 2 * 1024**3:
        return X.to(device)
    return X


#: Re-initialisations allowed when the first epoch leaves the network dead.
MAX_RESTARTS = 3
#: A network is dead when, over a probe of clean samples, its reconstructions vary less than this
#: fraction of the inputs' own variance (mean per-pixel variance across the probe).
DEAD_VARIANCE_RATIO = 0.01
#: Optimiser steps before the dead-start check (mid-epoch on large data, after a few epochs on
#: small data). After 100 steps a healthy MNIST-70k network (seed 0) varied 0.19 as much as the
#: images, the dead one (seed 2) under 0.0001; after 50 steps the healthy one only 0.02.
DEAD_CHECK_STEPS = 100
#: Samples in the probe of the dead-start check.
DEAD_PROBE = 512


def start_at_the_mean(model: nn.Module, X: torch.Tensor, sample: int = 10_000) -> bool:
    """Set the bias of ``model``'s sigmoid output to the logit of the data's mean (per channel for
    the conv autoencoder, per pixel for the dense one); False for a model without a sigmoid output.

    An untrained network outputs about 0.5 everywhere while most pixels of a digit are 0, so the
    first steps push the whole decoder down, and Adam's equal-sized steps can switch every decoder
    ReLU off for good (a dead start). Started at the mean, the first 100 steps on MNIST-test
    (batch 64) reached reconstructions varying 0.44-0.47 as much as the images for seeds 0-4;
    without it 0.00-0.21, two of eight seeds below :data:`DEAD_VARIANCE_RATIO`.
    """
    idx = torch.linspace(0, X.shape[0] - 1, min(X.shape[0], sample)).round().long().unique()
    mean = X[idx].float().mean(0).clamp(1e-3, 1 - 1e-3)
    with torch.no_grad():
        if isinstance(model, ConvAutoencoder):
            m = mean.flatten(1).mean(1)
            model.deconv1.bias.copy_(torch.log(m / (1 - m)))
            return True
        last = model.decoder[-2] if isinstance(model, DenseAutoencoder) and isinstance(model.decoder[-1], nn.Sigmoid) else None
        if isinstance(last, nn.Linear):
            m = mean.flatten()
            last.bias.copy_(torch.log(m / (1 - m)))
            return True
    return False


def derived_seed(seed: int, restart: int) -> int:
    """The initialisation seed of restart ``restart`` (0: ``seed`` itself)."""
    return int(seed) + 7919 * int(restart)


@torch.no_grad()
def reconstruction_probe(model: nn.Module, X: torch.Tensor, device: torch.device,
                         probe: int = DEAD_PROBE) -> dict[str, float]:
    """How well ``model`` reconstructs an evenly spaced probe of up to ``probe`` clean samples of ``X``.

    Returns ``probe_mse`` (the model's MSE), ``mean_image_mse`` (the MSE of the best constant
    output, the probe's mean) and ``output_variance_ratio`` (mean per-pixel variance of the
    reconstructions across the probe over that of the inputs: 0 for a network whose output does
    not depend on its input, about 1 for a good one).
    """
    n = X.shape[0]
    idx = torch.linspace(0, n - 1, min(n, probe)).round().long().unique()
    xb = X[idx].to(device).float()
    was_training = model.training
    model.eval()
    with autocast(device):
        _, rec = model(xb)
    model.train(was_training)
    rec = rec.float()
    in_var = float(xb.var(0, unbiased=False).mean()) if len(idx) > 1 else 0.0
    out_var = float(rec.var(0, unbiased=False).mean()) if len(idx) > 1 else 0.0
    return {"probe_mse": float(F.mse_loss(rec, xb)), "mean_image_mse": in_var,
            "output_variance_ratio": out_var / in_var if in_var > 0 else 1.0}


def is_dead(stats: dict[str, float]) -> bool:
    """The dead-start criterion on :func:`reconstruction_probe`'s numbers: the reconstructions
    hardly depend on the input (see :data:`DEAD_VARIANCE_RATIO`)."""
    return stats["output_variance_ratio"] < DEAD_VARIANCE_RATIO


def fit_autoencoder_tensor(model: nn.Module, X: torch.Tensor, cfg: AutoencoderConfig, device: torch.device, *,
                           progress: bool = True, labels: np.ndarray | None = None, n_clusters: int | None = None,
                           eval_every: int = 5, resume: dict[str, Any] | None = None,
                           partial_path: Path | None = None, partial_every: int = 10,
                           partial_meta: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Pretrain ``model`` on preprocessed ``X`` (n, ...) with Adam + MSE; returns per-epoch records.

    With ``labels`` (and ``n_clusters``), every ``eval_every`` epochs the embedding is clustered
    with k-means and ACC/NMI/ARI are logged. ``partial_path`` receives a resumable checkpoint
    (model + optimizer + epoch) every ``partial_every`` epochs.

    Dead starts: after :data:`DEAD_CHECK_STEPS` optimiser steps (mid-epoch on large data), a probe
    of clean samples is reconstructed (:func:`reconstruction_probe`). When the reconstructions
    hardly vary from image to image (:func:`is_dead`), the network started dead: it is
    re-initialised with the seed :func:`derived_seed` gives and pretraining starts over, up to
    :data:`MAX_RESTARTS` times. Each dead attempt leaves a ``pretrain-restart`` record (first in
    the returned list); the first ``pretrain`` record carries ``restarts`` and ``init_seed``, the
    checked epoch's record the probe's numbers (``probe_mse``, ``mean_image_mse``,
    ``output_variance_ratio``, ``check_step``), the last record those of the trained network
    (``final_probe_mse``, ``final_output_variance_ratio``, ``mean_image_mse``).
    """
    from tqdm.auto import tqdm

    model.to(device).train()
    Xd = move_data(X, device)
    n = X.shape[0]
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total_steps = max(1, cfg.epochs * steps_per_epoch)
    # a pretraining shorter than the check cannot be judged (the degenerate-result check still can)
    check_step = DEAD_CHECK_STEPS if total_steps >= DEAD_CHECK_STEPS else -1

    def fresh_optimiser() -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: cfg.lr_min_factor + (1 - cfg.lr_min_factor) * 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps)))
        return opt, sched

    opt, sched = fresh_optimiser()
    amp = Amp(device)
    gen = torch.Generator().manual_seed(cfg.seed)
    history: list[dict[str, Any]] = []
    restart_records: list[dict[str, Any]] = []
    start_epoch = 0
    if resume:
        model.load_state_dict(resume["state_dict"])
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        gen.set_state(resume["generator"])
        history = list(resume.get("history", []))
        start_epoch = int(resume["epoch"])
        log.info("autoencoder: resuming pretraining at epoch %d/%d", start_epoch + 1, cfg.epochs)
    step = start_epoch * steps_per_epoch
    if not resume and cfg.output_bias_init:
        start_at_the_mean(model, X)

    def one_epoch(epoch: int) -> tuple[dict[str, Any], dict[str, float] | None]:
        """Train one epoch: (its record, the probe's numbers when the dead-start check ran in it).
        A dead network ends the epoch at the check."""
        nonlocal step
        t0 = time.perf_counter()
        perm = torch.randperm(n, generator=gen)
        total, count = 0.0, 0
        stats = None
        for start in range(0, n, cfg.batch_size):
            idx = perm[start:start + cfg.batch_size]
            xb = Xd[idx.to(Xd.device)] if Xd.device.type == "cuda" else Xd[idx]
            xb = xb.to(device, non_blocking=True)
            if cfg.augment and xb.ndim == 4:
                xb = random_affine(xb, gen)
            with amp.autocast():
                _, rec = model(xb)
            loss = F.mse_loss(rec.float(), xb)
            opt.zero_grad(set_to_none=True)
            amp.step(loss, opt)  # loss-scaled in fp16
            sched.step()
            total += float(loss.detach()) * xb.shape[0]
            count += xb.shape[0]
            step += 1
            if step == check_step:
                stats = {**reconstruction_probe(model, X, device), "check_step": step}
                if is_dead(stats) and len(restart_records) < MAX_RESTARTS and hasattr(model, "reset_parameters"):
                    break
        return {"phase": "pretrain", "epoch": epoch + 1, "loss": total / max(1, count),
                "lr": float(opt.param_groups[0]["lr"]), "seconds": time.perf_counter() - t0}, stats

    bar = tqdm(total=cfg.epochs, desc=f"pretrain {cfg.arch} AE", unit="epoch", disable=not progress, leave=False,
               initial=start_epoch)
    epoch = start_epoch
    while epoch < cfg.epochs:
        rec_, stats = one_epoch(epoch)
        history.append(rec_)
        if stats is not None:
            restarts = len(restart_records)
            if is_dead(stats) and restarts < MAX_RESTARTS and hasattr(model, "reset_parameters"):
                # A ReLU network can start dead: every input maps to (almost) the same output and
                # hardly any gradient gets out of that. Measured on MNIST-70k (seed 2): loss 0.101
                # for all 20 epochs, ACC 0.11.
                seed = derived_seed(cfg.seed, restarts + 1)
                restart_records.append({"phase": "pretrain-restart", "epoch": epoch + 1, "loss": rec_["loss"],
                                        "init_seed": derived_seed(cfg.seed, restarts), "next_seed": seed, **stats,
                                        "seconds": sum(h["seconds"] for h in history)})
                log.warning("autoencoder: after %d steps (loss %.4f) the reconstructions vary %.5f as much as "
                            "the images (dead below %.2f): the network started dead; re-initialising with seed "
                            "%d (restart %d of %d)", step, rec_["loss"], stats["output_variance_ratio"],
                            DEAD_VARIANCE_RATIO, seed, restarts + 1, MAX_RESTARTS)
                torch.manual_seed(seed)
                model.reset_parameters()  # type: ignore[operator]
                if cfg.output_bias_init:
                    start_at_the_mean(model, X)
                model.train()
                opt, sched = fresh_optimiser()
                history, epoch, step = [], 0, 0
                bar.reset()
                continue
            if is_dead(stats):
                log.warning("autoencoder: the network is still dead after %d restart(s) (reconstructions vary "
                            "%.5f as much as the images); the clustering will be poor", restarts,
                            stats["output_variance_ratio"])
            else:
                log.info("autoencoder: dead-start check after %d steps: the reconstructions vary %.4f as much as "
                         "the images (dead below %.2f), MSE %.4f against the mean image's %.4f", check_step,
                         stats["output_variance_ratio"], DEAD_VARIANCE_RATIO, stats["probe_mse"],
                         stats["mean_image_mse"])
            history[0].update(restarts=restarts, init_seed=derived_seed(cfg.seed, restarts))
            rec_.update(stats)
        if labels is not None and n_clusters and (epoch + 1) % max(1, eval_every) == 0 or (
                labels is not None and n_clusters and epoch + 1 == cfg.epochs):
            z = encode_tensor(model, X, device=device)
            pred, _ = quick_kmeans(z, n_clusters, cfg.seed)
            rec_.update(evaluate_labels(labels, pred))
            model.train()
        bar.update(1)
        bar.set_postfix(loss=f"{rec_['loss']:.5f}")
        log.info("pretrain %s AE epoch %d/%d %s", cfg.arch, epoch + 1, cfg.epochs, format_metrics(rec_))
        if partial_path is not None and partial_every and (epoch + 1) % partial_every == 0 and epoch + 1 < cfg.epochs:
            atomic_torch_save({"state_dict": model.state_dict(), "optimizer": opt.state_dict(),
                               "scheduler": sched.state_dict(), "generator": gen.get_state(),
                               "epoch": epoch + 1, "history": restart_records + history, **(partial_meta or {})},
                              partial_path)
        epoch += 1
    bar.close()
    if history:
        final = reconstruction_probe(model, X, device)
        history[-1].update(final_probe_mse=final["probe_mse"], mean_image_mse=final["mean_image_mse"],
                           final_output_variance_ratio=final["output_variance_ratio"])
    model.eval()
    return restart_records + history


def _prepare(images: np.ndarray, cfg: AutoencoderConfig) -> tuple[torch.Tensor, bool]:
    X = images_to_tensor(images, cfg.image_size, cfg.max_side)
    vectors = X.ndim == 2
    return X, vectors


def _attach_preprocessing(model: nn.Module, cfg: AutoencoderConfig, X: torch.Tensor) -> nn.Module:
    model.image_size = None if X.ndim == 2 else int(X.shape[-1])  # type: ignore[assignment]
    model.max_side = cfg.max_side  # type: ignore[assignment]
    model.arch = cfg.arch  # type: ignore[assignment]
    return model


def train_autoencoder(
    images: np.ndarray,
    arch: Literal["dense", "conv"] = "conv",
    latent_dim: int = 10,
    epochs: int = 50,
    batch_size: int = 256,
    seed: int = 0,
    device: str | torch.device = "auto",
    checkpoint_path: Path | str | None = None,
    progress: bool = True,
    *,
    lr: float = 1e-3,
    augment: bool = False,
    image_size: int | None = None,
    labels: np.ndarray | None = None,
    n_clusters: int | None = None,
    eval_every: int = 5,
    **arch_options: Any,
) -> tuple[nn.Module, AEHistory]:
    """Pretrain (or load) an autoencoder on ``images``.

    Parameters
    ----------
    images : np.ndarray
        (n, h, w) or (n, h, w, c) uint8 images (or (n, d) float vectors, dense only).
    arch : {"dense", "conv"}
    latent_dim, epochs, batch_size, seed : int
    device : "auto" | "cpu" | "cuda"
    checkpoint_path : Path or None
        A folder (one file per configuration, named by its key) or a file. A checkpoint whose key
        (hash of data fingerprint + arch + hyperparameters) matches is loaded instead of
        training; otherwise the model is trained and saved atomically. A partly trained run
        leaves ``<file>.partial`` and resumes from it.
    progress : bool
        Show a tqdm bar with the loss.
    labels, n_clusters : optional
        Log ACC/NMI/ARI of k-means on the embedding every ``eval_every`` epochs.

    Returns
    -------
    (model, history) : the trained model (eval mode, on ``device``) and an :class:`AEHistory`
    (list of per-epoch dicts; empty with ``from_checkpoint=True`` when loaded).
    """
    cfg = AutoencoderConfig(arch=arch, latent_dim=int(latent_dim), epochs=int(epochs), batch_size=int(batch_size),
                            lr=float(lr), seed=int(seed), augment=bool(augment), image_size=image_size,
                            **{k: tuple(v) if isinstance(v, list) else v for k, v in arch_options.items()})
    cfg.validate()
    X, _ = _prepare(images, cfg)
    dev = resolve_device(device)
    model, history = train_or_load(X, cfg, dev, data_fingerprint(images), checkpoint_path, progress,
                                    labels, n_clusters, eval_every)
    return model, history


def train_or_load(X: torch.Tensor, cfg: AutoencoderConfig, dev: torch.device, fingerprint: str,
                   checkpoint_path: Path | str | None, progress: bool, labels: np.ndarray | None,
                   n_clusters: int | None, eval_every: int) -> tuple[nn.Module, AEHistory]:
    """Pretrain the autoencoder on ``X``, or load the checkpoint of the same data and settings."""
    vectors = X.ndim == 2
    seed_everything(cfg.seed)
    model = build_autoencoder(cfg.arch, tuple(X.shape[1:]), cfg.latent_dim, hidden=cfg.hidden,
                              filters=cfg.filters, vectors=vectors)
    _attach_preprocessing(model, cfg, X)
    key = checkpoint_key(fingerprint, cfg)
    ckpt = checkpoint_file(Path(checkpoint_path), cfg, key) if checkpoint_path is not None else None
    if ckpt is not None and ckpt.is_file():
        try:
            state = torch.load(ckpt, map_location="cpu", weights_only=False)
        except Exception as exc:  # noqa: BLE001 - a broken checkpoint is retrained, not fatal
            log.warning("autoencoder checkpoint %s unreadable (%s): training again", ckpt, exc)
            state = None
        if state is not None and state.get("key") == key:
            model.load_state_dict(state["state_dict"])
            model.to(dev).eval()
            log.info("autoencoder: loaded checkpoint %s (key %s); skipping pretraining", ckpt, key)
            return model, AEHistory(from_checkpoint=True, checkpoint=ckpt,
                                    checkpoint_history=state.get("history", []))
        if state is not None:
            log.info("autoencoder: checkpoint %s belongs to another configuration (key %s != %s): training again",
                     ckpt, state.get("key"), key)
    partial = ckpt.with_name(ckpt.name + ".partial") if ckpt is not None else None
    resume = None
    if partial is not None and partial.is_file():
        try:
            resume = torch.load(partial, map_location="cpu", weights_only=False)
            if resume.get("key") != key:
                resume = None
        except Exception:  # noqa: BLE001
            resume = None
    t0 = time.perf_counter()
    records = fit_autoencoder_tensor(model, X, cfg, dev, progress=progress, labels=labels, n_clusters=n_clusters,
                                     eval_every=eval_every, resume=resume, partial_path=partial,
                                     partial_every=10, partial_meta={"key": key})
    seconds = time.perf_counter() - t0
    if ckpt is not None:
        atomic_torch_save({"key": key, "format": CHECKPOINT_FORMAT, "config": asdict(cfg), "fingerprint": fingerprint,
                           "input_shape": tuple(X.shape[1:]), "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
                           "history": records}, ckpt)
        if partial is not None and partial.exists():
            partial.unlink()
        log.info("autoencoder: saved checkpoint %s", ckpt)
    return model, AEHistory(records, checkpoint=ckpt, seconds=seconds)


def load_autoencoder(path: Path | str, device: str | torch.device = "auto") -> nn.Module:
    """Rebuild a model from a checkpoint written by :func:`train_autoencoder` (for extractors)."""
    state = torch.load(Path(path), map_location="cpu", weights_only=False)
    cfg = AutoencoderConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in state["config"].items()})
    shape = tuple(state["input_shape"])
    model = build_autoencoder(cfg.arch, shape, cfg.latent_dim, hidden=cfg.hidden, filters=cfg.filters,
                              vectors=len(shape) == 1)
    model.load_state_dict(state["state_dict"])
    model.image_size = None if len(shape) == 1 else int(shape[-1])  # type: ignore[assignment]
    model.max_side = cfg.max_side  # type: ignore[assignment]
    model.arch = cfg.arch  # type: ignore[assignment]
    return model.to(resolve_device(device)).eval()
