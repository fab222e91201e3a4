"""Rolling prequential (test-then-train) metrics for the online trainer.

Each batch is scored by the current model *before* the model learns from it; these windows keep
the most recent ``window`` outcomes so the figures track the model as it is now, not its history.
The figures themselves are :mod:`model.metrics`' (the offline ones), so online and offline agree.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from tgastream.model.metrics import auc, ece, gauc, logloss, ranking_metrics


@dataclass
class RollingMetrics:
    """Windows of the latest conversion predictions and retrieval ranks (1-based mid-ranks)."""

    window: int = 5000
    k: int = 10
    conv_scores: deque = field(default_factory=deque)
    conv_labels: deque = field(default_factory=deque)
    conv_users: deque = field(default_factory=deque)  # the clicks' users (GAUC); "" when not given
    ranks: deque = field(default_factory=deque)
    conversions_seen: int = 0
    retrievals_seen: int = 0

    def add_conversion(self, labels: np.ndarray, probs: np.ndarray, users: list[str] | None = None) -> None:
        users = users if users is not None else [""] * len(probs)
        for y, p, u in zip(np.asarray(labels).tolist(), np.asarray(probs).tolist(), users):
            self.conv_labels.append(y)
            self.conv_scores.append(p)
            self.conv_users.append(u)
        while len(self.conv_scores) > self.window:
            self.conv_scores.popleft()
            self.conv_labels.popleft()
            self.conv_users.popleft()
        self.conversions_seen += len(probs)

    def add_ranks(self, ranks: np.ndarray) -> None:
        """Retrieval outcomes as 1-based mid-ranks (see :func:`model.metrics.ranks_of_targets`)."""
        self.ranks.extend(np.asarray(ranks).tolist())
        while len(self.ranks) > self.window:
            self.ranks.popleft()
        self.retrievals_seen += len(ranks)

    def snapshot(self) -> dict[str, float | None]:
        """AUC, GAUC (per user, when users were given), logloss and ECE (10 equal-mass bins) of
        the conversion window and the cases they rest on (``auc_clicks``, ``auc_buys``), HR@k and
        NDCG@k of the rank window."""
        y, s = np.asarray(self.conv_labels), np.asarray(self.conv_scores)
        ranking = ranking_metrics(np.asarray(self.ranks), self.k)
        g = None
        if self.conv_users and all(self.conv_users):
            _, codes = np.unique(np.asarray(self.conv_users, dtype=object).astype(str), return_inverse=True)
            pos = np.bincount(codes, weights=(y > 0.5).astype(float))
            both = (pos > 0) & (pos < np.bincount(codes))  # only users with both classes count: the rest skipped cheaply
            keep = both[codes]
            if keep.any():
                _, sub = np.unique(codes[keep], return_inverse=True)
                g = gauc(y[keep], s[keep], sub)
        return {"auc": auc(y, s), "gauc": g, "logloss": logloss(y, s), "ece": ece(y, s),
                "auc_clicks": len(y), "auc_buys": int((y > 0.5).sum()),
                f"hr@{self.k}": ranking["hr"], f"ndcg@{self.k}": ranking["ndcg"]}

    def state_dict(self) -> dict:
        """The windows and counters (not ``window`` / ``k``: those are configuration)."""
        return {"conv_scores": list(self.conv_scores), "conv_labels": list(self.conv_labels),
                "conv_users": list(self.conv_users),
                "ranks": list(self.ranks), "conversions_seen": self.conversions_seen,
                "retrievals_seen": self.retrievals_seen}

    def load_state_dict(self, d: dict) -> None:
        """Replace the windows and counters with saved ones (trimmed to this ``window``)."""
        self.conv_scores = deque(d["conv_scores"][-self.window:])
        self.conv_labels = deque(d["conv_labels"][-self.window:])
        users = d.get("conv_users") or [""] * len(d["conv_labels"])  # (checkpoints before click-time users)
        self.conv_users = deque(users[-self.window:])
        self.ranks = deque(d["ranks"][-self.window:])
        self.conversions_seen, self.retrievals_seen = d["conversions_seen"], d["retrievals_seen"]
