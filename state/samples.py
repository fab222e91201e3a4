"""Training samples and the per-user state machine that emits them (DESIGN.md §3).

:class:`UserState` is everything kept for one user: the transition graph, the open conversion
windows (pending labels) and the source offset of the last event applied. ``apply`` is the one
place where an event changes a user's state, used by the stream worker and by offline tools alike,
so an offline build from a log and the live stream give the same samples and byte-identical state.

Samples:

- retrieval: for every event that has history, the graph *before* it (last ``sample_len`` nodes)
  → the event's item, category and behavior;
- conversion: a click on item i opens a window of ``window_s`` event time (one open window per
  item: repeat clicks on it do not open another). A buy of i inside the window closes it with
  label 1; event time passing its end (the user's own later events or a partition watermark)
  closes it with label 0. The context is the graph up to and including the click.
- click: when a window opens, a sample of kind CLICK with the same context, candidate and click
  time as the conversion sample that will close it, label 0 (unknown yet). It carries the click
  to the trainer *at click time*: the model serving then predicts P(buy) for it, and the
  conversion sample later only brings the label (model/clicktime.py); with a delayed-feedback
  mode it is also trained at once as a fake negative (model/feedback.py). Its identity is its
  own (the click's record, after the event's other samples), distinct from the conversion
  sample's (the buy's record or the closing watermark's).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Iterable

from tgastream.state.graph import UserGraph
from tgastream.core.events import BEHAVIOR_CODE, Event
from tgastream.core.settings import CONVERSION_WINDOW_S, MAX_LEN, SAMPLE_LEN

RETRIEVAL, CONVERSION, CLICK = 0, 1, 2
SAMPLE_VERSION = 2  # 2: + source identity (generation, partition, offset, seq); 1 is still read
STATE_VERSION = 2  # 2: + the source generation after the header of 1 (which is still read)
_SAMPLE_HEADER = struct.Struct("<BBBfdd")  # version, kind, target behavior, label, event ts, arrival ts
_SOURCE = struct.Struct("<IiqI")  # generation, source partition, source offset, seq (version 2 on)
_STATE_HEADER = struct.Struct("<BqI")  # version, last offset, pending count
_GENERATION = struct.Struct("<I")  # source generation (version 2 on), right after the header
_PENDING = struct.Struct("<dQ")  # click ts, click seq


def _pack_str(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<H", len(b)) + b


def _unpack_str(data: bytes, off: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<H", data, off)
    return data[off + 2: off + 2 + n].decode(), off + 2 + n


@dataclass
class Sample:
    """One training example: a context graph and a target (item, behavior) or conversion label."""

    kind: int  # RETRIEVAL, CONVERSION or CLICK
    user_id: str
    graph: UserGraph  # context, oldest node first
    item_id: str  # target item (retrieval) or candidate item (conversion)
    category_id: str
    behavior: int  # target behavior code (conversion: the click, 0)
    label: float  # conversion: 1 bought / 0 not; retrieval: 1
    event_ts: float  # event time of the target event (conversion: of the click)
    arrival_ts: float = 0.0  # wall-clock time the triggering event reached the worker (freshness)
    # identity: the source record that produced it (``offset`` -1: none, e.g. an offline sample),
    # and its place among that record's samples; equal for a re-delivered copy of the same sample
    generation: int = 0  # of the source topic (0 until re-created topics are told apart)
    partition: int = -1
    offset: int = -1
    seq: int = 0

    @property
    def click_key(self) -> tuple[str, str, float]:
        """The click a CLICK or CONVERSION sample is about: (user, item, click time). One open
        window per (user, item), so a label and its click-time prediction meet on this key."""
        return self.user_id, self.item_id, self.event_ts

    @property
    def source(self) -> tuple[int, int]:
        """The stream the identity is ordered in: (generation, source partition)."""
        return self.generation, self.partition

    def to_bytes(self) -> bytes:
        return b"".join((
            _SAMPLE_HEADER.pack(SAMPLE_VERSION, self.kind, self.behavior, self.label, self.event_ts, self.arrival_ts),
            _SOURCE.pack(self.generation, self.partition, self.offset, self.seq),
            _pack_str(self.user_id), _pack_str(self.item_id), _pack_str(self.category_id),
            self.graph.to_bytes(),
        ))

    @classmethod
    def from_bytes(cls, data: bytes) -> "Sample":
        data = bytes(data)
        version, kind, behavior, label, event_ts, arrival_ts = _SAMPLE_HEADER.unpack_from(data, 0)
        if version not in (1, SAMPLE_VERSION):
            raise ValueError(f"sample encoding version {version} is not supported")
        off = _SAMPLE_HEADER.size
        source = (0, -1, -1, 0)
        if version >= 2:
            source = _SOURCE.unpack_from(data, off)
            off += _SOURCE.size
        user, off = _unpack_str(data, off)
        item, off = _unpack_str(data, off)
        cat, off = _unpack_str(data, off)
        return cls(kind, user, UserGraph.from_bytes(data[off:]), item, cat, behavior, label, event_ts, arrival_ts,
                   *source)


class RedeliveryGuard:
    """Which samples were trained already, by their identity: the trainer's twin of the worker's
    per-user offset guard. A source partition's samples reach the trainer in the order they were
    made, and a worker that re-processes records after a failover re-emits their samples with the
    same (offset, seq): one at or below the highest seen of its source is a re-delivery."""

    def __init__(self, seen: dict[tuple[int, int], tuple[int, int]] | None = None) -> None:
        self.seen: dict[tuple[int, int], tuple[int, int]] = dict(seen or {})

    def admit(self, sample: Sample) -> bool:
        """True for a new sample (and remember it); False for a re-delivered one. Samples without
        an identity (offset -1) are always new."""
        if sample.offset < 0:
            return True
        key, mark = sample.source, (sample.offset, sample.seq)
        last = self.seen.get(key)
        if last is not None and mark <= last:
            return False
        self.seen[key] = mark
        return True

    def state_dict(self) -> dict:
        return {"seen": [[g, p, o, s] for (g, p), (o, s) in self.seen.items()]}

    @classmethod
    def from_state_dict(cls, d: dict) -> "RedeliveryGuard":
        return cls({(g, p): (o, s) for g, p, o, s in d.get("seen", [])})


@dataclass
class Pending:
    """An open conversion window: the click and its node's global sequence number in the graph."""

    item_id: str
    category_id: str
    click_ts: float
    seq: int


