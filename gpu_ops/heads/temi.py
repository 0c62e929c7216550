"""TEMI heads on frozen features (Adaloglou et al., "Exploring the limits of deep image
clustering using pretrained models", BMVC 2023).

Each row is paired with one of its mined nearest neighbours; both go through a student and a
teacher copy of every head (the teacher an exponential moving average of the student). The
loss of a head is the weighted pointwise mutual information of the pair,

    - w(x, n) * log sum_c (p_s(c|x) p_t(c|n))^beta / p_t(c)

symmetrised over the two views, with ``beta`` 0.6, ``w = <p_t(x), p_t(n)>`` (the teachers'
agreement) and ``p_t(c)`` a moving average of the teacher's cluster marginal. Heads are
MLPs with a weight-normalised last layer (DINO's projection head). The kept head is the
teacher head with the lowest loss over the last epoch.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from gpu_ops.errors import InputError
from gpu_ops.heads.common import HeadConfig, MultiHead, Rows, predict_all, scores

log = logging.getLogger("gpu_ops.heads")


@dataclass
class TemiConfig(HeadConfig):
    """TEMI settings: the reference's 50 neighbours, beta 0.6, student and teacher temperature
    0.1, cluster-marginal momentum 0.9, AdamW with warm-up and cosine decay, weight decay 1e-4,
    teacher momentum rising to 1 (cosine) and 2-layer heads with an L2-normalised bottleneck and a
    weight-normalised last layer; fewer, narrower heads, a higher learning rate and a faster
    teacher than the reference, so that training fits minutes on two CPU cores (noted per field)."""

    n_heads: int = 3  #: the reference trains 50 on a GPU
    neighbors: int = 50
    epochs: int = 10
    batch_size: int = 256
    lr: float = 1e-3  #: per 256 rows (scaled linearly with the batch size); the reference: 1e-4
    weight_decay: float = 1e-4
    hidden: int = 256  #: the reference: 512
    l2_normalize: bool = False
    bottleneck: int = 128  #: the reference: 256
    beta: float = 0.6
    student_temp: float = 0.1
    teacher_temp: float = 0.1
    #: Teacher EMA momentum at the start (rising to 1): the reference's 0.996 suits its tens of
    #: thousands of steps; with hundreds the teacher hardly moves (MNIST test pixels, 8 epochs:
    #: ACC 0.435 at 0.99, 0.626 at 0.9).
    momentum_teacher: float = 0.9
    probs_momentum: float = 0.9
    warmup_epochs: int = 2
    min_lr: float = 1e-6
    freeze_last_layer: int = 1  #: epochs during which the last layer is not updated

    @classmethod
    def algorithm_name(cls) -> str:
        return "temi"

    def validate(self) -> None:
        super().validate()
        if not _is_num(self.beta) or not 0 < self.beta <= 1:
            raise InputError(f"temi beta must be a number in (0, 1]; got {self.beta!r}")
        for key in ("student_temp", "teacher_temp"):
            if not _is_num(getattr(self, key)) or getattr(self, key) <= 0:
                raise InputError(f"temi {key} must be a positive number; got {getattr(self, key)!r}")
        for key in ("momentum_teacher", "probs_momentum"):
            if not _is_num(getattr(self, key)) or not 0 <= getattr(self, key) <= 1:
                raise InputError(f"temi {key} must be a number in [0, 1]; got {getattr(self, key)!r}")
        for key in ("bottleneck", "warmup_epochs", "freeze_last_layer"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InputError(f"temi {key} must be an integer >= 0; got {value!r}")


def _is_num(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def cosine_schedule(base: float, final: float, steps: int, warmup_steps: int = 0, start: float = 0.0) -> np.ndarray:
    """``steps`` values: linear warm-up from ``start`` to ``base``, then cosine decay to ``final``."""
    warmup_steps = min(warmup_steps, steps)
    warm = np.linspace(start, base, warmup_steps, endpoint=False) if warmup_steps else np.empty(0)
    rest = np.arange(steps - warmup_steps)
    cos = final + 0.5 * (base - final) * (1 + np.cos(np.pi * rest / max(len(rest), 1)))
    return np.concatenate([warm, cos])


def temi_loss(s1: torch.Tensor, s2: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor, pk: torch.Tensor,
              cfg: TemiConfig) -> torch.Tensor:
    """TEMI loss per head (n_heads,) from student logits ``s1``, ``s2`` and teacher logits ``t1``,
    ``t2`` (n_heads, b, k) of the two views; ``pk`` (n_heads, 1, k) the teacher's cluster marginal."""
    ps1 = torch.softmax(s1 / cfg.student_temp, dim=-1)
    ps2 = torch.softmax(s2 / cfg.student_temp, dim=-1)
    pt1 = torch.softmax(t1 / cfg.teacher_temp, dim=-1)
    pt2 = torch.softmax(t2 / cfg.teacher_temp, dim=-1)
    weight = (pt1 * pt2).sum(dim=-1)

    def pmi(ps: torch.Tensor, pt: torch.Tensor) -> torch.Tensor:
        return -((ps * pt).pow(cfg.beta) / pk).sum(dim=-1).log()

    return 0.5 * ((weight * pmi(ps1, pt2)).mean(dim=1) + (weight * pmi(ps2, pt1)).mean(dim=1))


