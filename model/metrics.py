"""Offline metrics: full-ranking HR@K / NDCG@K / MRR and conversion AUC / logloss.

Ranks are mid-ranks: a target tied with t other candidates is ranked 1 + (#higher) + t/2, the
expected rank under random tie-breaking, so a baseline that scores most items equally (e.g. 0 for
everything it has not seen) gets no credit for the tie.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def ranks_of_targets(scores: torch.Tensor, target: torch.Tensor, candidates: torch.Tensor | None = None
                     ) -> torch.Tensor:
    """scores [B, C], target [B] column → mid-rank [B] (float, 1 = best) among ``candidates``
    [B, C] bool (default all); a target outside the candidates ranks last + 1 (a miss)."""
    if candidates is not None:
        scores = scores.masked_fill(~candidates, float("-inf"))
    t = scores.gather(1, target.unsqueeze(1))  # [B, 1]
    higher = (scores > t).sum(1)
    ties = (scores == t).sum(1) - 1
    rank = 1.0 + higher.double() + ties.double() / 2.0
    if candidates is None:
        return rank
    n = candidates.sum(1).double()
    return torch.where(candidates.gather(1, target.unsqueeze(1)).squeeze(1), rank, n + 1.0)


def ranking_metrics(ranks: np.ndarray, k: int = 10) -> dict[str, float | None]:
    """HR@k, NDCG@k and MRR of mid-ranks (None when there are no cases)."""
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
    order = np.argsort(scores, kind="mergesort")
    s = np.asarray(scores)[order]
    ranks = np.empty(len(s), dtype=np.float64)
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[i:j + 1] = (i + j) / 2.0 + 1.0
        i = j + 1
    r = np.empty_like(ranks)
    r[order] = ranks
    return float((r[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def logloss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float | None:
    if len(labels) == 0:
        return None
    p = np.clip(np.asarray(probs, dtype=np.float64), eps, 1 - eps)
    y = np.asarray(labels, dtype=np.float64)
    val = -(y * np.log(p) + (1 - y) * np.log(1 - p)).mean()
    return float(val) if math.isfinite(val) else None
