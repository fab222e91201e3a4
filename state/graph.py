"""The per-user behavior-transition graph of DESIGN.md §3.

A user's graph is the window of their last ``max_len`` events. Event ``j`` has at most three
in-edges, each from an earlier event in the window:

- item-level (view 0): the latest earlier event on the same item (any behavior);
- category-level (view 1): the latest earlier event on a *different* item of the same category;
- neighbor-level (view 2): the event just before it.

Each edge has a transition type ``view * 16 + src_behavior * 4 + dst_behavior`` (48 types).
Appending is O(1) amortised: two dictionaries give the latest event per item and the latest two
distinct-item events per category. Predecessors are stored as distances back (``j - i``), which
survive the window sliding unchanged; a distance that reaches past the window start means the edge
left the window and is dropped. So an incremental build always equals a from-scratch build of the
events in the window (tested as a property).

The binary encoding is versioned and pickle-free (struct header + numpy arrays).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from itertools import chain
from typing import Iterable, Sequence

import numpy as np

from tgastream.core.events import BEHAVIOR_CODE, Event
from tgastream.core.settings import MAX_LEN

N_VIEWS = 3
N_BEHAVIORS = 4
N_EDGE_TYPES = N_VIEWS * N_BEHAVIORS * N_BEHAVIORS  # 48
VIEW_ITEM, VIEW_CATEGORY, VIEW_NEIGHBOR = 0, 1, 2
N_GAP_BUCKETS = 24
"""Time-gap buckets: 0 = first event of the window, 1 = gap < 1 s, then log2-spaced up to ~2^21 s."""

ENCODING_VERSION = 1
_HEADER = struct.Struct("<BIQ")  # version, n nodes, total events ever appended


def edge_type(view: int, src_behavior: int, dst_behavior: int) -> int:
    """Transition type id in [0, 48): view × source behavior × target behavior."""
    return view * 16 + src_behavior * 4 + dst_behavior


def gap_bucket(gap_s: np.ndarray) -> np.ndarray:
    """Log-spaced bucket of the gap (seconds) to the previous event; NaN (no previous) → 0."""
    gap = np.nan_to_num(np.asarray(gap_s, dtype=np.float64), nan=-1.0)
    bucket = 1 + np.floor(np.log2(1.0 + np.maximum(gap, 0.0))).astype(np.int64)
    return np.where(gap < 0, 0, np.minimum(bucket, N_GAP_BUCKETS - 1))


@dataclass(frozen=True)
class GraphArrays:
    """What the model's batcher needs of one graph (N = nodes in the window, oldest first)."""

    items: list[str]  # external item ids [N]
    categories: list[str]  # external category ids [N]
    behaviors: np.ndarray  # [N] int64, codes of tgastream.core.events.BEHAVIORS
    ts: np.ndarray  # [N] float64 event time, s
    gap_buckets: np.ndarray  # [N] int64 in [0, N_GAP_BUCKETS)
    neighbors: np.ndarray  # [N, 3] int64 local index of each view's predecessor, -1 = none
    edge_types: np.ndarray  # [N, 3] int64 transition type in [0, 48), -1 where no edge

    def __len__(self) -> int:
        return len(self.items)


class _Packed:
    """A numeric column of a :class:`UserGraph` (``_beh``, ``_ts``, ``_dist``) stored in slot
    ``slot``: a decoded graph's columns are unpacked from its encoding on first use."""

    def __init__(self, slot: str) -> None:
        self.slot = slot

    def __get__(self, g: "UserGraph | None", owner: type | None = None):
        if g is None:
            return self
        if g._raw is not None:
            g._unpack()
        return getattr(g, self.slot)

    def __set__(self, g: "UserGraph", value: list) -> None:
        if g._raw is not None:
            g._unpack()
        setattr(g, self.slot, value)


