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


class RowKeys:
    """Identity keys for batches scored against the embedding rows: an item's row where it has one
    (so the pointer's hits land on catalogue columns, row r ↔ column r - 1), else a key of its own
    above every row (``UNKNOWN_KEY_BASE`` + j, distinct per item within this object's batch).

    Why: with the rows themselves as keys every item without a row is key 0, and "is this node the
    candidate item" then holds between *any* two unknown items. A model that does not assign rows
    (a frozen copy, a conversion snapshot, the guard's baseline) would count a new item's click as a
    repeat of every other new item in its context. One instance per batch (its unknown keys are
    local to it)."""

    def __init__(self, rows: Vocab) -> None:
        self.rows = rows
        self._unknown: dict[str, int] = {}

    def lookup(self, ids: Sequence[str]) -> np.ndarray:
        out = np.asarray(self.rows.lookup(ids), dtype=np.int64)
        missing = np.flatnonzero(out == 0)
        if len(missing):
            out = out.copy()
            unknown = self._unknown
            for n in missing:
                i = ids[n]
                k = unknown.get(i)
                if k is None:
                    k = unknown[i] = UNKNOWN_KEY_BASE + len(unknown)
                out[n] = k
        return out

    def __len__(self) -> int:
        return len(self.rows)


UNKNOWN_KEY_BASE = 1 << 30  # above any catalogue's rows, within int32 (EncodedSamples.keys)
