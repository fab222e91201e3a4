"""Conversion predictions judged when they are made: the click-time prediction store.

A conversion label is known a day after its click (or at the buy), but the model must be judged
on what it said *at the click*. So the trainer predicts P(buy) when a click reaches it (the
worker's CLICK sample, state/samples.py) with the model serving then, and keeps the prediction
here with that model's version, keyed by the click's identity (user, item, click time: one open
window per user and item). The prediction comes from the publishing forward
(``OnlineLearner.vectors``, the same pass as the user vectors: in the trainer's publishing
thread, the newest copy of the weights when the click reaches the head) and is handed to the
learner as :class:`Predictions`; a click that reaches a training step without one (lost, or a
caller that did not publish) is predicted in that step, from its forward. When the window closes (the conversion sample: buy → 1, window end
→ 0) the label joins the prediction, and only then does the case count in a metric. A positive
and a negative of clicks made at the same time are thus scored by the same model version, not
one at the buy and the other a day (or a whole run) later.

Bounded: at most ``capacity`` pending predictions; past it the oldest is dropped and counted
(``evicted``). A label that finds no prediction (its click was evicted, or predicted before this
store existed) is counted (``unmatched``) and scored nowhere: a lost prediction is never guessed.
The store is part of the learner's state, so it is checkpointed with the trained offsets and a
restart resumes with the same pending predictions.

The maturity horizon (:meth:`ClickTimeStore.horizon`) is the earliest click time among the
pending predictions: every click before it is labelled, so the rolling metrics
(model/prequential.py) judge only clicks whose era is complete, positives and negatives alike.
A heap of (click time, key) beside the pending map keeps it O(log n) a prediction; entries of
keys that left the map (joined, evicted, predicted again) are dropped when they reach the top,
and the heap is rebuilt from the map when stale entries outnumber live ones.

A prediction may hold several scores (the shadow evaluation keeps online, baseline and
repeat-recent side by side, model/shadow.py): ``probs`` is a row per click.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from tgastream.state.samples import Sample

Key = tuple[str, str, float]  # user, item, click time


@dataclass
class Predictions:
    """Click-time P(buy) made outside a training step, by the publishing forward
    (``OnlineLearner.vectors``) of the model serving at the click: clicks [C], probs [C], the
    version of the model that made them."""

    clicks: list[Sample]
    probs: np.ndarray
    version: int


@dataclass
class Joined:
    """Labels joined to their click-time predictions: labels [J], probs [J, M], versions [J],
    users [J] (for GAUC), the clicks' event times click_ts [J]."""

    labels: np.ndarray
    probs: np.ndarray
    versions: np.ndarray
    users: list[str]
    click_ts: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class ClickTimeStore:
    """Pending click-time predictions (bounded, oldest out first) and what became of them."""

    capacity: int = 200_000
    width: int = 1  # scores per prediction
    pending: OrderedDict = field(default_factory=OrderedDict)  # Key → (version, (p_1, ..., p_M))
    predicted: int = 0
    joined: int = 0
    evicted: int = 0  # dropped unlabelled because the store was full
    unmatched: int = 0  # labels that found no prediction
    history: list | None = None  # a list to also append every (key, version, probs) to (benchmarks); None: off
    heap: list = field(default_factory=list, repr=False)  # (click ts, user, item) of pending keys, stale ones lazily dropped

    def predict(self, clicks: Sequence[Sample], probs: np.ndarray, version: int) -> None:
        """Keep the predictions ``probs`` [C] or [C, M] of ``clicks`` made by model ``version``."""
        rows = np.asarray(probs, dtype=np.float64).reshape(len(clicks), -1)
        for s, row in zip(clicks, rows.tolist()):
            key = s.click_key
            again = self.pending.pop(key, None) is not None  # (the same click again, e.g. read again: the newest counts)
            self.pending[key] = (int(version), tuple(row))
            if not again:  # (its entry is still in the heap)
                heapq.heappush(self.heap, (key[2], key[0], key[1]))
            self.predicted += 1
            if self.history is not None:
                self.history.append((key, int(version), tuple(row)))
        while len(self.pending) > self.capacity:
            self.pending.popitem(last=False)
            self.evicted += 1
        self._compact()

    def has(self, click: Sample) -> bool:
        """Whether the click's prediction is pending (made and not yet joined to its label)."""
        return click.click_key in self.pending

    def peek(self, clicks: Sequence[Sample]) -> np.ndarray:
        """The first score [C] of pending predictions (each click must be pending), left in the store."""
        return np.asarray([self.pending[s.click_key][1][0] for s in clicks], dtype=np.float64)

    def horizon(self) -> float:
        """The maturity horizon: the earliest click time among pending predictions (+inf when
        none is pending). Every predicted click before it has its label."""
        while self.heap:
            t, u, i = self.heap[0]
            if (u, i, t) in self.pending:
                return t
            heapq.heappop(self.heap)  # (a key that left: joined, evicted)
        return math.inf

    def _compact(self) -> None:
        """Rebuild the heap from the pending keys when stale entries outnumber live ones (keeps
        it within twice the store, whatever order labels arrive in)."""
        if len(self.heap) > 2 * len(self.pending) + 64:
            self.heap = [(t, u, i) for u, i, t in self.pending]
            heapq.heapify(self.heap)

    def join(self, conversions: Sequence[Sample]) -> Joined:
        """The click-time predictions of these labelled conversion samples (removed from the store);
        those without one are counted in ``unmatched`` and left out."""
        labels, probs, versions, users, click_ts = [], [], [], [], []
        for s in conversions:
            hit = self.pending.pop(s.click_key, None)
            if hit is None:
                self.unmatched += 1
                continue
            labels.append(s.label)
            versions.append(hit[0])
            probs.append(hit[1])
            users.append(s.user_id)
            click_ts.append(s.click_key[2])
        self.joined += len(labels)
        self._compact()
        return Joined(np.asarray(labels, dtype=np.float64), np.asarray(probs, dtype=np.float64).reshape(-1, self.width),
                      np.asarray(versions, dtype=np.int64), users, np.asarray(click_ts, dtype=np.float64))

    def counts(self) -> dict[str, int]:
        return {"pending": len(self.pending), "predicted": self.predicted, "joined": self.joined,
                "evicted": self.evicted, "unmatched": self.unmatched}

    def state_dict(self) -> dict:
        """Plain data (a checkpoint holds no code): the pending predictions in age order and the counters."""
        return {"pending": [[u, i, ts, v, list(p)] for (u, i, ts), (v, p) in self.pending.items()],
                "width": self.width, **{k: v for k, v in self.counts().items() if k != "pending"}}

    def load_state_dict(self, d: dict) -> None:
        self.pending = OrderedDict(((u, i, float(ts)), (int(v), tuple(p))) for u, i, ts, v, p in d["pending"])
        for k in ("predicted", "joined", "evicted", "unmatched"):
            setattr(self, k, int(d.get(k, 0)))
        while len(self.pending) > self.capacity:
            self.pending.popitem(last=False)
            self.evicted += 1
        self.heap = [(t, u, i) for u, i, t in self.pending]  # (not checkpointed: rebuilt from the map)
        heapq.heapify(self.heap)
