"""Rolling prequential (test-then-train) metrics for the online trainer.

Each batch is scored by the current model *before* the model learns from it; these windows keep
the most recent ``window`` outcomes so the figures track the model as it is now, not its history.
The figures themselves are :mod:`model.metrics`' (the offline ones), so online and offline agree.

Conversion cases are ordered by **click time, over mature clicks only**. A conversion label
arrives at the buy (minutes after its click) when positive, but at the window's end (a day
later) when negative; a window of the latest labels to *arrive* therefore compares today's
positives with yesterday's negatives, scored by model versions whose score scale may differ
widely, and its AUC measures that drift, not ranking. So a joined case (label + click-time
prediction + click time) first waits in a *maturing* buffer; :meth:`RollingMetrics.mature`
moves into the window every case whose click is older than the maturity horizon H, the
earliest click time still awaiting its label (:meth:`model.clicktime.ClickTimeStore.horizon`).
Every click before H is labelled, so the window holds, for each click era it covers, its
positives *and* its negatives; it keeps the latest ``window`` cases by click time
(``auc_click_from`` / ``auc_click_to`` in :meth:`~RollingMetrics.snapshot` say which).
The price is lag: the window's newest click is about one conversion window older than the stream.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from tgastream.model.metrics import auc, ece, gauc, logloss, ranking_metrics


@dataclass
class RollingMetrics:
    """Windows of the latest mature conversion predictions (by click time) and retrieval ranks
    (1-based mid-ranks, in arrival order)."""

    window: int = 5000
    k: int = 10
    maturing_limit: int = 200_000  # joined cases awaiting maturity at most; past it the oldest clicks enter anyway
    conv_scores: deque = field(default_factory=deque)  # the window, in click-time order
    conv_labels: deque = field(default_factory=deque)
    conv_users: deque = field(default_factory=deque)  # the clicks' users (GAUC); "" when not given
    conv_ts: deque = field(default_factory=deque)  # the clicks' event times (s); -inf: unknown (old checkpoint)
    maturing: list = field(default_factory=list)  # heap of (click ts, seq, label, prob, user): labelled, not yet mature
    ranks: deque = field(default_factory=deque)
    conversions_seen: int = 0
    retrievals_seen: int = 0
    forced: int = 0  # cases that entered before maturity because the maturing buffer was full
    _seq: int = field(default=0, repr=False)  # insertion order: ties of click time leave the heap in arrival order

    def add_conversion(self, labels: np.ndarray, probs: np.ndarray, users: list[str] | None = None,
                       click_ts: np.ndarray | None = None) -> None:
        """Labelled click-time predictions. With ``click_ts`` [J] (the clicks' event times) they
        wait in the maturing buffer until :meth:`mature` lets them in; without, they enter the
        window at once in arrival order (click time unknown)."""
        users = users if users is not None else [""] * len(probs)
        self.conversions_seen += len(probs)
        if click_ts is None:
            for y, p, u in zip(np.asarray(labels).tolist(), np.asarray(probs).tolist(), users):
                self._enter(self.conv_ts[-1] if self.conv_ts else -math.inf, y, p, u)
            return
        for t, y, p, u in zip(np.asarray(click_ts, dtype=np.float64).tolist(), np.asarray(labels).tolist(),
                              np.asarray(probs).tolist(), users):
            heapq.heappush(self.maturing, (t, self._seq, y, p, u))
            self._seq += 1
        while len(self.maturing) > self.maturing_limit:  # (a click never labelled would hold H back forever)
            self._enter(*self._pop())
            self.forced += 1

    def mature(self, horizon: float) -> int:
        """Move every maturing case whose click is before ``horizon`` (the earliest click still
        awaiting its label; +inf: none) into the window, oldest click first; how many moved."""
        n = 0
        while self.maturing and self.maturing[0][0] < horizon:
            self._enter(*self._pop())
            n += 1
        return n

    def _pop(self) -> tuple[float, float, float, str]:
        t, _, y, p, u = heapq.heappop(self.maturing)
        return t, y, p, u

    def _enter(self, t: float, y: float, p: float, u: str) -> None:
        """Put a case into the window at its click time's place (almost always the end) and
        keep the latest ``window`` by click time."""
        if not self.conv_ts or t >= self.conv_ts[-1]:
            at = len(self.conv_ts)
        else:  # a click older than the window's newest (partitions interleave): find its place from the end
            at = len(self.conv_ts) - 1
            while at > 0 and self.conv_ts[at - 1] > t:
                at -= 1
        for q, v in ((self.conv_ts, t), (self.conv_labels, y), (self.conv_scores, p), (self.conv_users, u)):
            q.insert(at, v)
        while len(self.conv_ts) > self.window:
            for q in (self.conv_ts, self.conv_labels, self.conv_scores, self.conv_users):
                q.popleft()

    def add_ranks(self, ranks: np.ndarray) -> None:
        """Retrieval outcomes as 1-based mid-ranks (see :func:`model.metrics.ranks_of_targets`)."""
        self.ranks.extend(np.asarray(ranks).tolist())
        while len(self.ranks) > self.window:
            self.ranks.popleft()
        self.retrievals_seen += len(ranks)

    def snapshot(self) -> dict[str, float | None]:
        """AUC, GAUC (per user, when users were given), logloss and ECE (10 equal-mass bins) of
        the conversion window and the cases they rest on (``auc_clicks``, ``auc_buys``), the
        click times it covers (``auc_click_from``, ``auc_click_to``: event-time seconds, None
        when unknown) and how many labelled cases still wait for maturity (``auc_maturing``);
        HR@k and NDCG@k of the rank window."""
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
        span = [float(t) if math.isfinite(t) else None for t in (self.conv_ts[0], self.conv_ts[-1])] \
            if self.conv_ts else [None, None]
        return {"auc": auc(y, s), "gauc": g, "logloss": logloss(y, s), "ece": ece(y, s),
                "auc_clicks": len(y), "auc_buys": int((y > 0.5).sum()),
                "auc_click_from": span[0], "auc_click_to": span[1], "auc_maturing": len(self.maturing),
                f"hr@{self.k}": ranking["hr"], f"ndcg@{self.k}": ranking["ndcg"]}

    def state_dict(self) -> dict:
        """The windows, the maturing cases and counters (not ``window`` / ``k``: configuration)."""
        return {"conv_scores": list(self.conv_scores), "conv_labels": list(self.conv_labels),
                "conv_users": list(self.conv_users), "conv_ts": list(self.conv_ts),
                "maturing": [[t, y, p, u] for t, _, y, p, u in sorted(self.maturing)],
                "ranks": list(self.ranks), "conversions_seen": self.conversions_seen,
                "retrievals_seen": self.retrievals_seen, "forced": self.forced}

    def load_state_dict(self, d: dict) -> None:
        """Replace the windows, maturing cases and counters with saved ones (trimmed to this
        ``window``). A checkpoint from before click-time ordering has no click times: its window
        cases count as older than any new one (they leave first) and nothing was maturing."""
        self.conv_scores = deque(d["conv_scores"][-self.window:])
        self.conv_labels = deque(d["conv_labels"][-self.window:])
        users = d.get("conv_users") or [""] * len(d["conv_labels"])  # (checkpoints before click-time users)
        self.conv_users = deque(users[-self.window:])
        ts = d.get("conv_ts") or [-math.inf] * len(d["conv_labels"])  # (checkpoints before click-time order)
        self.conv_ts = deque(ts[-self.window:])
        self.maturing = [(float(t), n, y, p, u) for n, (t, y, p, u) in enumerate(d.get("maturing", []))]
        self._seq = len(self.maturing)
        heapq.heapify(self.maturing)
        self.ranks = deque(d["ranks"][-self.window:])
        self.conversions_seen, self.retrievals_seen = d["conversions_seen"], d["retrievals_seen"]
        self.forced = int(d.get("forced", 0))
