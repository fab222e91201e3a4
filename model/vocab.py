"""Item and category ids → embedding rows.

The model never sees external ids: a :class:`Vocab` maps them to rows of its embedding tables,
row 0 meaning padding/unknown (an unknown item is represented by its category embedding alone).
Offline evaluation uses :class:`InMemoryVocab`; the online trainer provides a persistent one
(RocksDB-backed, growing and evicting rows) with the same two methods, so the model is agnostic to
where rows come from.
"""

from __future__ import annotations

from typing import Iterable, Protocol, Sequence

import numpy as np


class Vocab(Protocol):
    """What batching needs of an id → row mapping."""

    def lookup(self, ids: Sequence[str]) -> np.ndarray:
        """Rows (int64) of ``ids``, 0 for an id without a row."""
        ...

    def __len__(self) -> int:
        """Rows in use, including row 0."""
        ...


class InMemoryVocab:
    """A dict-backed vocabulary; rows are assigned in first-seen order starting at 1."""

    def __init__(self, ids: Iterable[str] = (), capacity: int | None = None) -> None:
        self._rows: dict[str, int] = {}
        self.capacity = capacity  # max rows incl. 0; None = unbounded
        self.add(ids)

    def add(self, ids: Iterable[str]) -> None:
        """Give every new id the next free row (ids past ``capacity`` stay unknown)."""
        rows = self._rows
        for i in ids:
            if i not in rows and (self.capacity is None or len(rows) + 1 < self.capacity):
                rows[i] = len(rows) + 1

    def lookup(self, ids: Sequence[str]) -> np.ndarray:
        get = self._rows.get
        return np.fromiter((get(i, 0) for i in ids), dtype=np.int64, count=len(ids))

    def ids(self) -> list[str]:
        """Ids in row order (row 1 first)."""
        return list(self._rows)

    def __contains__(self, item: str) -> bool:
        return item in self._rows

    def __len__(self) -> int:
        return len(self._rows) + 1


class BatchKeys:
    """Identity keys local to one batch (1..k, 0 = padding): enough for pointer matching when
    no catalogue index is at hand, as in online training."""

    def __init__(self) -> None:
        self._keys: dict[str, int] = {}

    def lookup(self, ids: Sequence[str]) -> np.ndarray:
        keys = self._keys
        out = np.empty(len(ids), dtype=np.int64)
        for n, i in enumerate(ids):
            k = keys.get(i)
            if k is None:
                k = keys[i] = len(keys) + 1
            out[n] = k
        return out

    def __len__(self) -> int:
        return len(self._keys) + 1
