"""Item-to-item co-visitation: "after item X, users went next to Y", a strong non-neural baseline.

Counted once on a training log (never on the period it is tested on): for every user's
time-ordered items, each item X votes for the next ``window`` different items Y of the same user,
the d-th next one with weight 1/d. A user is scored from their ``recent`` last distinct items,
the newest with weight 1, the one before with ``decay``, and so on; a candidate's score is the sum
of the votes it gets. :func:`rank_from_scores` turns such sparse scores into the evaluation's
1-based mid-ranks over a full catalogue (every unscored candidate tied at 0).

``repeat_covisit_scores`` is the blend: the user's own recent items first (repeat-recent's order),
then co-visitation fills the rest of the list.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np


@dataclass(frozen=True)
class CovisitConfig:
    window: int = 2  # each item votes for the user's next `window` different items (weight 1/d)
    recent: int = 5  # the user's last distinct items that vote for candidates
    decay: float = 0.6  # weight of the k-th most recent item: decay ** k


class Covisitation:
    """Sparse co-visitation counts between item keys (any hashable ints)."""

    def __init__(self, cfg: CovisitConfig = CovisitConfig()) -> None:
        self.cfg = cfg
        self.next: dict[int, dict[int, float]] = defaultdict(lambda: defaultdict(float))

    def fit(self, sequences: Iterable[Sequence[int]]) -> "Covisitation":
        """Count transitions in each sequence (one user's items, oldest first)."""
        for seq in sequences:
            seq = list(seq)
            for j, x in enumerate(seq):
                row = self.next[x]
                for d, y in enumerate(seq[j + 1:j + 1 + self.cfg.window], start=1):
                    if y != x:
                        row[y] += 1.0 / d
        return self

    def add(self, history: Sequence[int], item: int) -> None:
        """Count one new event online: ``item`` follows the user's ``history`` (item keys, oldest
        first, before this event). Adding a user's events one by one counts what :meth:`fit`
        counts on the whole sequence, so a count can be frozen at any time without a future."""
        for d, x in enumerate(reversed(history[-self.cfg.window:]), start=1):
            if x != item:
                self.next[x][item] += 1.0 / d

    def top(self, context: Sequence[int], k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` best-scored candidates of a context: keys [≤ k] int64 and scores [≤ k] float32,
        highest first (ties by key)."""
        scores = self.scores(context)
        best = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
        return (np.fromiter((key for key, _ in best), dtype=np.int64, count=len(best)),
                np.fromiter((v for _, v in best), dtype=np.float32, count=len(best)))

    def scores(self, context: Sequence[int]) -> dict[int, float]:
        """Candidate → score from a user's context (item keys, oldest first)."""
        out: dict[int, float] = defaultdict(float)
        for k, x in enumerate(recent_distinct(context)[:self.cfg.recent]):
            w = self.cfg.decay ** k
            for y, c in self.next.get(x, {}).items():
                out[y] += w * c
        return out


def recent_distinct(context: Sequence[int]) -> list[int]:
    """The distinct items of a context (oldest first), most recent first."""
    seen: set[int] = set()
    out = []
    for x in reversed(list(context)):
        if x not in seen:
            seen.add(x)
            out.append(x)
    return out


def repeat_covisit_scores(context: Sequence[int], covisit: Covisitation) -> dict[int, float]:
    """Repeat-recent first (the newest own item highest), co-visitation scores below all of them."""
    scores = dict(covisit.scores(context))
    top = max(scores.values(), default=0.0) + 1.0
    own = recent_distinct(context)
    for k, x in enumerate(own):
        scores[x] = top + len(own) - k
    return scores


def rank_from_scores(scores: dict[int, float], target: int, n_candidates: int, target_is_candidate: bool,
                     is_candidate=lambda key: True) -> float:
    """1-based mid-rank of ``target`` among ``n_candidates`` items, the scored ones by ``scores``
    (those passing ``is_candidate``), every other candidate at 0; a target that is not a candidate
    ranks ``n_candidates + 1`` (a miss)."""
    if not target_is_candidate:
        return n_candidates + 1.0
    vals = np.fromiter((v for key, v in scores.items() if v > 0 and is_candidate(key)), dtype=np.float64)
    st = scores.get(target, 0.0)
    higher = int((vals > st).sum())
    ties = int((vals == st).sum()) - 1 if st > 0 else n_candidates - len(vals) - 1
    return 1.0 + higher + ties / 2.0
