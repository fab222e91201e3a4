"""The health guard's decision: is the online model worse than the baseline, beyond chance?

Pure logic over paired outcomes (the online model and the baseline scored on the *same* samples,
model/shadow.py): no torch, no I/O, so it is unit-tested on synthetic streams.

Two legs, each with a minimum count; either one trips the guard:

- HR@10: per retrieval case the difference of hits (baseline − online, each 0/1). It trips when
  the mean difference exceeds ``margin`` *and* ``z`` standard errors (paired: the case-to-case
  noise the two models share cancels).
- AUC: conversion clicks, at least ``min_positives`` bought ones (positives are 1–2% of clicks, so
  a window of a few thousand clicks holds only a few dozen: the conversion window stretches until
  it holds twice the minimum, see :class:`PairedWindow`); trips when baseline AUC − online AUC
  exceeds ``margin`` and ``z`` standard errors (Hanley–McNeil's per-model error, combined as if
  independent: conservative, since the pairing only lowers the true error).

Both conditions are needed: the margin says how much worse matters, the z-test that a healthy
stream does not trip by chance when the window is small.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from tgastream.model.metrics import auc


@dataclass(frozen=True)
class GuardConfig:
    """When the guard trips (settings ``guard_*``, built in stream/configs.py)."""

    margin: float = 0.03  # how much worse than the baseline (AUC or HR@10 points) counts
    window: int = 2000  # most recent paired cases kept per leg
    min_retrievals: int = 500  # HR leg: cases needed before it may trip
    min_positives: int = 30  # AUC leg: bought clicks (and as many not bought) needed
    z: float = 3.0  # standard errors the deficit must also exceed


@dataclass(frozen=True)
class Verdict:
    """One decision: whether to roll back, and the figures it was made on."""

    trip: bool
    leg: str | None = None  # "hr@10" or "auc": the leg that tripped
    deficit: dict[str, float | None] = field(default_factory=dict)  # baseline − online per leg
    evaluable: bool = False  # some leg had its minimum count (a window that can vouch for the model)
    reason: str = ""


@dataclass
class PairedWindow:
    """The latest paired outcomes: retrieval hits and conversion scores of both models."""

    window: int = 2000
    keep_positives: int = 60  # the conversion window stretches until it holds this many bought clicks
    hits: deque = field(default_factory=deque)  # (online hit, baseline hit), 0/1 each
    conversions: deque = field(default_factory=deque)  # (label, online prob, baseline prob)
    positives: int = 0  # bought clicks in ``conversions``

    MAX_STRETCH = 20

    def add(self, online_hits: np.ndarray, baseline_hits: np.ndarray, labels: np.ndarray,
            online_probs: np.ndarray, baseline_probs: np.ndarray) -> None:
        """Hits [R] of both models on the same R retrieval cases; labels, probs [C] of both on
        the same C conversion clicks."""
        self.hits.extend(zip(np.asarray(online_hits, float).tolist(), np.asarray(baseline_hits, float).tolist()))
        self.conversions.extend(zip(np.asarray(labels, float).tolist(), np.asarray(online_probs, float).tolist(),
                                    np.asarray(baseline_probs, float).tolist()))
        while len(self.hits) > self.window:
            self.hits.popleft()
        self.positives += int((np.asarray(labels) > 0.5).sum())
        # the conversion window: the latest ``window`` clicks, longer while it holds fewer than
        # ``keep_positives`` bought ones (1-2% of clicks are), at most ``MAX_STRETCH`` × window
        while len(self.conversions) > self.window:
            oldest_positive = self.conversions[0][0] > 0.5
            if (self.positives - oldest_positive < self.keep_positives
                    and len(self.conversions) <= self.MAX_STRETCH * self.window):
                break
            self.conversions.popleft()
            self.positives -= oldest_positive

    def clear(self) -> None:
        self.hits.clear()
        self.conversions.clear()
        self.positives = 0


def hanley_mcneil_se(a: float, n_pos: int, n_neg: int) -> float:
    """Standard error of an AUC ``a`` from ``n_pos`` positives and ``n_neg`` negatives."""
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    var = (a * (1 - a) + (n_pos - 1) * (q1 - a * a) + (n_neg - 1) * (q2 - a * a)) / (n_pos * n_neg)
    return math.sqrt(max(var, 0.0))


def _hr_leg(w: PairedWindow, cfg: GuardConfig) -> tuple[float | None, bool]:
    """(deficit, trips) of the HR leg; deficit None below the minimum count."""
    if len(w.hits) < cfg.min_retrievals:
        return None, False
    h = np.asarray(w.hits)  # [n, 2]
    d = h[:, 1] - h[:, 0]  # [n] baseline − online
    mean = float(d.mean())
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else 0.0
    return mean, mean > cfg.margin and mean > cfg.z * se


def _auc_leg(w: PairedWindow, cfg: GuardConfig) -> tuple[float | None, bool]:
    """(deficit, trips) of the AUC leg; deficit None below the minimum positives."""
    if not w.conversions:
        return None, False
    c = np.asarray(w.conversions)  # [n, 3]
    y = c[:, 0] > 0.5
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if min(n_pos, n_neg) < cfg.min_positives:
        return None, False
    a_on, a_base = auc(y, c[:, 1]), auc(y, c[:, 2])
    if a_on is None or a_base is None:
        return None, False
    deficit = a_base - a_on
    se = math.hypot(hanley_mcneil_se(a_on, n_pos, n_neg), hanley_mcneil_se(a_base, n_pos, n_neg))
    return deficit, deficit > cfg.margin and deficit > cfg.z * se


def decide(w: PairedWindow, cfg: GuardConfig) -> Verdict:
    """Whether the online model fell below the baseline beyond ``margin`` and chance."""
    hr, hr_trip = _hr_leg(w, cfg)
    au, au_trip = _auc_leg(w, cfg)
    deficit = {"hr@10": hr, "auc": au}
    evaluable = hr is not None or au is not None
    for leg, trips, value in (("hr@10", hr_trip, hr), ("auc", au_trip, au)):
        if trips:
            return Verdict(True, leg, deficit, evaluable,
                           f"online {leg} is {value:.4f} below the baseline over the window (margin {cfg.margin})")
    return Verdict(False, None, deficit, evaluable, "")


def stream_shifted(recent_hits: np.ndarray, anchor: float, anchor_n: int, cfg: GuardConfig) -> bool:
    """Whether a model-free reference (repeat-recent's hits [n] on the latest retrieval cases)
    fell from its level ``anchor`` (measured on ``anchor_n`` cases when the baseline was judged)
    by more than ``margin`` and ``z`` standard errors of the difference: the *stream* changed (a
    broken join, a bot), not the model. A guard that compares models on the stream cannot judge
    them on a stream that is itself broken: a model that learned the broken targets would look
    better there than the good one."""
    n = len(recent_hits)
    if n < cfg.min_retrievals or anchor_n < cfg.min_retrievals:
        return False
    level = float(np.mean(recent_hits))
    p = min(max(anchor, 1e-3), 1 - 1e-3)
    se = math.sqrt(p * (1 - p) * (1.0 / n + 1.0 / anchor_n))
    return anchor - level > max(cfg.margin, cfg.z * se)
