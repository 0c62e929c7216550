"""Deep K-Means (Fard, Thonet & Gaussier, 2020): an autoencoder trained jointly with a
differentiable k-means loss on learnable centroids.

Loss per sample ``x`` with embedding ``z = f(x)``::

    ||x - g(z)||^2  +  lambda * sum_k ||z - r_k||^2 * softmax_k(-alpha * ||z - r_k||^2)

``alpha`` (the inverse temperature of the soft assignment) is annealed upwards over the epochs,
so assignments go from soft to (almost) hard k-means. The assignment of a whole batch is one
(b, k) distance matrix and one softmax: no per-sample loop.

Started from a partition that is better than k-means on the pretrained embedding (N2D's, see
``DeepConfig.cluster_init``), a few warm-up epochs first pull every embedding towards the centroid
of its initial cluster with hard assignments; otherwise DKM's own nearest-centroid assignments
would fall back to what k-means sees in the embedding.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from gpu_ops.cluster.sources import NearestCentre
from gpu_ops.deep._common import Amp, evaluate_labels, format_metrics, log


def squared_distances(z: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """(b, d) x (k, d) -> (b, k) squared Euclidean distances, one matrix product, clamped at 0."""
    z2 = (z * z).sum(1, keepdim=True)
    c2 = (centroids * centroids).sum(1)
    return (z2 + c2.unsqueeze(0) - 2.0 * z @ centroids.t()).clamp_min_(0.0)


def dkm_assignments(z: torch.Tensor, centroids: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Vectorised DKM soft assignment: (squared distances (b, k), weights softmax(-alpha d) (b, k))."""
    d2 = squared_distances(z.float(), centroids.float())
    return d2, torch.softmax(-float(alpha) * d2, dim=1)


def dkm_cluster_loss(z: torch.Tensor, centroids: torch.Tensor, alpha: float,
                     fixed: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the batch of ``sum_k d(z, r_k) * G_k(z, alpha)``.

    ``fixed`` (b,) int64 replaces the soft assignment G by these hard ones (the warm-up epochs).
    """
    if fixed is not None:
        return (z.float() - centroids.float()[fixed]).pow(2).sum(1).mean()
    d2, g = dkm_assignments(z, centroids, alpha)
    return (d2 * g).sum(1).mean()


def alpha_schedule(n: int, alpha0: float = 0.1) -> list[float]:
    """DKM's annealing: alpha_1 = alpha0, alpha_{i+1} = 2^(1 / log(i + 1)^2) * alpha_i."""
    alphas = [float(alpha0)]
    for i in range(1, max(1, n)):
        alphas.append(alphas[-1] * 2 ** (1.0 / math.log(i + 1) ** 2))
    return alphas[:max(1, n)]


def train_dkm(model: nn.Module, X: torch.Tensor, centroids: np.ndarray, device: torch.device, *,
              epochs: int = 20, batch_size: int = 256, lr: float = 1e-3, lam: float = 1.0,
              alpha0: float = 0.1, augment: bool = False, init_labels: np.ndarray | None = None,
              warmup_epochs: int = 0, seed: int = 0, labels: np.ndarray | None = None,
              progress: bool = True) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """Jointly train ``model`` and the centroids; returns (hard labels, centroids, per-epoch records).

    The reconstruction term is the per-sample sum of squared errors (as in the paper), so
    ``lam`` weighs two quantities of comparable scale. With ``init_labels`` (n,), the first
    ``warmup_epochs`` epochs pull each embedding towards the centroid of its initial cluster
    (hard assignments) before DKM's own soft assignments take over with the alpha schedule.
    """
    from tqdm.auto import tqdm

    from gpu_ops.deep.autoencoder import random_affine, move_data, encode_tensor

    model.to(device).train()
    C = nn.Parameter(torch.as_tensor(centroids, dtype=torch.float32, device=device).clone())
    opt = torch.optim.Adam([*model.parameters(), C], lr=lr)
    amp = Amp(device)
    Xd = move_data(X, device)
    n = X.shape[0]
    gen = torch.Generator().manual_seed(seed)
    history: list[dict[str, Any]] = []
    fixed_all = torch.as_tensor(init_labels, dtype=torch.int64) if init_labels is not None else None
    warmup = int(warmup_epochs) if fixed_all is not None else 0
    alphas = [0.0] * warmup + alpha_schedule(epochs, alpha0)
    bar = tqdm(range(warmup + epochs), desc="DKM", unit="epoch", disable=not progress, leave=False)
    for epoch in bar:
        t0 = time.perf_counter()
        alpha = alphas[epoch]
        warm = epoch < warmup
        perm = torch.randperm(n, generator=gen)
        s_rec = s_clu = 0.0
        for start in range(0, n, batch_size):
            idx = perm[start:start + batch_size]
            xb = (Xd[idx.to(Xd.device)] if Xd.device.type == "cuda" else Xd[idx]).to(device, non_blocking=True)
            if augment and xb.ndim == 4:
                xb = random_affine(xb, gen)
            with amp.autocast():
                z, rec = model(xb)
            rec_loss = (rec.float() - xb).pow(2).flatten(1).sum(1).mean()
            clu_loss = dkm_cluster_loss(z.float(), C, alpha, fixed_all[idx].to(device) if warm else None)
            loss = rec_loss + lam * clu_loss
            opt.zero_grad(set_to_none=True)
            amp.step(loss, opt)  # loss-scaled in fp16
            s_rec += float(rec_loss.detach()) * len(idx)
            s_clu += float(clu_loss.detach()) * len(idx)
        z_all = torch.from_numpy(encode_tensor(model, X, device=device))
        pred = NearestCentre(C.detach().float().cpu().numpy())(z_all.numpy())[0]
        rec_ = {"phase": "dkm-warmup" if warm else "dkm", "epoch": epoch + 1, "alpha": alpha, "rec": s_rec / n, "clu": s_clu / n,
                "loss": (s_rec + lam * s_clu) / n, "seconds": time.perf_counter() - t0}
        rec_.update(evaluate_labels(labels, pred))
        history.append(rec_)
        bar.set_postfix(loss=f"{rec_['loss']:.4f}")
        log.info("DKM %sepoch %d/%d %s", "warm-up " if warm else "", epoch + 1, warmup + epochs, format_metrics(rec_))
        model.train()
    model.eval()
    z_all = torch.from_numpy(encode_tensor(model, X, device=device))
    Cc = C.detach().float().cpu()
    pred = NearestCentre(Cc.numpy())(z_all.numpy())[0]
    return pred, Cc.numpy(), history
