"""A persistent, collision-free map from external ids (items, categories) to embedding rows.

New ids get rows as they arrive; the row space grows in chunks (the trainer grows the embedding
table and its optimizer state to match); rows unused for ``ttl_s`` are evicted and reused. Row 0
is reserved for padding / unknown ids, so a lookup of an unknown id without growing gives 0 and
never an index error.

Persistence: the map's full snapshot travels inside each trainer checkpoint (``to_bytes``), which
is the atomic source of truth; :meth:`IdMap.sync_to` mirrors it into a RocksDB (``id:<ext>`` →
row, ``row:<n>`` → ext, ``meta:step``) for other processes to read. On restart the checkpoint's
snapshot wins and the mirror is rewritten where its step differs.
"""

from __future__ import annotations

import heapq
import struct
from itertools import repeat
from pathlib import Path
from typing import Sequence

import numpy as np
from rocksdict import Options, Rdict, WriteBatch

IDMAP_VERSION = 1
_HEADER = struct.Struct("<BIIIQ")  # version, chunk, capacity, next row, n entries


class IdMap:
    """External id → row in [1, capacity); row 0 = padding/unknown."""

    def __init__(self, chunk: int = 4096) -> None:
        if chunk < 2:
            raise ValueError("chunk must be >= 2")
        self.chunk = chunk
        self.capacity = chunk  # rows allocated (table size), always a multiple of chunk
        self._next = 1  # next never-used row
        self._row: dict[str, int] = {}
        self._ext: dict[int, str] = {}
        self._free: list[int] = []  # min-heap of evicted rows, reused lowest first (deterministic)
        self.last_used = np.zeros(self.capacity, dtype=np.float64)  # [capacity]
        self.evictions = 0

    def __deepcopy__(self, memo: dict) -> "IdMap":
        """An independent copy at C speed: the maps hold only str and int, so copies of the
        containers are deep copies (``copy.deepcopy``'s per-entry recursion took ~1 s for a
        million items, and a conversion snapshot copies the maps every ``conversion_snapshot_steps``)."""
        twin = IdMap.__new__(IdMap)
        twin.__dict__.update(self.__dict__)
        twin._row, twin._ext, twin._free = dict(self._row), dict(self._ext), list(self._free)
        twin.last_used = self.last_used.copy()
        memo[id(self)] = twin
        return twin

    def __len__(self) -> int:
        return len(self._row)

    def __contains__(self, ext: str) -> bool:
        return ext in self._row

    def row_of(self, ext: str) -> int:
        return self._row.get(ext, 0)

    def id_of(self, row: int) -> str | None:
        return self._ext.get(row)

    def _new_row(self) -> int:
        if self._free:
            return heapq.heappop(self._free)
        row = self._next
        self._next += 1
        if row >= self.capacity:
            self.capacity += self.chunk
            self.last_used = np.concatenate([self.last_used, np.zeros(self.chunk)])
        return row

    def lookup(self, ids: Sequence[str], now: float, grow: bool = True) -> np.ndarray:
        """Rows of ``ids`` [len(ids)] int64, marking them used at ``now``; unknown → new row (or 0)."""
        out = np.zeros(len(ids), dtype=np.int64)
        for k, ext in enumerate(ids):
            row = self._row.get(ext)
            if row is None:
                if not grow:
                    continue
                row = self._new_row()
                self._row[ext] = row
                self._ext[row] = ext
            out[k] = row
        used = out[out > 0]
        self.last_used[used] = np.maximum(self.last_used[used], now)
        return out

    def touch(self, rows: np.ndarray, now: float) -> None:
        """Mark ``rows`` (of ids known already) used at ``now`` (rows of another process's batch
        in data-parallel training, where every rank keeps the same map)."""
        rows = np.asarray(rows, dtype=np.int64)
        rows = rows[(rows > 0) & (rows < self.capacity)]
        self.last_used[rows] = np.maximum(self.last_used[rows], now)

    def peek(self, ids: Sequence[str]) -> np.ndarray:
        """Rows of ``ids`` without assigning or touching; unknown → 0."""
        # map over dict.get: no Python frame per id (a step looks up ~20k node ids)
        return np.fromiter(map(self._row.get, ids, repeat(0, len(ids))), dtype=np.int64, count=len(ids))

    def evict(self, now: float, ttl_s: float, evicted_ids: list[str] | None = None) -> np.ndarray:
        """Free every row unused since ``now - ttl_s``; returns the freed rows (to re-initialise)
        and appends their ids to ``evicted_ids`` when given."""
        stale = [r for r in self._ext if self.last_used[r] < now - ttl_s]
        stale.sort()
        for row in stale:
            ext = self._ext.pop(row)
            del self._row[ext]
            if evicted_ids is not None:
                evicted_ids.append(ext)
            self.last_used[row] = 0.0
            heapq.heappush(self._free, row)
        self.evictions += len(stale)
        return np.asarray(stale, dtype=np.int64)

    def rows(self) -> list[int]:
        """Rows that hold an id."""
        return list(self._ext)

    def items(self) -> list[tuple[str, int]]:
        return sorted(self._row.items(), key=lambda kv: kv[1])

    # -- persistence ------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        pairs = self.items()
        ids = "\n".join(e for e, _ in pairs).encode()
        rows = np.asarray([r for _, r in pairs], dtype="<u4")
        free = np.asarray(sorted(self._free), dtype="<u4")
        return b"".join((
            _HEADER.pack(IDMAP_VERSION, self.chunk, self.capacity, self._next, len(pairs)),
            struct.pack("<IQ", len(free), self.evictions),
            rows.tobytes(), free.tobytes(), self.last_used.astype("<f8").tobytes(), ids,
        ))

    @classmethod
    def from_bytes(cls, data: bytes) -> "IdMap":
        version, chunk, capacity, nxt, n = _HEADER.unpack_from(data, 0)
        if version != IDMAP_VERSION:
            raise ValueError(f"id map encoding version {version} is not supported")
        off = _HEADER.size
        n_free, evictions = struct.unpack_from("<IQ", data, off)
        off += 12
        rows = np.frombuffer(data, "<u4", n, off).astype(np.int64)
        off += 4 * n
        free = np.frombuffer(data, "<u4", n_free, off).tolist()
        off += 4 * n_free
        last_used = np.frombuffer(data, "<f8", capacity, off).copy()
        off += 8 * capacity
        ids = data[off:].decode().split("\n") if n else []
        m = cls(chunk)
        m.capacity, m._next, m.last_used, m.evictions = capacity, nxt, last_used, evictions
        m._row = dict(zip(ids, rows.tolist()))
        m._ext = {r: e for e, r in m._row.items()}
        m._free = free
        heapq.heapify(m._free)
        return m

    def sync_to(self, path: Path, step: int) -> None:
        """Mirror the map into RocksDB at ``path`` as of checkpoint ``step`` (rewrite if stale)."""
        opts = Options(raw_mode=True)
        opts.create_if_missing(True)
        db = Rdict(str(path), options=opts)
        try:
            if db.get(b"meta:step") == str(step).encode():
                return
            wb = WriteBatch(raw_mode=True)
            for key in list(db.keys()):
                wb.delete(key)
            for ext, row in self._row.items():
                wb.put(b"id:" + ext.encode(), struct.pack("<I", row))
                wb.put(b"row:" + struct.pack(">I", row), ext.encode())
            wb.put(b"meta:step", str(step).encode())
            db.write(wb)
        finally:
            db.close()


def read_mirror(path: Path) -> dict[str, int]:
    """The id → row mapping from a RocksDB mirror (for readers and tests)."""
    opts = Options(raw_mode=True)
    db = Rdict(str(path), options=opts)
    try:
        return {k[3:].decode(): struct.unpack("<I", v)[0] for k, v in db.items() if k.startswith(b"id:")}
    finally:
        db.close()
