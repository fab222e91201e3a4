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


def reliability(labels: np.ndarray, probs: np.ndarray, bins: int = 10) -> list[dict[str, float]]:
    """Equal-mass reliability bins: the cases sorted by predicted probability and cut into ``bins``
    groups of (nearly) equal size; each bin's mean prediction, observed rate and case count
    (fewer bins when there are fewer cases). The points of a reliability plot."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    if len(p) == 0:
        return []
    order = np.argsort(p, kind="mergesort")
    return [{"mean_prob": float(p[part].mean()), "rate": float(y[part].mean()), "count": float(len(part))}
            for part in np.array_split(order, min(bins, len(p))) if len(part)]


def ece(labels: np.ndarray, probs: np.ndarray, bins: int = 10) -> float | None:
    """Expected calibration error over ``bins`` equal-mass bins (:func:`reliability`):

        ECE = Σ_b (n_b / n) · | mean(p in b) − mean(y in b) |

    0 for a calibrated model; None without cases. Equal-mass rather than equal-width bins because
    conversion probabilities crowd near 0: equal-width bins would put nearly every case in one."""
    rows = reliability(labels, probs, bins)
    n = sum(r["count"] for r in rows)
    if not n:
        return None
    return float(sum(r["count"] / n * abs(r["mean_prob"] - r["rate"]) for r in rows))


# -- per-user figures and bootstrap intervals ---------------------------------------------------


def weighted_auc(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None) -> float | None:
    """ROC AUC where case i counts ``weights[i]`` times (a bootstrap resample's multiplicities);
    ties count half, as in :func:`auc`. None without positive weight on both classes."""
    y = np.asarray(labels) > 0.5
    s = np.asarray(scores, dtype=np.float64)
    w = np.ones(len(s)) if weights is None else np.asarray(weights, dtype=np.float64)
    _, group = np.unique(s, return_inverse=True)  # tie groups in ascending score order
    pos = np.bincount(group, weights=w * y)  # [G] positive weight per tie group
    neg = np.bincount(group, weights=w * ~y)  # [G]
    w_pos, w_neg = pos.sum(), neg.sum()
    if w_pos <= 0 or w_neg <= 0:
        return None
    below = np.cumsum(neg) - neg  # negative weight strictly below each group
    return float((pos * (below + neg / 2.0)).sum() / (w_pos * w_neg))


def group_aucs(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-group (per-user) AUC [U] (NaN where a group lacks one class) and case count [U] of
    groups coded 0..U-1. Computed once, so a bootstrap of :func:`gauc` is a weighted mean."""
    y = np.asarray(labels) > 0.5
    s = np.asarray(scores, dtype=np.float64)
    g = np.asarray(groups, dtype=np.int64)
    n = int(g.max()) + 1 if len(g) else 0
    aucs, counts = np.full(n, np.nan), np.bincount(g, minlength=n).astype(np.float64)
    order = np.argsort(g, kind="mergesort")
    for part in np.split(order, np.flatnonzero(np.diff(g[order])) + 1):
        if len(part):
            a = auc(y[part], s[part])
            aucs[g[part[0]]] = np.nan if a is None else a
    return aucs, counts


def gauc(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray, weights: np.ndarray | None = None
         ) -> float | None:
    """Group AUC: the AUC of each group (user, coded 0..U-1) that has both classes, averaged with
    weight = the group's case count (its clicks) × its bootstrap multiplicity ``weights[g]``
    (default 1). It ranks a user's clicks against the same user's clicks only, so it ignores how
    well a model orders users by their base rate. None when no group has both classes."""
    return gauc_of(*group_aucs(labels, scores, groups), weights)


def gauc_of(aucs: np.ndarray, counts: np.ndarray, weights: np.ndarray | None = None) -> float | None:
    """GAUC from :func:`group_aucs`' output, each group weighted by counts × ``weights``."""
    w = counts * (1.0 if weights is None else np.asarray(weights, dtype=np.float64))
    w = np.where(np.isnan(aucs), 0.0, w)
    return float((w * np.nan_to_num(aucs)).sum() / w.sum()) if w.sum() > 0 else None


def hit_rate(ranks: np.ndarray, k: int = 10, weights: np.ndarray | None = None) -> float | None:
    """HR@k of 1-based mid-ranks with case multiplicities ``weights`` (None without cases)."""
    hit = np.asarray(ranks, dtype=np.float64) <= k
    w = np.ones(len(hit)) if weights is None else np.asarray(weights, dtype=np.float64)
    return float((w * hit).sum() / w.sum()) if w.sum() > 0 else None


def bootstrap_user_weights(groups: np.ndarray, resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """Multiplicities [R, U] of the U distinct ``groups`` (users, coded 0..U-1) in ``resamples``
    bootstrap draws of U users with replacement (seeded). A case's weight in draw r is
    ``out[r, groups[case]]``: resampling users keeps each user's cases together, so the interval
    reflects that cases of one user are not independent."""
    n_users = int(np.max(groups)) + 1 if len(groups) else 0
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, max(n_users, 1), size=(resamples, n_users))  # [R, U]
    return np.stack([np.bincount(d, minlength=n_users) for d in draws]).astype(np.float64) if n_users else \
        np.zeros((resamples, 0))


def bootstrap_interval(statistic, user_weights: np.ndarray, level: float = 0.95) -> list[float] | None:
    """Percentile interval of ``statistic(w)`` over the rows ``w`` [U] of ``user_weights`` [R, U]
    (see :func:`bootstrap_user_weights`); draws where the statistic is undefined (None) are
    skipped. Paired intervals come from a statistic that compares two models on the same ``w``."""
    vals = [v for v in (statistic(w) for w in user_weights) if v is not None and math.isfinite(v)]
    if not vals:
        return None
    lo, hi = np.quantile(vals, [(1 - level) / 2, 1 - (1 - level) / 2])
    return [float(lo), float(hi)]
