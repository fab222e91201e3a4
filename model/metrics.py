"""The metrics of offline evaluation and of online (prequential) scoring, in one place.

Ranks are 1-based mid-ranks: a target tied with t other candidates is ranked 1 + (#higher) + t/2,
the expected rank under random tie-breaking, so a model that scores many items equally (e.g. 0 for
everything it has not seen) gets no credit for the tie. Conversion metrics take the labels first:
``auc(labels, scores)``, ``logloss(labels, probs)``.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def ranks_of_targets(scores: torch.Tensor, target: torch.Tensor, candidates: torch.Tensor | None = None
                     ) -> torch.Tensor:
    """scores [B, C], target [B] column → mid-rank [B] (float64, 1 = best) among ``candidates``
    [B, C] bool (default all). A target outside the candidates, or -1 (no column), ranks last + 1
    (a miss)."""
    col = target.clamp(min=0).unsqueeze(1)  # [B, 1]
    if candidates is not None:
        scores = scores.masked_fill(~candidates, float("-inf"))
    t = scores.gather(1, col)  # [B, 1]
    higher = (scores > t).sum(1)
    ties = (scores == t).sum(1) - 1
    rank = 1.0 + higher.double() + ties.double() / 2.0  # [B]
    inside = target >= 0
    if candidates is None:
        n = torch.full_like(rank, scores.shape[1])
    else:
        n = candidates.sum(1).double()
        inside = inside & candidates.gather(1, col).squeeze(1)
    return torch.where(inside, rank, n + 1.0)


def ranking_metrics(ranks: np.ndarray, k: int = 10) -> dict[str, float | None]:
    """HR@k, NDCG@k and MRR of 1-based mid-ranks (None when there are no cases)."""
    if len(ranks) == 0:
        return {"hr": None, "ndcg": None, "mrr": None}
    ranks = np.asarray(ranks, dtype=np.float64)
    hit = ranks <= k
    return {
        "hr": float(hit.mean()),
        "ndcg": float(np.where(hit, 1.0 / np.log2(1.0 + ranks), 0.0).mean()),
        "mrr": float((1.0 / ranks).mean()),
    }


def auc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """ROC AUC (Mann-Whitney, ties count half); None without both classes."""
    labels = np.asarray(labels) > 0.5
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    s = np.asarray(scores, dtype=np.float64)
    order = np.argsort(s, kind="mergesort")
    _, first, counts = np.unique(s[order], return_index=True, return_counts=True)
    ranks = np.empty(len(s), dtype=np.float64)
    ranks[order] = np.repeat(first + (counts - 1) / 2.0 + 1.0, counts)  # average rank over each tie
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def logloss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float | None:
    """Mean binary cross-entropy of probabilities clipped to [eps, 1 - eps]; None without cases."""
    if len(labels) == 0:
        return None
    p = np.clip(np.asarray(probs, dtype=np.float64), eps, 1 - eps)
    y = np.asarray(labels, dtype=np.float64)
    val = -(y * np.log(p) + (1 - y) * np.log(1 - p)).mean()
    return float(val) if math.isfinite(val) else None
