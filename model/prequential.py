"""Rolling prequential (test-then-train) metrics for the online trainer.

Each batch is scored by the current model *before* the model learns from it; these windows keep
the most recent ``window`` outcomes so the figures track the model as it is now, not its history.
The figures themselves are :mod:`model.metrics`' (the offline ones), so online and offline agree.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from tgastream.model.metrics import auc, logloss, ranking_metrics


@dataclass
class RollingMetrics:
    """Windows of the latest conversion predictions and retrieval ranks (1-based mid-ranks)."""

    window: int = 5000
    k: int = 10
    conv_scores: deque = field(default_factory=deque)
    conv_labels: deque = field(default_factory=deque)
    ranks: deque = field(default_factory=deque)
    conversions_seen: int = 0
    retrievals_seen: int = 0

    def add_conversion(self, labels: np.ndarray, probs: np.ndarray) -> None:
        for y, p in zip(np.asarray(labels).tolist(), np.asarray(probs).tolist()):
            self.conv_labels.append(y)
            self.conv_scores.append(p)
        while len(self.conv_scores) > self.window:
            self.conv_scores.popleft()
            self.conv_labels.popleft()
        self.conversions_seen += len(probs)

    def add_ranks(self, ranks: np.ndarray) -> None:
        """Retrieval outcomes as 1-based mid-ranks (see :func:`model.metrics.ranks_of_targets`)."""
        self.ranks.extend(np.asarray(ranks).tolist())
        while len(self.ranks) > self.window:
            self.ranks.popleft()
        self.retrievals_seen += len(ranks)

    def snapshot(self) -> dict[str, float | None]:
        """AUC and logloss of the conversion window, HR@k and NDCG@k of the rank window."""
        y, s = np.asarray(self.conv_labels), np.asarray(self.conv_scores)
        ranking = ranking_metrics(np.asarray(self.ranks), self.k)
        return {"auc": auc(y, s), "logloss": logloss(y, s),
                f"hr@{self.k}": ranking["hr"], f"ndcg@{self.k}": ranking["ndcg"]}

    def state_dict(self) -> dict:
        """The windows and counters (not ``window`` / ``k``: those are configuration)."""
        return {"conv_scores": list(self.conv_scores), "conv_labels": list(self.conv_labels),
                "ranks": list(self.ranks), "conversions_seen": self.conversions_seen,
                "retrievals_seen": self.retrievals_seen}

    def load_state_dict(self, d: dict) -> None:
        """Replace the windows and counters with saved ones (trimmed to this ``window``)."""
        self.conv_scores = deque(d["conv_scores"][-self.window:])
        self.conv_labels = deque(d["conv_labels"][-self.window:])
        self.ranks = deque(d["ranks"][-self.window:])
        self.conversions_seen, self.retrievals_seen = d["conversions_seen"], d["retrievals_seen"]