class UserGraph:
    """One user's transition graph over a sliding window of their last ``max_len`` events."""

    __slots__ = ("max_len", "total", "_items", "_cats", "_b", "_t", "_d", "_raw", "_last_item", "_last_cat", "_arrays")

    def __init__(self, max_len: int = MAX_LEN) -> None:
        if max_len < 1 or max_len > 65535:
            raise ValueError(f"max_len must be in [1, 65535], got {max_len}")
        self.max_len = max_len
        self.total = 0  # events ever appended; node k of the window has global sequence total-n+k
        self._items: list[str] = []
        self._cats: list[str] = []
        self._raw: tuple[bytes, int] | None = None  # (encoding, n): numeric columns not unpacked yet
        self._b: list[int] = []  # behavior codes
        self._t: list[float] = []  # event times
        self._d: list[tuple[int, int, int]] = []  # distance back to each view's predecessor, 0 = none
        self._last_item: dict[str, int] | None = {}  # item → global seq of its latest event
        self._last_cat: dict[str, tuple[int, str, int]] | None = {}  # cat → (seq, item, seq of latest other-item event or -1)
        self._arrays: GraphArrays | None = None  # to_arrays() cache, dropped on append

    def __len__(self) -> int:
        return len(self._items)

    # The numeric columns of a decoded graph are unpacked on first use: a trainer decodes every
    # sample it reads, but its publishing thread needs only the ids of most of them, and the
    # batcher reads the columns straight from the encoding (:func:`arrays_of`).
    _beh = _Packed("_b")  # behavior codes [N]
    _ts = _Packed("_t")  # event times [N]
    _dist = _Packed("_d")  # distances back to each view's predecessor [N] of 3, 0 = none

    def _unpack(self) -> None:
        data, n = self._raw  # type: ignore[misc]
        off = _HEADER.size + 2
        self._b = list(data[off: off + n])
        self._t = list(struct.unpack_from(f"<{n}d", data, off + n))
        d = iter(struct.unpack_from(f"<{3 * n}H", data, off + 9 * n))
        self._d = list(zip(d, d, d))
        self._raw = None

    def _columns(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Behaviors [N] int64, times [N] float64, distances [N, 3] int64: from the encoding
        when not unpacked (no Python objects per node), else from the lists."""
        n = len(self._items)
        if self._raw is not None:
            data, _n = self._raw
            off = _HEADER.size + 2
            beh = np.frombuffer(data, dtype=np.uint8, count=n, offset=off).astype(np.int64)  # [N]
            ts = np.frombuffer(data, dtype="<f8", count=n, offset=off + n).astype(np.float64)  # [N]
            dist = np.frombuffer(data, dtype="<u2", count=3 * n, offset=off + 9 * n).astype(np.int64)  # [3N]
            return beh, ts, dist.reshape(n, 3)
        return (np.asarray(self._b, dtype=np.int64), np.asarray(self._t, dtype=np.float64),
                np.asarray(self._d, dtype=np.int64).reshape(n, 3))

    @property
    def start(self) -> int:
        """Global sequence number of the oldest event in the window."""
        return self.total - len(self._items)

    def _rebuild_maps(self) -> None:
        self._last_item, self._last_cat = {}, {}
        for k, (item, cat) in enumerate(zip(self._items, self._cats)):
            self._note(self.start + k, item, cat)

    def _note(self, seq: int, item: str, cat: str) -> None:
        assert self._last_item is not None and self._last_cat is not None
        self._last_item[item] = seq
        prev = self._last_cat.get(cat)
        if prev is None:
            self._last_cat[cat] = (seq, item, -1)
        elif prev[1] == item:
            self._last_cat[cat] = (seq, item, prev[2])
        else:
            self._last_cat[cat] = (seq, item, prev[0])

    def append(self, item: str, category: str, behavior: int, ts: float) -> None:
        """Add one event as the newest node; O(1) amortised."""
        self._arrays = None
        if self._last_item is None:
            self._rebuild_maps()
        assert self._last_item is not None and self._last_cat is not None
        seq = self.total
        start = self.start
        i_seq = self._last_item.get(item, -1)
        c = self._last_cat.get(category)
        c_seq = -1 if c is None else (c[0] if c[1] != item else c[2])
        dist = (
            seq - i_seq if i_seq >= start else 0,
            seq - c_seq if c_seq >= start else 0,
            1 if self._items else 0,
        )
        self._items.append(item)
        self._cats.append(category)
        self._beh.append(behavior)
        self._ts.append(float(ts))
        self._dist.append(dist)
        self.total += 1
        self._note(seq, item, category)
        if len(self._items) > self.max_len:
            self._evict_oldest()

    def append_event(self, event: Event) -> None:
        self.append(event.item_id, event.category_id, BEHAVIOR_CODE[event.behavior], event.ts)

    def _evict_oldest(self) -> None:
        assert self._last_item is not None and self._last_cat is not None
        seq = self.start
        item, cat = self._items[0], self._cats[0]
        if self._last_item.get(item) == seq:
            del self._last_item[item]
        entry = self._last_cat.get(cat)
        if entry is not None:
            if entry[0] == seq:
                del self._last_cat[cat]
            elif entry[2] == seq:
                self._last_cat[cat] = (entry[0], entry[1], -1)
        # list.pop(0) is O(n) but a memmove of pointers: cheaper than a deque for n ≤ a few hundred
        for arr in (self._items, self._cats, self._beh, self._ts, self._dist):
            arr.pop(0)

    def tail(self, k: int) -> "UserGraph":
        """A graph of the last ``k`` nodes (edges leaving them dropped), e.g. a training sample."""
        out = UserGraph(max(k, 1))
        n = min(k, len(self))
        out.total = self.total
        out._items, out._cats = self._items[len(self) - n:], self._cats[len(self) - n:]
        out._beh, out._ts, out._dist = self._beh[len(self) - n:], self._ts[len(self) - n:], self._dist[len(self) - n:]
        out._last_item = out._last_cat = None
        return out

    @property
    def item_ids(self) -> list[str]:
        """Item ids of the window, oldest first (a read-only view: do not mutate)."""
        return self._items

    @property
    def category_ids(self) -> list[str]:
        return self._cats

    def copy(self) -> "UserGraph":
        """An independent copy (appending to it leaves this graph unchanged)."""
        out = self.head(len(self))
        out.max_len = self.max_len
        return out

    def head(self, n: int) -> "UserGraph":
        """The first ``n`` nodes: the graph as it was when its n-th node was the newest."""
        out = UserGraph(self.max_len)
        n = max(0, min(n, len(self)))
        out.total = self.start + n
        out._items, out._cats, out._beh = self._items[:n], self._cats[:n], self._beh[:n]
        out._ts, out._dist = self._ts[:n], self._dist[:n]
        out._last_item = out._last_cat = None
        return out

    def to_arrays(self) -> GraphArrays:
        """Node features, neighbor index [N, 3] (-1 = none) and edge types [N, 3] (-1 = none).

        Cached until the next append: a replayed training sample is collated many times."""
        if self._arrays is not None:
            return self._arrays
        n = len(self)
        beh, ts, dist = self._columns()  # [N], [N], [N, 3]
        idx = np.arange(n, dtype=np.int64)[:, None]  # [N, 1]
        nbr = idx - dist  # [N, 3]
        valid = (dist > 0) & (nbr >= 0)
        nbr = np.where(valid, nbr, -1)
        src_beh = beh[np.where(valid, nbr, 0)]  # [N, 3]
        etype = np.arange(N_VIEWS)[None, :] * 16 + src_beh * 4 + beh[:, None]
        etype = np.where(valid, etype, -1)
        gaps = np.full(n, np.nan)
        gaps[1:] = np.diff(ts)
        self._arrays = GraphArrays(list(self._items), list(self._cats), beh, ts, gap_bucket(gaps), nbr, etype)
        return self._arrays

    # -- encoding ---------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """Versioned compact encoding: header, behaviors u8, ts f64, distances u16 [N,3], ids.

        One ``struct.pack`` of the whole body: on graphs of tens of nodes this is several times
        cheaper than building numpy arrays, and it is on the hot path (every sample, every write).
        """
        n = len(self)
        ids = "\n".join(self._items + self._cats).encode()
        return b"".join((
            _HEADER.pack(ENCODING_VERSION, n, self.total),
            struct.pack(f"<H{n}B{n}d{3 * n}H", self.max_len, *self._beh, *self._ts, *chain.from_iterable(self._dist)),
            ids,
        ))

    @classmethod
    def from_bytes(cls, data: bytes | memoryview) -> "UserGraph":
        data = bytes(data)
        if len(data) < _HEADER.size + 2:
            raise ValueError("graph encoding is truncated")
        version, n, total = _HEADER.unpack_from(data, 0)
        if version != ENCODING_VERSION:
            raise ValueError(f"graph encoding version {version} is not supported (expected {ENCODING_VERSION})")
        body = struct.Struct(f"<H{n}B{n}d{3 * n}H")
        if len(data) < _HEADER.size + body.size:
            raise ValueError("graph encoding is truncated")
        (max_len,) = struct.unpack_from("<H", data, _HEADER.size)
        g = cls(max_len)
        g._raw = (data, n)  # behaviors, times, distances: unpacked on first use
        off = _HEADER.size + body.size
        ids = data[off:].decode().split("\n") if n else []
        if len(ids) != 2 * n:
            raise ValueError("graph encoding is corrupt: id count mismatch")
        g._items, g._cats = ids[:n], ids[n:]
        g.total = total
        g._last_item = g._last_cat = None  # rebuilt on the next append
        return g

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, UserGraph):
            return NotImplemented
        return self.to_bytes() == other.to_bytes()

    def __repr__(self) -> str:
        return f"UserGraph(n={len(self)}, total={self.total}, max_len={self.max_len})"


def build_graph(events: Iterable[Event], max_len: int = MAX_LEN) -> UserGraph:
    """From scratch: the graph of one user's events, in the order given."""
    g = UserGraph(max_len)
    for ev in events:
        g.append_event(ev)
    return g


def reference_neighbors(items: Sequence[str], cats: Sequence[str]) -> list[tuple[int, int, int]]:
    """Quadratic, obviously-correct predecessor search over a whole window (for tests)."""
    out = []
    for j in range(len(items)):
        it = next((i for i in range(j - 1, -1, -1) if items[i] == items[j]), -1)
        ct = next((i for i in range(j - 1, -1, -1) if cats[i] == cats[j] and items[i] != items[j]), -1)
        out.append((it, ct, j - 1))
    return out



def arrays_of(graphs: Sequence["UserGraph"]) -> list[GraphArrays]:
    """``[g.to_arrays() for g in graphs]``, the graphs not cached yet computed together: one set
    of numpy operations over their concatenated nodes instead of one per graph (a trainer step
    collates hundreds of new graphs; per graph, numpy's call overhead was most of the cost).
    Element for element the same arithmetic as :meth:`UserGraph.to_arrays`."""
    todo = list({id(g): g for g in graphs if g._arrays is None and len(g)}.values())
    if len(todo) > 1:
        # graphs with their columns as lists first, then the decoded ones not unpacked (the
        # trainer's case), read straight from their encodings: never unpacked here
        todo.sort(key=lambda g: g._raw is not None)
        lists, encoded = [g for g in todo if g._raw is None], [g for g in todo if g._raw is not None]
        lens = np.fromiter((len(g) for g in todo), dtype=np.int64, count=len(todo))  # [G]
        total = int(lens.sum())
        starts = np.cumsum(lens) - lens  # [G] first node of each graph in the concatenation
        n_list = sum(len(g) for g in lists)
        cols = [(np.fromiter(chain.from_iterable(g._beh for g in lists), dtype=np.int64, count=n_list),  # [L]
                 np.fromiter(chain.from_iterable(g._ts for g in lists), dtype=np.float64, count=n_list),  # [L]
                 np.fromiter(chain.from_iterable(chain.from_iterable(g._dist for g in lists)), dtype=np.int64,
                             count=3 * n_list).reshape(n_list, 3))] + [g._columns() for g in encoded]  # [L, 3]
        beh = np.concatenate([c[0] for c in cols])  # [T]
        ts = np.concatenate([c[1] for c in cols])  # [T]
        dist = np.concatenate([c[2] for c in cols])  # [T, 3]
        first = np.repeat(starts, lens)  # [T] each node's graph start
        local = (np.arange(total, dtype=np.int64) - first)[:, None]  # [T, 1] index within its graph
        nbr = local - dist  # [T, 3]
        valid = (dist > 0) & (nbr >= 0)
        nbr = np.where(valid, nbr, -1)
        src_beh = beh[np.where(valid, nbr + first[:, None], 0)]  # [T, 3]
        etype = np.where(valid, np.arange(N_VIEWS)[None, :] * 16 + src_beh * 4 + beh[:, None], -1)
        gaps = np.empty(total)
        gaps[1:] = np.diff(ts)
        gaps[starts] = np.nan  # a graph's first node has no previous event
        buckets = gap_bucket(gaps)
        for g, a, b in zip(todo, starts.tolist(), (starts + lens).tolist()):
            g._arrays = GraphArrays(list(g._items), list(g._cats), beh[a:b], ts[a:b], buckets[a:b], nbr[a:b],
                                    etype[a:b])
    return [g.to_arrays() for g in graphs]
