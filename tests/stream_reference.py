"""Offline references for stream tests: what a worker must end up with for a given event log."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from tgastream.state.record import UserRecord
from tgastream.state.samples import Sample, samples_from_events
from tgastream.state.store import StateStore
from tgastream.core.events import Event, read_log
from tgastream.core.settings import CONVERSION_WINDOW_S, MAX_LEN, SAMPLE_LEN
from tgastream.stream.replay import _ordered


def replay_order(path: Path) -> list[Event]:
    """Valid events of a log in the order ``replay_file(order="time")`` sends them."""
    return [r for r in _ordered(read_log(path), "time") if isinstance(r, Event)]


def offline_records(events: list[Event], max_len: int = MAX_LEN, sample_len: int = SAMPLE_LEN,
                    window_s: float = CONVERSION_WINDOW_S,
                    final_watermark: float | None = None) -> dict[str, UserRecord]:
    """Every user's record built from scratch (each user's events in the order given)."""
    users: dict[str, UserRecord] = {}
    for ev in events:
        rec = users.get(ev.user_id)
        if rec is None:
            rec = users[ev.user_id] = UserRecord.new(ev.user_id, max_len)
        rec.apply(ev, None, window_s, sample_len)
    if final_watermark is not None:
        for rec in users.values():
            rec.expire(final_watermark, window_s, sample_len)
    return users


def comparable(rec: UserRecord) -> tuple:
    """Everything of a record but the source offset (which an offline build does not have)."""
    pending = [(p.item_id, p.category_id, p.click_ts, p.seq) for p in rec.state.pending.values()]
    return rec.state.user_id, rec.state.graph.to_bytes(), pending, rec.features.to_bytes()


def sample_identity(s: Sample) -> tuple:
    """A sample without its arrival time (wall clock): equal across runs of the same events."""
    return s.kind, s.user_id, s.item_id, s.category_id, s.behavior, s.label, s.event_ts, s.graph.to_bytes()


def offline_sample_counter(events: list[Event], final_watermark: float | None, window_s: float = 86400.0) -> Counter:
    return Counter(sample_identity(s) for s in samples_from_events(events, window_s=window_s,
                                                                   final_watermark=final_watermark))


def read_store(root: Path, name: str = "user-state") -> dict[str, tuple[int, UserRecord]]:
    """user → (partition, record) of every partition database under ``root``."""
    out: dict[str, tuple[int, UserRecord]] = {}
    store = StateStore(root, name)
    try:
        for db_path in sorted(root.glob(f"{name}-*.db")):
            partition = int(db_path.name[len(name) + 1:-3])
            for key, value in store.partition(partition).items():
                assert key.decode() not in out, f"user {key!r} stored in two partitions"
                out[key.decode()] = (partition, UserRecord.from_bytes(value))
    finally:
        store.close()
    return out
