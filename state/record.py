"""The stored value of one user: state machine (graph, pending labels, offset) + features.

One value per user, so the source offset inside :class:`~state.samples.UserState` (the
exactly-once guard, DESIGN.md §7) is written atomically with everything it guards, in RocksDB and
on the changelog alike. Layout (versioned, no pickle)::

    u8 version | u32 len(state) | UserState bytes | UserFeatures bytes

:func:`peek_pending` and :func:`peek_offset` read the state header without decoding the graph (the
worker scans a partition with them to find users with open conversion windows).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from tgastream.state.features import UserFeatures
from tgastream.state.samples import CONVERSION, Sample, UserState
from tgastream.core.events import BEHAVIOR_CODE, Event

RECORD_VERSION = 1
_HEADER = struct.Struct("<BI")
_STATE_HEADER = struct.Struct("<BqI")  # mirrors state.samples: version, last offset, pending count
_GENERATION = struct.Struct("<I")  # mirrors state.samples: source generation, from state version 2


@dataclass
class UserRecord:
    """Everything kept for one user."""

    state: UserState
    features: UserFeatures = field(default_factory=UserFeatures)

    @classmethod
    def new(cls, user_id: str, max_len: int) -> "UserRecord":
        return cls(UserState.new(user_id, max_len))

    @property
    def offset(self) -> int:
        return self.state.offset

    def apply(self, ev: Event, offset: int | None, window_s: float, sample_len: int,
              arrival_ts: float = 0.0, generation: int = 0) -> list[Sample]:
        """Apply one event to the state and features; the samples it produced (none if re-delivered)."""
        if offset is not None and self.state.holds(generation, offset):
            return []
        samples = self.state.apply(ev, offset, window_s, sample_len, arrival_ts, generation)
        self.features.observe(ev.category_id, BEHAVIOR_CODE[ev.behavior], ev.ts)
        self.observe_samples(samples)
        return samples

    def expire(self, now_ts: float, window_s: float, sample_len: int, arrival_ts: float = 0.0) -> list[Sample]:
        """Close windows ending at or before ``now_ts`` (a watermark); the negatives produced."""
        samples = self.state.expire(now_ts, window_s, sample_len, arrival_ts)
        self.observe_samples(samples)
        return samples

    def observe_samples(self, samples: list[Sample]) -> None:
        for s in samples:
            if s.kind == CONVERSION:
                self.features.observe_label(s.label)

    def to_bytes(self) -> bytes:
        state = self.state.to_bytes()
        return b"".join((_HEADER.pack(RECORD_VERSION, len(state)), state, self.features.to_bytes()))

    @classmethod
    def from_bytes(cls, data: bytes | memoryview) -> "UserRecord":
        data = bytes(data)
        version, n = _HEADER.unpack_from(data, 0)
        if version != RECORD_VERSION:
            raise ValueError(f"user record version {version} is not supported")
        start = _HEADER.size
        state = UserState.from_bytes(data[start: start + n])
        return cls(state, UserFeatures.from_bytes(data[start + n:]))


def peek_offset(data: bytes) -> int:
    """Source offset of the last event applied, read from the header only."""
    return _STATE_HEADER.unpack_from(data, _HEADER.size)[1]


def peek_generation(data: bytes) -> int:
    """Source generation of the last event applied, read from the header only (0 before version 2)."""
    version = _STATE_HEADER.unpack_from(data, _HEADER.size)[0]
    return _GENERATION.unpack_from(data, _HEADER.size + _STATE_HEADER.size)[0] if version >= 2 else 0


def supersedes(incoming: bytes | None, current: bytes | None, generation: int | None = None) -> bool:
    """Whether a changelog value may replace the stored one: not when it is an older state.

    A user's state is a function of the events applied to it, and its offset says how far it got,
    so a state with a lower offset of the same source generation is an older one, e.g. an
    unacknowledged changelog write left by a worker that died mid-flush, read back after the new
    owner had gone further. Across generations, a state of the current ``generation`` (when known)
    is never replaced by one of another. Equal offsets (a watermark changes state without an event),
    other generations and deletions follow changelog order.
    """
    if incoming is None or current is None or not incoming or not current:
        return True
    g_in, g_cur = peek_generation(incoming), peek_generation(current)
    if g_in != g_cur:
        return not (generation is not None and g_cur == generation)
    return peek_offset(incoming) >= peek_offset(current)


def peek_pending(data: bytes) -> int:
    """Number of open conversion windows, read from the header only."""
    return _STATE_HEADER.unpack_from(data, _HEADER.size)[2]
