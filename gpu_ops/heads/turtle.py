"""TURTLE heads on frozen features (Gadetsky et al., "Let Go of Your Labels with Unsupervised
Transfer", ICML 2024).

A labelling of the rows is good when a linear classifier trained on it generalises in every
representation space. A *task encoder* (one weight-normalised linear layer per space) labels
each row with the mean of its spaces' softmax outputs. *Inner* linear classifiers, one per
space, take ``inner_steps`` Adam steps on the current labels (warm-started from the last outer
step), and the task encoder then descends

    sum_s CE(inner_s(z_s), labels) - gamma * sum_s H(mean of space s's label probabilities)

(the inner classifiers' fit to the labels, with their weights held fixed, minus an entropy term
on each space's cluster marginal against collapse). The representation spaces are the
backbones of a store whose rows concatenate several (the ``backbones`` metadata); each is
centred, projected on its principal axes, L2-normalised and scaled (:meth:`InputTransform.fit_spaces`).

Several task encoders (restarts) train at once, each with its own inner classifiers. To bound the
time, after ``prune_epoch`` epochs only the ``keep_heads`` restarts with the lowest objective over
all rows train on, and the one with the lowest objective at the end is kept. (On CIFAR-10 photo
features the objective ranks restarts by accuracy only loosely: BENCHMARKS.md.)
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from gpu_ops.errors import InputError
from gpu_ops.heads.common import HeadConfig, MultiHead, Rows, scores

log = logging.getLogger("gpu_ops.heads")


@dataclass
class TurtleConfig(HeadConfig):
    """TURTLE settings: the reference's gamma 10, Adam at 1e-3 for the task encoder and the inner
    classifiers, 10 warm-started inner steps per outer step; on CPU-sized budgets a batch of 5,000
    rows (the reference: 10,000) and each space reduced to its first 256 principal axes."""

    n_heads: int = 8  #: task encoders (restarts) trained at once; the one with the lowest objective is kept
    keep_heads: int = 2  #: restarts that train on after ``prune_epoch`` (those with the lowest objective)
    prune_epoch: int = 25  #: the epoch after which the restarts are pruned to ``keep_heads`` (0: never)
    neighbors: int = 0  #: TURTLE mines no neighbours
    epochs: int = 400  #: passes over the rows, each of ceil(n / batch_size) outer steps
    batch_size: int = 5000
    lr: float = 1e-3  #: Adam, task encoder
    weight_decay: float = 0.0
    pca_dim: int | None = 256  #: principal axes kept per representation space (None: all)
    gamma: float = 10.0  #: weight of the cluster-marginal entropy
    inner_lr: float = 1e-3  #: Adam, inner classifiers
    inner_steps: int = 10  #: inner classifier steps per outer step
    #: Rows are scaled to this norm in each space (None: the square root of the space's width, so
    #: that a coordinate has unit mean square and Adam's steps suit every width).
    row_norm: float | None = None

    @classmethod
    def algorithm_name(cls) -> str:
        return "turtle"

    def _positive_ints(self) -> tuple[str, ...]:
        return ("n_heads", "batch_size", "inner_steps", "keep_heads")

    def validate(self) -> None:
        super().validate()
        name = self.algorithm_name()
        if not _is_int(self.prune_epoch) or self.prune_epoch < 0:
            raise InputError(f"{name} prune_epoch must be an integer >= 0; got {self.prune_epoch!r}")
        if self.neighbors != 0:
            raise InputError(f"{name} neighbors must be 0 (TURTLE mines no neighbours); got {self.neighbors!r}")
        if not self.l2_normalize or self.whiten:
            raise InputError(f"{name} normalises each representation space itself: l2_normalize must be true "
                             f"and whiten false; got l2_normalize={self.l2_normalize!r}, whiten={self.whiten!r}")
        if not (_is_number(self.gamma) and self.gamma >= 0):
            raise InputError(f"{name} gamma must be a number >= 0; got {self.gamma!r}")
        if not (_is_number(self.inner_lr) and self.inner_lr > 0):
            raise InputError(f"{name} inner_lr must be a positive number; got {self.inner_lr!r}")
        if self.hidden != 0:
            raise InputError(f"{name} task encoders are linear: hidden must be 0; got {self.hidden!r}")
        if self.row_norm is not None and not (isinstance(self.row_norm, (int, float)) and self.row_norm > 0):
            raise InputError(f"{name} row_norm must be a positive number or None; got {self.row_norm!r}")


class SpaceLinear(nn.Module):
    """``n_heads`` linear maps of one representation space's columns to ``k`` logits, batched:
    (b, d) -> (n_heads, b, k). ``weight_norm``: each output's weight vector is ``g v / |v|``."""

    def __init__(self, dim: int, k: int, n_heads: int, weight_norm: bool) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(dim)  # nn.Linear's default initialisation
        self.v = nn.Parameter(torch.empty(n_heads, dim, k).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(n_heads, 1, k).uniform_(-bound, bound))
        self.g = nn.Parameter(self.v.detach().norm(dim=1, keepdim=True)) if weight_norm else None

    def weight(self) -> torch.Tensor:
        if self.g is None:
            return self.v
        return self.g * self.v / self.v.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, z.unsqueeze(0).expand(self.v.shape[0], -1, -1), self.weight())


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross entropy of ``logits`` (h, b, k) against probabilities ``target`` (h, b, k), per head (h,)."""
    return -(target * torch.log_softmax(logits, dim=-1)).sum(dim=-1).mean(dim=1)


def marginal_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy of the mean of ``probs`` (h, b, k) over the rows, per head (h,)."""
    return torch.special.entr(probs.mean(dim=1)).sum(dim=-1)