def train_temi(rows: Rows, neighbors: np.ndarray, k: int, cfg: TemiConfig, rng: np.random.Generator,
               labels: np.ndarray | None) -> dict[str, Any]:
    """Train ``cfg.n_heads`` TEMI heads on ``rows``; keep the teacher head with the lowest loss.

    Returns ``model`` (one-head :class:`MultiHead`), ``kept_head``, ``objectives`` (each head's
    mean loss over the last epoch), ``labels`` (n,) and ``history``.
    """
    device = rows.device
    student = MultiHead(rows.dim, k, cfg.n_heads, cfg.hidden, cfg.bottleneck).to(device)
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    decay = [p for name, p in student.named_parameters() if not name.startswith("biases") and name != "last_g"]
    rest = [p for name, p in student.named_parameters() if name.startswith("biases") or name == "last_g"]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}])
    n = rows.n
    steps_per_epoch = -(-n // cfg.batch_size)
    steps = max(1, cfg.epochs * steps_per_epoch)
    lr = cosine_schedule(cfg.lr * cfg.batch_size / 256, cfg.min_lr, steps, cfg.warmup_epochs * steps_per_epoch)
    momentum = cosine_schedule(cfg.momentum_teacher, 1.0, steps)
    pk = torch.full((cfg.n_heads, 1, k), 1.0 / k, device=device)
    history: list[dict[str, Any]] = []
    objectives = np.zeros(cfg.n_heads)
    kept, step = 0, 0
    last_layer = [student.last_v, student.last_g] if cfg.bottleneck else []
    for epoch in range(1, cfg.epochs + 1):
        perm = rng.permutation(n)
        sums = torch.zeros(cfg.n_heads, dtype=torch.float64)
        for start in range(0, n, cfg.batch_size):
            anchors = perm[start:start + cfg.batch_size]
            b = len(anchors)
            partners = neighbors[anchors, rng.integers(0, neighbors.shape[1], b)]
            x = rows.take(np.concatenate([anchors, partners]))
            with torch.no_grad():
                t = teacher(x)
                probs = torch.softmax(t / cfg.teacher_temp, dim=-1)
                pk = pk * cfg.probs_momentum + probs.mean(dim=1, keepdim=True) * (1 - cfg.probs_momentum)
            s = student(x)
            loss = temi_loss(s[:, :b], s[:, b:], t[:, :b], t[:, b:], pk, cfg)
            for group in optimizer.param_groups:
                group["lr"] = float(lr[step])
            optimizer.zero_grad(set_to_none=True)
            loss.mean().backward()
            if epoch <= cfg.freeze_last_layer:
                for p in last_layer:
                    p.grad = None
            optimizer.step()
            with torch.no_grad():
                m = float(momentum[step])
                for pt, ps in zip(teacher.parameters(), student.parameters()):
                    pt.mul_(m).add_(ps.detach(), alpha=1 - m)
            sums += loss.detach().cpu().double() * b
            step += 1
        objectives = (sums / n).numpy()
        kept = int(np.argmin(objectives))
        pred = predict_all(teacher, rows)[kept].argmax(dim=1).numpy()
        record = {"phase": "temi", "epoch": epoch, "loss": float(objectives[kept]), "head": kept,
                  "lr": float(lr[step - 1]),
                  "objectives": [round(float(v), 6) for v in objectives], **scores(labels, pred)}
        history.append(record)
        if cfg.progress:
            log.info("temi epoch %d: %s", epoch, " ".join(f"{a}={v}" for a, v in record.items()))
    head = teacher.single(kept).to(device)
    pred = predict_all(head, rows)[0].argmax(dim=1).numpy()
    return {"model": head.cpu(), "kept_head": kept, "objectives": [float(v) for v in objectives],
            "labels": pred.astype(np.int64), "history": history}