@dataclass
class UserState:
    """A user's graph, open conversion windows and where the last event applied came from: the
    source generation (the events topic's incarnation) and offset. Offsets order events only
    within one generation: a re-created topic starts again at 0 and its events are all new."""

    user_id: str
    graph: UserGraph
    pending: dict[str, Pending] = field(default_factory=dict)  # item → window, in click order
    offset: int = -1
    generation: int = 0

    def holds(self, generation: int, offset: int) -> bool:
        """Whether the event at (generation, offset) is already applied (a re-delivery)."""
        return generation == self.generation and offset <= self.offset

    @classmethod
    def new(cls, user_id: str, max_len: int) -> "UserState":
        return cls(user_id, UserGraph(max_len))

    def _context_at(self, seq: int, sample_len: int) -> UserGraph:
        """The last ``sample_len`` nodes up to and including global sequence ``seq``."""
        g = self.graph
        end = seq - g.start + 1  # nodes [0, end) of the window
        if end <= 0:
            return UserGraph(sample_len)  # the click left the window: no context survives
        return g.head(end).tail(sample_len)

    def expire(self, now_ts: float, window_s: float, sample_len: int, arrival_ts: float = 0.0) -> list[Sample]:
        """Close (label 0) every window whose end is at or before event time ``now_ts``."""
        out: list[Sample] = []
        if not self.pending:  # the common case, on every event: no copy, no loop
            return out
        for item, p in list(self.pending.items()):
            if p.click_ts + window_s <= now_ts:
                del self.pending[item]
                out.append(Sample(CONVERSION, self.user_id, self._context_at(p.seq, sample_len), item,
                                  p.category_id, 0, 0.0, p.click_ts, arrival_ts))
        return out

    def apply(self, ev: Event, offset: int | None, window_s: float, sample_len: int,
              arrival_ts: float = 0.0, generation: int = 0) -> list[Sample]:
        """Apply one event; returns the samples it produces. An offset at or below the last applied
        one of the same generation is a re-delivery and changes nothing (exactly-once state on an
        at-least-once stream)."""
        if offset is not None and self.holds(generation, offset):
            return []
        out = self.expire(ev.ts, window_s, sample_len, arrival_ts)
        beh = BEHAVIOR_CODE[ev.behavior]
        if len(self.graph):
            out.append(Sample(RETRIEVAL, self.user_id, self.graph.tail(sample_len), ev.item_id, ev.category_id,
                              beh, 1.0, ev.ts, arrival_ts))
        if ev.behavior == "buy":
            p = self.pending.pop(ev.item_id, None)
            if p is not None:
                out.append(Sample(CONVERSION, self.user_id, self._context_at(p.seq, sample_len), ev.item_id,
                                  p.category_id, 0, 1.0, p.click_ts, arrival_ts))
        self.graph.append(ev.item_id, ev.category_id, beh, ev.ts)
        if ev.behavior == "click" and ev.item_id not in self.pending:
            self.pending[ev.item_id] = Pending(ev.item_id, ev.category_id, ev.ts, self.graph.total - 1)
            out.append(Sample(CLICK, self.user_id, self.graph.tail(sample_len), ev.item_id, ev.category_id, 0, 0.0,
                              ev.ts, arrival_ts))
        if offset is not None:
            self.offset, self.generation = offset, generation
        return out

    def to_bytes(self) -> bytes:
        """Versioned encoding: header (offset, pending count), generation, pending windows, graph."""
        parts = [_STATE_HEADER.pack(STATE_VERSION, self.offset, len(self.pending)), _GENERATION.pack(self.generation),
                 _pack_str(self.user_id)]
        for p in self.pending.values():
            parts += [_PENDING.pack(p.click_ts, p.seq), _pack_str(p.item_id), _pack_str(p.category_id)]
        parts.append(self.graph.to_bytes())
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, data: bytes) -> "UserState":
        data = bytes(data)
        version, offset, n = _STATE_HEADER.unpack_from(data, 0)
        if version not in (1, STATE_VERSION):
            raise ValueError(f"user state encoding version {version} is not supported")
        off = _STATE_HEADER.size
        generation = 0
        if version >= 2:
            (generation,) = _GENERATION.unpack_from(data, off)
            off += _GENERATION.size
        user, off = _unpack_str(data, off)
        pending: dict[str, Pending] = {}
        for _ in range(n):
            click_ts, seq = _PENDING.unpack_from(data, off)
            off += _PENDING.size
            item, off = _unpack_str(data, off)
            cat, off = _unpack_str(data, off)
            pending[item] = Pending(item, cat, click_ts, seq)
        return cls(user, UserGraph.from_bytes(data[off:]), pending, offset, generation)


def samples_from_events(events: Iterable[Event], max_len: int = MAX_LEN, sample_len: int = SAMPLE_LEN,
                        window_s: float = CONVERSION_WINDOW_S, final_watermark: float | None = None) -> list[Sample]:
    """Offline: every sample a worker would emit for these events (each user's in the order given),
    then, with ``final_watermark``, the negatives of windows still open at that event time."""
    states: dict[str, UserState] = {}
    out: list[Sample] = []
    for ev in events:
        st = states.get(ev.user_id)
        if st is None:
            st = states[ev.user_id] = UserState.new(ev.user_id, max_len)
        out.extend(st.apply(ev, None, window_s, sample_len))
    if final_watermark is not None:
        for st in states.values():
            out.extend(st.expire(final_watermark, window_s, sample_len))
    return out