class Turtle(nn.Module):
    """The task encoders of every restart and the inner classifiers, for the given spaces."""

    def __init__(self, spaces: tuple[tuple[int, int], ...], k: int, n_heads: int) -> None:
        super().__init__()
        self.spaces, self.k, self.n_heads = spaces, k, n_heads
        self.encoders = nn.ModuleList(SpaceLinear(b - a, k, n_heads, True) for a, b in spaces)
        self.inner = nn.ModuleList(SpaceLinear(b - a, k, n_heads, False) for a, b in spaces)

    def space_probs(self, z: torch.Tensor) -> list[torch.Tensor]:
        """Each space's task-encoder probabilities (n_heads, b, k) for rows ``z`` (b, p)."""
        return [torch.softmax(enc(z[:, a:b]), dim=-1) for enc, (a, b) in zip(self.encoders, self.spaces)]

    def objective(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """``(fit, entropy, space_probs)``: the inner classifiers' cross entropy against the
        labels and the spaces' marginal entropies, each summed over spaces, per head (n_heads,)."""
        per_space = self.space_probs(z)
        labels = sum(per_space) / len(per_space)
        fit = sum(soft_cross_entropy(inner(z[:, a:b]).detach(), labels) for inner, (a, b) in zip(self.inner, self.spaces))
        entropy = sum(marginal_entropy(p) for p in per_space)
        return fit, entropy, per_space  # type: ignore[return-value]

    def keep(self, heads: np.ndarray, optimizers: list[torch.optim.Optimizer]) -> None:
        """Keep only restarts ``heads``: every parameter (first axis: the restart) is replaced by
        its rows ``heads``, in the optimisers too, with their state cut the same way, so the kept
        restarts train on exactly as before."""
        index = torch.as_tensor(np.asarray(heads, dtype=np.int64), device=self.encoders[0].v.device)
        for module in [*self.encoders, *self.inner]:
            for name, old in list(module.named_parameters()):
                new = nn.Parameter(old.detach().index_select(0, index))
                setattr(module, name, new)
                for opt in optimizers:
                    for group in opt.param_groups:
                        group["params"] = [new if p is old else p for p in group["params"]]
                    if old in opt.state:
                        state = opt.state.pop(old)
                        opt.state[new] = {key: value.index_select(0, index)
                                          if torch.is_tensor(value) and value.shape == old.shape else value
                                          for key, value in state.items()}  # Adam's moments; not its step count
        self.n_heads = len(heads)

    def inner_loss(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return sum(soft_cross_entropy(inner(z[:, a:b]), labels).sum()  # type: ignore[return-value]
                   for inner, (a, b) in zip(self.inner, self.spaces))

    def as_multihead(self, head: int, dim: int) -> MultiHead:
        """Restart ``head``'s task encoder as a :class:`MultiHead` with one head per space, each
        reading only its space's columns (zero weights elsewhere): the mean of their softmax
        outputs is the labelling."""
        out = MultiHead(dim, self.k, len(self.spaces))
        with torch.no_grad():
            out.weights[0].zero_()
            for s, (enc, (a, b)) in enumerate(zip(self.encoders, self.spaces)):
                out.weights[0][s, a:b] = enc.weight()[head].cpu()
                out.biases[0][s] = enc.bias[head].cpu()
        return out


@torch.no_grad()
def full_objective(model: Turtle, rows: Rows, gamma: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, torch.Tensor]:
    """Each restart's objective over every row: ``(objective, fit, entropy, labels)``, the labels
    (n_heads, n, k) being the task encoders' mean probabilities."""
    fit_sum = torch.zeros(model.n_heads, dtype=torch.float64)
    marg = [torch.zeros(model.n_heads, model.k, dtype=torch.float64) for _ in model.spaces]
    labels = []
    for z in rows.batches():
        per_space = model.space_probs(z)
        lab = sum(per_space) / len(per_space)
        fit_sum += sum(soft_cross_entropy(inner(z[:, a:b]), lab)
                       for inner, (a, b) in zip(model.inner, model.spaces)).double().cpu() * len(z)
        for m, p in zip(marg, per_space):
            m += p.sum(dim=1).double().cpu()
        labels.append(lab.cpu())
    fit = (fit_sum / rows.n).numpy()
    entropy = sum(torch.special.entr(m / rows.n).sum(dim=-1) for m in marg).numpy()  # type: ignore[union-attr]
    return fit - gamma * entropy, fit, entropy, torch.cat(labels, dim=1)


def train_turtle(rows: Rows, neighbors: np.ndarray | None, k: int, cfg: TurtleConfig, rng: np.random.Generator,
                 labels: np.ndarray | None, spaces: tuple[tuple[int, int], ...]) -> dict[str, Any]:
    """Train ``cfg.n_heads`` TURTLE task encoders on ``rows`` whose column ranges ``spaces`` are the
    representation spaces; keep the one with the lowest objective over all rows.

    Returns ``model`` (the kept task encoder, a :class:`MultiHead` with one head per space whose
    probabilities are averaged), ``kept_head``, ``objectives`` (each restart's last objective; a
    pruned one's at the pruning), ``labels`` (n,) and ``history``.
    """
    del neighbors  # TURTLE needs none
    device = rows.device
    model = Turtle(spaces, k, cfg.n_heads).to(device)
    outer = torch.optim.Adam(model.encoders.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    inner = torch.optim.Adam(model.inner.parameters(), lr=cfg.inner_lr)
    n = rows.n
    batch = min(cfg.batch_size, n)
    steps_per_epoch = math.ceil(n / batch)
    history: list[dict[str, Any]] = []
    objectives = np.zeros(cfg.n_heads)
    last = np.zeros(cfg.n_heads)  # each restart's latest objective (a pruned one's at the pruning)
    alive = np.arange(cfg.n_heads)  # the restarts still training
    kept = 0
    for epoch in range(1, cfg.epochs + 1):
        total = 0.0
        for _ in range(steps_per_epoch):
            z = rows.take(np.sort(rng.choice(n, size=batch, replace=False)))
            with torch.no_grad():
                target = sum(model.space_probs(z)) / len(spaces)
            for _ in range(cfg.inner_steps):
                inner.zero_grad(set_to_none=True)
                model.inner_loss(z, target).backward()  # type: ignore[arg-type]
                inner.step()
            fit, entropy, _ = model.objective(z)
            loss = fit - cfg.gamma * entropy
            outer.zero_grad(set_to_none=True)
            loss.sum().backward()  # every restart learns on its own loss
            outer.step()
            total += float(loss.detach().mean())
        objectives, fit_all, entropy_all, probs = full_objective(model, rows, cfg.gamma)
        kept = int(np.argmin(objectives))
        pred = probs[kept].argmax(dim=1).numpy()
        record = {"phase": "turtle", "epoch": epoch, "loss": float(objectives[kept]), "head": int(alive[kept]),
                  "fit": float(fit_all[kept]), "entropy": float(entropy_all[kept]),
                  "objectives": [round(float(v), 6) for v in objectives], "heads": [int(h) for h in alive],
                  "train_loss": total / steps_per_epoch, **scores(labels, pred)}
        if labels is not None and len(alive) > 1:  # every restart's accuracy, to judge the choice
            record["head_acc"] = [round(scores(labels, probs[h].argmax(dim=1).numpy())["acc"], 4)
                                  for h in range(len(alive))]
        history.append(record)
        last[alive] = objectives
        if epoch == cfg.prune_epoch and cfg.keep_heads < len(alive):
            best = np.sort(np.argsort(objectives, kind="stable")[:cfg.keep_heads])
            model.keep(best, [outer, inner])
            alive, objectives = alive[best], objectives[best]
            kept = int(np.argmin(objectives))
        if cfg.progress:
            log.info("turtle epoch %d: %s", epoch, " ".join(f"{key}={value:.4f}" for key, value in record.items()
                                                           if isinstance(value, float)))
    _, _, _, probs = full_objective(model, rows, cfg.gamma)
    pred = probs[kept].argmax(dim=1).numpy()
    return {"model": model.as_multihead(kept, rows.dim), "kept_head": int(alive[kept]),
            "objectives": [float(v) for v in last], "labels": pred.astype(np.int64), "history": history}
