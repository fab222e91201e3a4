"""Real-time user features kept beside the graph, published to ``user-features``.

Per user:

- counts per behavior over sliding event-time windows of 1 h and 24 h. Event time is bucketed by
  minute; a window of W seconds ending at the user's latest event time ``now`` counts the events
  of the ``W/60`` minute buckets up to and including ``now``'s (exact to the minute; buckets
  older than the longest window are dropped, so the state is bounded by 1,440 buckets);
- conversion rate: closed conversion windows that ended in a buy / all closed windows (the
  labels the worker emits as conversion samples), with both counts;
- the last categories the user touched, most recent first, distinct, at most 5.

Everything is a deterministic function of the user's events and labels, so it is rebuilt exactly
on replay, and it is stored in the same value as the graph (see :mod:`state.record`): the source
offset that makes graph updates exactly-once covers the features too.
"""

from __future__ import annotations

import math
import struct
from json.encoder import encode_basestring_ascii as _json_str
from dataclasses import dataclass, field
from itertools import chain
from typing import Iterable

from tgastream.core.events import BEHAVIORS

FEATURES_VERSION = 1
BUCKET_S = 60
WINDOWS_S: tuple[int, ...] = (3600, 86400)
WINDOW_NAMES: tuple[str, ...] = ("1h", "24h")
MAX_CATEGORIES = 5

_HEADER = struct.Struct("<BdIIIHB")  # version, latest ts, events, conversions, windows, n buckets, n cats


@dataclass
class UserFeatures:
    """Sliding-window behavior counts, conversion counts and recent categories of one user."""

    latest_ts: float = -math.inf
    events: int = 0
    conversions: int = 0  # closed conversion windows with a buy
    conversion_windows: int = 0  # closed conversion windows
    buckets: dict[int, list[int]] = field(default_factory=dict)  # minute → counts per behavior
    last_categories: list[str] = field(default_factory=list)  # most recent first

    def observe(self, category_id: str, behavior_code: int, ts: float) -> None:
        """Count one event (any arrival order: a late event lands in its own minute if still kept)."""
        self.events += 1
        if ts > self.latest_ts:
            self.latest_ts = ts
        minute = int(ts // BUCKET_S)
        horizon = int(self.latest_ts // BUCKET_S) - WINDOWS_S[-1] // BUCKET_S
        if minute > horizon:
            counts = self.buckets.get(minute)
            if counts is None:
                counts = self.buckets[minute] = [0, 0, 0, 0]
            counts[behavior_code] += 1
        if len(self.buckets) > 64:  # prune lazily: cheap on the hot path, bounded all the same
            self._prune(horizon)
        cats = self.last_categories
        if not cats or cats[0] != category_id:
            if category_id in cats:
                cats.remove(category_id)
            cats.insert(0, category_id)
            del cats[MAX_CATEGORIES:]

    def observe_label(self, label: float) -> None:
        """A conversion window closed: label 1 (bought) or 0 (expired)."""
        self.conversion_windows += 1
        if label > 0.5:
            self.conversions += 1

    def _prune(self, horizon: int) -> None:
        for minute in [m for m in self.buckets if m <= horizon]:
            del self.buckets[minute]

    def window_counts(self, window_s: int) -> list[int]:
        """Counts per behavior in the ``window_s // 60`` minutes up to the latest event."""
        return self._counts((window_s,))[0]

    def _counts(self, windows: tuple[int, ...]) -> list[list[int]]:
        """Counts per behavior for each window, in one pass over the buckets."""
        out = [[0, 0, 0, 0] for _ in windows]
        if not self.buckets:
            return out
        last = int(self.latest_ts // BUCKET_S)
        firsts = [last - w // BUCKET_S for w in windows]
        for minute, counts in self.buckets.items():
            for first, acc in zip(firsts, out):
                if minute > first:
                    acc[0] += counts[0]
                    acc[1] += counts[1]
                    acc[2] += counts[2]
                    acc[3] += counts[3]
        return out

    @property
    def conversion_rate(self) -> float | None:
        return self.conversions / self.conversion_windows if self.conversion_windows else None

    def snapshot(self, user_id: str) -> dict:
        """The published feature record (JSON-ready)."""
        out: dict = {"user_id": user_id, "version": FEATURES_VERSION,
                     "ts": self.latest_ts if self.events else None, "events": self.events}
        for name, window in zip(WINDOW_NAMES, WINDOWS_S):
            out[f"counts_{name}"] = dict(zip(BEHAVIORS, self.window_counts(window)))
        out["conversion_rate"] = self.conversion_rate
        out["conversions"] = self.conversions
        out["conversion_windows"] = self.conversion_windows
        out["last_categories"] = list(self.last_categories)
        return out

    def to_json(self, user_id: str) -> bytes:
        """:meth:`snapshot` as compact JSON, formatted directly (it is written for every changed user)."""
        h, d = self._counts(WINDOWS_S)
        rate = self.conversion_rate
        ts = repr(float(self.latest_ts)) if self.events else "null"
        cats = ",".join([_json_str(c) for c in self.last_categories])
        return (f'{{"user_id":{_json_str(user_id)},"version":{FEATURES_VERSION},"ts":{ts},"events":{self.events},'
                f'"counts_1h":{{"click":{h[0]},"fav":{h[1]},"cart":{h[2]},"buy":{h[3]}}},'
                f'"counts_24h":{{"click":{d[0]},"fav":{d[1]},"cart":{d[2]},"buy":{d[3]}}},'
                f'"conversion_rate":{"null" if rate is None else repr(rate)},"conversions":{self.conversions},'
                f'"conversion_windows":{self.conversion_windows},"last_categories":[{cats}]}}').encode()

    # -- encoding ---------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """Header, minute indexes (i64), counts (u32 × 4 per minute, minute order), categories."""
        if self.buckets:
            self._prune(int(self.latest_ts // BUCKET_S) - WINDOWS_S[-1] // BUCKET_S)
        minutes = sorted(self.buckets)
        n = len(minutes)
        return b"".join((
            _HEADER.pack(FEATURES_VERSION, self.latest_ts, self.events, self.conversions,
                         self.conversion_windows, n, len(self.last_categories)),
            struct.pack(f"<{n}q{4 * n}I", *minutes, *chain.from_iterable(self.buckets[m] for m in minutes)),
            "\n".join(self.last_categories).encode(),  # ids never contain a newline (validation)
        ))

    @classmethod
    def from_bytes(cls, data: bytes | memoryview) -> "UserFeatures":
        data = bytes(data)
        version, latest, events, conv, windows, n, n_cats = _HEADER.unpack_from(data, 0)
        if version != FEATURES_VERSION:
            raise ValueError(f"user features encoding version {version} is not supported")
        body = struct.Struct(f"<{n}q{4 * n}I")
        values = body.unpack_from(data, _HEADER.size)
        counts = iter(values[n:])
        buckets = {m: [next(counts), next(counts), next(counts), next(counts)] for m in values[:n]}
        cats = data[_HEADER.size + body.size:].decode().split("\n") if n_cats else []
        if len(cats) != n_cats:
            raise ValueError("user features encoding is corrupt: category count mismatch")
        return cls(latest, events, conv, windows, buckets, cats)


def build_features(events: Iterable[tuple[str, int, float]], labels: Iterable[float] = ()) -> UserFeatures:
    """From scratch: features of (category, behavior code, ts) events and conversion labels."""
    f = UserFeatures()
    for cat, beh, ts in events:
        f.observe(cat, beh, ts)
    for label in labels:
        f.observe_label(label)
    return f
