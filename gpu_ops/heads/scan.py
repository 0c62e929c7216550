"""SCAN's clustering step on frozen features (Van Gansbeke et al., ECCV 2020), then self-labelling.

Clustering step: each row is paired with one of its mined nearest neighbours (or itself: SCAN
draws from the row's top-k list, which holds the row), and the heads are trained so that the
two agree, ``-log <p(x), p(n)>``, minus ``entropy_weight`` times the entropy of the batch's mean
prediction (against putting everything in one cluster). Several heads train at once and the
one with the lowest SCAN loss over all rows and all their neighbours (consistency minus the
entropy, weight 1, as the reference evaluation picks it) is kept.

Self-labelling: the kept head is fine-tuned with a class-balanced cross entropy on the rows it
is confident about (max probability above ``confidence``). The reference trains on a strong
image augmentation of the confident image; on frozen features the row's neighbour stands in
for that augmented view (a nearby point that should share the label).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from gpu_ops.errors import InputError
from gpu_ops.heads.common import HeadConfig, MultiHead, Rows, predict_all, scores
from gpu_ops.metrics import hungarian_accuracy

log = logging.getLogger("gpu_ops.heads")

#: Rows whose neighbour similarities are computed at a time by :func:`scan_objective`.
OBJECTIVE_BLOCK_ROWS = 4096
EPS = 1e-8


@dataclass
class ScanConfig(HeadConfig):
    """SCAN settings. The reference CIFAR-10 run: entropy weight 5, 20 neighbours, self-labelling
    threshold 0.99 with class balancing; linear heads (its frozen-backbone ImageNet runs: 10)."""

    n_heads: int = 10
    neighbors: int = 20
    epochs: int = 25
    batch_size: int = 256
    lr: float = 1e-2  #: Adam (the reference's frozen-backbone runs: SGD at lr 5)
    weight_decay: float = 1e-4
    hidden: int = 0
    entropy_weight: float = 5.0
    #: Self-labelling epochs after the clustering step (0: none). Off by default: on CIFAR-10
    #: EfficientNet-Lite0 features too few rows are confident and it lowered ACC (0.60 -> 0.34).
    selflabel_epochs: int = 0
    confidence: float = 0.99  #: self-labelling: the probability a row's label needs to be trained on
    class_balance: bool = True  #: self-labelling: weight each class by the inverse of its share
    #: Keep every head, each one's clusters matched to the lowest-objective head's (Hungarian
    #: matching of their labels), and cluster by the mean of their probabilities: the choice
    #: among heads that the objective cannot rank (CIFAR-10: ACC 0.50-0.68 by head) is averaged out.
    consensus: bool = False

    @classmethod
    def algorithm_name(cls) -> str:
        return "scan"

    def validate(self) -> None:
        super().validate()
        if not (isinstance(self.entropy_weight, (int, float)) and self.entropy_weight >= 0):
            raise InputError(f"scan entropy_weight must be a number >= 0; got {self.entropy_weight!r}")
        if not (isinstance(self.confidence, (int, float)) and 0 < self.confidence < 1):
            raise InputError(f"scan confidence must be a number between 0 and 1; got {self.confidence!r}")
        if isinstance(self.selflabel_epochs, bool) or not isinstance(self.selflabel_epochs, int) \
                or self.selflabel_epochs < 0:
            raise InputError(f"scan selflabel_epochs must be an integer >= 0; got {self.selflabel_epochs!r}")
        if not isinstance(self.consensus, bool):
            raise InputError(f"scan consensus must be true or false; got {self.consensus!r}")
        if self.consensus and self.selflabel_epochs:
            raise InputError("scan consensus keeps every head and self-labelling tunes one: "
                             "set selflabel_epochs to 0 or consensus to false")


def entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy over the last axis of probabilities ``p``."""
    q = p.clamp_min(EPS)
    return -(q * q.log()).sum(dim=-1)


