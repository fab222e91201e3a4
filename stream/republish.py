"""One embedding space at serving time: re-publish recently published vectors with the newest model.

A user's vector is published when one of their samples arrives and keeps that model version until
their next event, while item vectors move on with every step: a served dot product can mix model
versions. The trainer remembers what it published (bounded, oldest first) and, at a bounded rate,
recomputes the vectors that an older model made and publishes them again with the current one,
users from the context graph they were published with, items from their category.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass
class Published:
    """Vectors published so far, each with its model version, oldest publish first."""

    capacity: int = 50_000  # of users and of items; a user's entry holds its context (~1 KB at 50 nodes)
    users: OrderedDict[str, tuple[int, bytes, float]] = field(default_factory=OrderedDict)  # → version, context, event ts
    items: OrderedDict[str, tuple[int, str]] = field(default_factory=OrderedDict)  # → version, category

    def user(self, user_id: str, version: int, context: bytes, event_ts: float) -> None:
        self.users[user_id] = (version, context, event_ts)
        self.users.move_to_end(user_id)
        while len(self.users) > self.capacity:
            self.users.popitem(last=False)

    def item(self, item_id: str, version: int, category: str) -> None:
        self.items[item_id] = (version, category)
        self.items.move_to_end(item_id)
        while len(self.items) > self.capacity:
            self.items.popitem(last=False)

    def stale(self, current: int, budget: int) -> tuple[dict[str, tuple[bytes, float]], dict[str, str]]:
        """Up to ``budget`` users and items published by a model older than ``current``, oldest
        first (they are at the front: versions only grow in publish order)."""
        users: dict[str, tuple[bytes, float]] = {}
        for uid, (version, context, ts) in self.users.items():
            if version >= current or len(users) >= budget // 2:
                break
            users[uid] = (context, ts)
        items: dict[str, str] = {}
        for iid, (version, category) in self.items.items():
            if version >= current or len(users) + len(items) >= budget:
                break
            items[iid] = category
        return users, items

    def demote(self, newer_than: int) -> None:
        """After a rollback to version ``newer_than``: vectors a newer (bad) model published
        become the stalest of all (version -1, moved to the front), so the sweep publishes
        them again with the good model first."""
        for d in (self.users, self.items):
            bad = [k for k, v in d.items() if v[0] > newer_than]
            for k in reversed(bad):
                d[k] = (-1, *d[k][1:])
                d.move_to_end(k, last=False)

    def version_lag(self, current: int) -> int:
        """How many model versions the oldest vector still published is behind ``current``."""
        oldest = [v for v, *_ in (next(iter(d.values())) for d in (self.users, self.items) if d)]
        return max((current - v for v in oldest), default=0)
