"""Rolling prequential (test-then-train) metrics for the online trainer.

Each batch is scored by the current model *before* the model learns from it; these windows keep
the most recent ``window`` outcomes so the figures track the model as it is now, not its history.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np


def auc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Area under the ROC curve (ties get half credit); None when one class is absent."""
    labels = np.asarray(labels, dtype=bool)
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    s = np.asarray(scores, dtype=np.float64)[order]
    ranks = np.empty(len(s), dtype=np.float64)
    # average ranks over ties
    _, first, counts = np.unique(s, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks_sorted = np.repeat(avg, counts)
    ranks[order] = ranks_sorted
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def logloss(probs: np.ndarray, labels: np.ndarray, eps: float = 1e-7) -> float:
    p = np.clip(np.asarray(probs, dtype=np.float64), eps, 1 - eps)
    y = np.asarray(labels, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def hit_and_ndcg(ranks: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-case HR@k and NDCG@k from 0-based ranks of the true item."""
    ranks = np.asarray(ranks)
    hit = (ranks < k).astype(np.float64)
    ndcg = np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0)
    return hit, ndcg


@dataclass
class RollingMetrics:
    """Windows of the latest conversion predictions and retrieval ranks."""

    window: int = 5000
    k: int = 10
    conv_scores: deque = field(default_factory=deque)
    conv_labels: deque = field(default_factory=deque)
    ranks: deque = field(default_factory=deque)
    conversions_seen: int = 0
    retrievals_seen: int = 0

    def add_conversion(self, probs: np.ndarray, labels: np.ndarray) -> None:
        for p, y in zip(np.asarray(probs).tolist(), np.asarray(labels).tolist()):
            self.conv_scores.append(p)
            self.conv_labels.append(y)
        while len(self.conv_scores) > self.window:
            self.conv_scores.popleft()
            self.conv_labels.popleft()
        self.conversions_seen += len(probs)

    def add_ranks(self, ranks: np.ndarray) -> None:
        self.ranks.extend(np.asarray(ranks).tolist())
        while len(self.ranks) > self.window:
            self.ranks.popleft()
        self.retrievals_seen += len(ranks)

    def snapshot(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {"auc": None, "logloss": None, f"hr@{self.k}": None, f"ndcg@{self.k}": None}
        if self.conv_scores:
            s, y = np.asarray(self.conv_scores), np.asarray(self.conv_labels)
            out["auc"], out["logloss"] = auc(s, y), logloss(s, y)
        if self.ranks:
            hit, ndcg = hit_and_ndcg(np.asarray(self.ranks), self.k)
            out[f"hr@{self.k}"], out[f"ndcg@{self.k}"] = float(hit.mean()), float(ndcg.mean())
        return out