def scan_loss(anchors: torch.Tensor, neighbors: torch.Tensor,
              entropy_weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SCAN loss per head from logits (n_heads, b, k) of anchors and their neighbours:
    ``(total, consistency, entropy)``, each (n_heads,)."""
    pa = torch.softmax(anchors, dim=-1)
    pn = torch.softmax(neighbors, dim=-1)
    similarity = (pa * pn).sum(dim=-1)
    consistency = -similarity.clamp_min(EPS).log().clamp_min(-100.0).mean(dim=1)  # BCE(similarity, 1)
    ent = entropy(pa.mean(dim=1))
    return consistency - entropy_weight * ent, consistency, ent


@torch.no_grad()
def scan_objective(probs: torch.Tensor, neighbors: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each head's SCAN loss over every row and all its neighbours (entropy weight 1, the
    reference's head choice): ``(total, consistency, entropy)``, each (n_heads,).
    ``probs`` (n_heads, n, k), ``neighbors`` (n, K)."""
    n_heads, n, _ = probs.shape
    nb = torch.from_numpy(np.asarray(neighbors, dtype=np.int64))
    log_sim = torch.zeros(n_heads, dtype=torch.float64)
    for start in range(0, n, OBJECTIVE_BLOCK_ROWS):
        block = nb[start:start + OBJECTIVE_BLOCK_ROWS]
        sim = torch.einsum("hbk,hbjk->hbj", probs[:, start:start + len(block)], probs[:, block])
        log_sim += sim.clamp_min(EPS).log().clamp_min(-100.0).sum(dim=(1, 2)).double()
    consistency = (-log_sim / (n * nb.shape[1])).numpy()
    ent = entropy(probs.mean(dim=1)).double().numpy()
    return consistency - ent, consistency, ent


def train_scan(rows: Rows, neighbors: np.ndarray, k: int, cfg: ScanConfig, rng: np.random.Generator,
               labels: np.ndarray | None) -> dict[str, Any]:
    """Train ``cfg.n_heads`` SCAN heads on ``rows`` and self-label the kept one.

    Returns ``model`` (the kept head, one-head :class:`MultiHead`), ``kept_head``, ``objectives``
    (each head's final SCAN loss), ``labels`` (n,) and ``history``.
    """
    device = rows.device
    model = MultiHead(rows.dim, k, cfg.n_heads, cfg.hidden).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = rows.n
    candidates = np.concatenate([np.arange(n)[:, None], neighbors], axis=1)  # the row and its top-k
    history: list[dict[str, Any]] = []
    objectives = np.zeros(cfg.n_heads)
    kept = 0
    for epoch in range(1, cfg.epochs + 1):
        perm = rng.permutation(n)
        total = 0.0
        for start in range(0, n, cfg.batch_size):
            anchors = perm[start:start + cfg.batch_size]
            partners = candidates[anchors, rng.integers(0, candidates.shape[1], len(anchors))]
            logits = model(rows.take(np.concatenate([anchors, partners])))
            loss, _, _ = scan_loss(logits[:, :len(anchors)], logits[:, len(anchors):], cfg.entropy_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.sum().backward()  # every head learns on its own loss
            optimizer.step()
            total += float(loss.detach().mean()) * len(anchors)
        probs = predict_all(model, rows)
        objectives, consistency, ent = scan_objective(probs, neighbors)
        kept = int(np.argmin(objectives))
        pred = probs[kept].argmax(dim=1).numpy()
        record = {"phase": "scan", "epoch": epoch, "loss": float(objectives[kept]), "head": kept,
                  "consistency": float(consistency[kept]), "entropy": float(ent[kept]),
                  "objectives": [round(float(v), 6) for v in objectives],
                  "train_loss": total / n, **scores(labels, pred)}
        history.append(record)
        if cfg.progress:
            log.info("scan epoch %d: %s", epoch, _brief(record))
    if cfg.consensus:
        orders = matched_orders(probs.numpy(), kept)
        model = model.reorder_outputs(orders)
        # the heads' probabilities are at hand: matched here, not predicted again over every row
        pred = torch.stack([probs[h][:, orders[h]] for h in range(cfg.n_heads)]).mean(dim=0).argmax(dim=1).numpy()
        history.append({"phase": "consensus", "epoch": cfg.epochs, "loss": float(objectives[kept]), "head": kept,
                        "heads": cfg.n_heads, **scores(labels, pred)})
        return {"model": model.cpu(), "kept_head": kept, "objectives": [float(v) for v in objectives],
                "labels": pred.astype(np.int64), "history": history, "mean_of_heads": True}
    head = model.single(kept).to(device)
    if cfg.selflabel_epochs:
        head = guarded_self_label(head, rows, neighbors, candidates, cfg, rng, labels, history)
    pred = predict_all(head, rows)[0].argmax(dim=1).numpy()
    return {"model": head.cpu(), "kept_head": kept, "objectives": [float(v) for v in objectives],
            "labels": pred.astype(np.int64), "history": history}


def matched_orders(probs: np.ndarray, reference: int, rounds: int = 3) -> np.ndarray:
    """For each head, the order of its clusters that best matches a consensus labelling: first
    head ``reference``'s, then (``rounds`` times) the argmax of the matched heads' mean probabilities.

    ``probs`` (n_heads, n, k). Returns (n_heads, k): head ``h``'s cluster ``orders[h, j]`` is
    consensus cluster ``j`` (Hungarian matching on the overlap of their labels).
    """
    n_heads, _, k = probs.shape
    head_labels = probs.argmax(axis=2)
    consensus = head_labels[reference]
    orders = np.tile(np.arange(k), (n_heads, 1))
    for _ in range(rounds + 1):
        for h in range(n_heads):
            to_consensus = hungarian_accuracy(consensus, head_labels[h]).mapping  # head cluster -> consensus cluster
            order = np.full(k, -1)
            order[list(to_consensus.values())] = list(to_consensus.keys())
            order[order < 0] = [c for c in range(k) if c not in to_consensus]  # clusters no row of the head is in
            orders[h] = order
        consensus = np.mean([probs[h][:, orders[h]] for h in range(n_heads)], axis=0).argmax(axis=1)
    return orders


def guarded_self_label(head: MultiHead, rows: Rows, neighbors: np.ndarray, candidates: np.ndarray, cfg: ScanConfig,
                       rng: np.random.Generator, labels: np.ndarray | None,
                       history: list[dict[str, Any]]) -> MultiHead:
    """Self-label a copy of ``head``; keep the copy only when its SCAN objective (over every row
    and all its neighbours) is no worse than the head's, so self-labelling never silently
    undoes the clustering step. Both objectives and the choice go to ``history``."""
    tuned = copy.deepcopy(head)
    history += self_label(tuned, rows, candidates, cfg, rng, labels)
    before = float(scan_objective(predict_all(head, rows), neighbors)[0][0])
    after = float(scan_objective(predict_all(tuned, rows), neighbors)[0][0])
    keep = after <= before
    history.append({"phase": "selflabel-choice", "epoch": cfg.selflabel_epochs, "loss": min(before, after),
                    "kept": "selflabel" if keep else "scan", "objective_scan": before, "objective_selflabel": after})
    return tuned if keep else head


def confident_ce(weak: torch.Tensor, strong: torch.Tensor, threshold: float,
                 class_balance: bool) -> tuple[torch.Tensor | None, int]:
    """SCAN's self-labelling loss: cross entropy of ``strong`` logits (b, k) against the argmax of
    ``weak`` logits where its probability exceeds ``threshold`` (class-balanced when asked);
    ``(None, 0)`` when no row is confident. Returns the loss and the number of confident rows."""
    probs = torch.softmax(weak, dim=1)
    top, target = probs.max(dim=1)
    mask = top > threshold
    m = int(mask.sum())
    if m == 0:
        return None, 0
    weight = None
    if class_balance:
        idx, counts = torch.unique(target[mask], return_counts=True)
        weight = torch.ones(weak.shape[1], device=weak.device)
        weight[idx] = m / counts.float()
    return nn.functional.cross_entropy(strong[mask], target[mask], weight=weight), m


def self_label(head: MultiHead, rows: Rows, candidates: np.ndarray, cfg: ScanConfig, rng: np.random.Generator,
               labels: np.ndarray | None) -> list[dict[str, Any]]:
    """Fine-tune the one-head ``head`` in place on its own confident predictions; the history."""
    optimizer = torch.optim.Adam(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = rows.n
    history = []
    for epoch in range(1, cfg.selflabel_epochs + 1):
        perm = rng.permutation(n)
        total, confident = 0.0, 0
        for start in range(0, n, cfg.batch_size):
            anchors = perm[start:start + cfg.batch_size]
            partners = candidates[anchors, rng.integers(0, candidates.shape[1], len(anchors))]
            with torch.no_grad():
                weak = head(rows.take(anchors))[0]
            loss, m = confident_ce(weak, head(rows.take(partners))[0], cfg.confidence, cfg.class_balance)
            if loss is None:
                continue
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * m
            confident += m
        pred = predict_all(head, rows)[0].argmax(dim=1).numpy()
        record = {"phase": "selflabel", "epoch": epoch, "loss": total / max(confident, 1),
                  "confident": confident / n, **scores(labels, pred)}
        history.append(record)
        if cfg.progress:
            log.info("scan self-label epoch %d: %s", epoch, _brief(record))
        if confident == 0:
            break
    return history


def _brief(record: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
                    if k not in ("phase", "epoch"))
