"""The worker's hot path on real RocksDB: offline equality, exactly-once, DLQ, watermarks, poison."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

import pytest

from tgastream.state.record import UserRecord
from tgastream.state.samples import Sample
from tgastream.state.store import StateStore
from tgastream.core.events import WATERMARK_KEY, Event, watermark_value
from tgastream.stream.processor import Processor, ProcessorConfig
from tgastream.stream.synth import SynthConfig, generate
from tests.stream_reference import comparable, offline_records, offline_sample_counter, sample_identity

DAY = 86400.0


@dataclass
class Rec:
    offset: int
    key: bytes | None
    value: bytes | None


@dataclass
class ListSink:
    samples: list[tuple[int, bytes, bytes]] = field(default_factory=list)
    rejects: list[tuple[int, bytes | None, bytes, dict]] = field(default_factory=list)

    def sample(self, partition, key, value):
        self.samples.append((partition, key, value))

    def reject(self, partition, key, value, headers):
        self.rejects.append((partition, key, value, {k: v.decode() for k, v in headers}))

    def sample_counter(self) -> Counter:
        return Counter(sample_identity(Sample.from_bytes(v)) for _, _, v in self.samples)


def synth_events(users=40, events=3000, seed=3) -> list[Event]:
    rows = generate(SynthConfig(users=users, events=events, seed=seed, days=3))
    beh = ("click", "fav", "cart", "buy")
    return [Event(str(u), str(i), str(c), beh[b], float(ts)) for ts, u, i, c, b in rows]


def to_partitions(events: list[Event], n: int = 2) -> dict[int, list[Rec]]:
    """Events keyed by user id, spread over ``n`` partitions by user, offsets per partition."""
    parts: dict[int, list[Rec]] = {p: [] for p in range(n)}
    for ev in events:
        p = int(ev.user_id) % n
        parts[p].append(Rec(len(parts[p]), ev.user_id.encode(), ev.to_json()))
    return parts


def add_watermark(parts: dict[int, list[Rec]], ts: float) -> None:
    for recs in parts.values():
        recs.append(Rec(len(recs), WATERMARK_KEY, watermark_value(ts)))


def run(processor: Processor, parts: dict[int, list[Rec]], batch: int, persist_every: int = 1) -> None:
    """Feed every partition in batches, persisting like the pipeline does."""
    longest = max(len(r) for r in parts.values())
    for k, i in enumerate(range(0, longest, batch)):
        for p, recs in parts.items():
            if recs[i:i + batch]:
                processor.process(p, recs[i:i + batch], arrival_ts=1.0)
        if k % persist_every == 0:
            persist(processor)
    persist(processor)


def persist(processor: Processor) -> None:
    snap = processor.snapshot()
    for p, puts in snap.puts.items():
        processor.store.partition(p).write(puts)
    processor.persisted(snap)


def all_records(processor: Processor, users) -> dict[str, UserRecord]:
    return {u: processor.record(int(u) % 2, u) for u in users}


@pytest.fixture
def store(tmp_path):
    s = StateStore(tmp_path / "state", "user-state")
    yield s
    s.close()


def test_state_and_samples_equal_the_offline_build(store):
    events = synth_events()
    mark = max(e.ts for e in events) + DAY
    parts = to_partitions(events)
    add_watermark(parts, mark)
    sink = ListSink()
    proc = Processor(store, ProcessorConfig(), sink)
    run(proc, parts, batch=250, persist_every=3)
    want = offline_records(events, final_watermark=mark)
    got = all_records(proc, want)
    assert {u: comparable(r) for u, r in got.items()} == {u: comparable(r) for u, r in want.items()}
    assert sink.sample_counter() == offline_sample_counter(events, mark)
    assert sink.rejects == [] and sum(proc.pending_windows().values()) == 0
    # what is in RocksDB is what the processor holds
    fresh = Processor(store, ProcessorConfig(), ListSink())
    assert {u: comparable(fresh.record(int(u) % 2, u)) for u in want} == {u: comparable(r) for u, r in want.items()}


def test_every_emitted_sample_has_a_distinct_identity_from_its_source_record(store):
    events = synth_events(users=20, events=1500, seed=9)
    parts = to_partitions(events)
    add_watermark(parts, max(e.ts for e in events) + DAY)
    sink = ListSink()
    run(Processor(store, ProcessorConfig(), sink), parts, batch=200)
    samples = [(p, Sample.from_bytes(v)) for p, _, v in sink.samples]
    assert all(s.partition == p and s.offset >= 0 for p, s in samples)
    ids = [(s.partition, s.offset, s.seq) for _, s in samples]
    assert len(set(ids)) == len(ids)
    watermark_negatives = [s for p, s in samples if s.offset == len(parts[p]) - 1]
    assert watermark_negatives and all(s.label == 0.0 for s in watermark_negatives)


def test_redelivered_records_change_nothing_and_emit_nothing(store):
    events = synth_events(users=20, events=1500, seed=5)
    parts = to_partitions(events)
    first = Processor(store, ProcessorConfig(), ListSink())
    half = {p: recs[: len(recs) // 2] for p, recs in parts.items()}
    run(first, half, batch=100)
    # a restart re-reads from an older committed offset: the first half arrives again, then the rest
    sink = ListSink()
    second = Processor(store, ProcessorConfig(), sink)
    redelivery = {p: recs[len(recs) // 4:] for p, recs in parts.items()}
    stats = [second.process(p, recs, 1.0) for p, recs in redelivery.items()]
    persist(second)
    skipped = sum(s.skipped for s in stats)
    assert skipped == sum(len(h) - len(r) // 4 for h, r in zip(half.values(), parts.values()))
    want = offline_records(events)
    assert {u: comparable(second.record(int(u) % 2, u)) for u in want} == {u: comparable(r) for u, r in want.items()}
    # samples only for the events not applied before: all of them minus those of the first halves
    first_events = [ev for ev in events if any(Rec(0, b"", ev.to_json()).value == r.value for r in ())]
    applied_before = [json.loads(r.value) for recs in half.values() for r in recs]
    before = [Event(str(d["user_id"]), str(d["item_id"]), str(d["category_id"]), d["behavior"], float(d["ts"]))
              for d in applied_before]
    assert sink.sample_counter() == offline_sample_counter(events, None) - offline_sample_counter(before, None)
    assert not first_events
    # every state records the offset of its user's last event in its partition
    last = {}
    for p, recs in parts.items():
        for r in recs:
            last[r.key.decode()] = r.offset
    assert all(second.record(int(u) % 2, u).offset == last[u] for u in want)


BAD = [
    (b"u1", None, "empty_record"),  # tombstone
    (b"u1", b"", "empty_record"),
    (b"u1", b"\xff\xfe\x00garbage", "not_utf8"),
    (b"u1", b"{" * 5000, "oversize"),
    (b"u1", b"not json at all", "not_json"),
    (b"u1", b"[1,2]", "not_object"),
    (b"u1", b'{"user_id":"u1","item_id":"i","category_id":"c","behavior":"like","ts":5}', "unknown_behavior"),
    (b"\xd8\x00", b'{"user_id":"\\ud800","item_id":"i","category_id":"c","behavior":"pv","ts":5}', "not_utf8"),
    (None, b'{"user_id":"u1","item_id":"i","category_id":"c","behavior":"pv","ts":5}', "wrong_key"),
    (b"u2", b'{"user_id":"u1","item_id":"i","category_id":"c","behavior":"pv","ts":5}', "wrong_key"),
    (WATERMARK_KEY, b'{"watermark":"soon"}', "bad_timestamp"),
    (WATERMARK_KEY, b"\x00", "bad_timestamp"),
]


def test_bad_records_go_to_the_dlq_with_their_bytes_and_reason_and_stop_nothing(store):
    good = [Event("u1", f"i{k}", "c", "click", 100.0 + k) for k in range(4)]
    recs, offset = [], 0
    for k, (key, value, _) in enumerate(BAD):
        recs.append(Rec(offset, key, value))
        offset += 1
        if k % 4 == 0:
            ev = good[k // 4]
            recs.append(Rec(offset, b"u1", ev.to_json()))
            offset += 1
    sink = ListSink()
    proc = Processor(store, ProcessorConfig(topic="ev"), sink)
    stats = proc.process(0, recs, 1.0)
    assert [(r[1], r[2], r[3]["reason"]) for r in sink.rejects] == [(k, v or b"", reason) for k, v, reason in BAD]
    assert all(r[3]["source"].startswith("ev:0:") and r[3]["detail"] for r in sink.rejects)
    assert stats.events == 3 and stats.rejected.total() == len(BAD)
    assert comparable(proc.record(0, "u1")) == comparable(offline_records(good[:3])["u1"])


class ExplodingRecord(UserRecord):
    """A user record whose apply half-runs, then raises, for item "BOOM" (stands for a bug)."""

    def apply(self, ev, offset, window_s, sample_len, arrival_ts=0.0, generation=0):
        samples = super().apply(ev, offset, window_s, sample_len, arrival_ts, generation)
        if ev.item_id == "BOOM":
            raise RuntimeError("simulated bug")
        return samples


class ExplodingProcessor(Processor):
    def _load(self, partition, uid):
        user = super()._load(partition, uid)
        if type(user) is UserRecord:
            user.__class__ = ExplodingRecord
        return user


def test_an_event_that_raises_is_rejected_and_the_user_is_rebuilt_without_it(store):
    events = [Event("7", f"i{k % 3}", "c", ("click", "cart", "buy")[k % 3], 1000.0 + k) for k in range(12)]
    boom = Event("7", "BOOM", "c", "click", 1005.5)
    recs = [Rec(k, b"7", ev.to_json()) for k, ev in enumerate(events[:6])]
    recs.append(Rec(6, b"7", boom.to_json()))
    recs += [Rec(7 + k, b"7", ev.to_json()) for k, ev in enumerate(events[6:])]
    sink = ListSink()
    proc = ExplodingProcessor(store, ProcessorConfig(), sink)
    proc.process(1, recs[:4], 1.0)
    persist(proc)  # part of the user's history is in RocksDB, part only in memory
    stats = proc.process(1, recs[4:], 1.0)
    assert stats.rejected == Counter({"internal_error": 1}) and stats.events == 11 - 3
    assert json.loads(sink.rejects[0][2])["item_id"] == "BOOM"
    assert "simulated bug" in sink.rejects[0][3]["detail"]
    assert comparable(proc.record(1, "7")) == comparable(offline_records(events)["7"])
    assert proc.record(1, "7").offset == 12


def test_watermark_closes_windows_and_the_pending_index_is_rebuilt_from_rocksdb(store):
    clicks = [Event(str(u), f"i{u}", "c", "click", 50.0 * u) for u in range(10)]
    parts = to_partitions(clicks)
    proc = Processor(store, ProcessorConfig(), ListSink())
    run(proc, parts, batch=100)
    assert sum(proc.pending_windows().values()) == 10
    sink = ListSink()
    restarted = Processor(store, ProcessorConfig(), sink)  # knows nothing but what RocksDB holds
    wm = {p: [Rec(len(recs), WATERMARK_KEY, watermark_value(50.0 * 5 + DAY))] for p, recs in parts.items()}
    for p, recs in wm.items():
        restarted.process(p, recs, 1.0)
    closed = sorted(Sample.from_bytes(v).item_id for _, _, v in sink.samples)
    assert closed == [f"i{u}" for u in range(6)]  # windows that ended at or before the watermark
    assert sum(restarted.pending_windows().values()) == 4


def test_a_small_cache_evicts_only_persisted_users(store):
    events = synth_events(users=60, events=2000, seed=9)
    parts = to_partitions(events)
    sink = ListSink()
    proc = Processor(store, ProcessorConfig(max_cached_users=7), sink)
    run(proc, parts, batch=60, persist_every=2)
    assert proc.cached_users <= 7  # evicted down to the bound at every persist
    want = offline_records(events)
    assert {u: comparable(proc.record(int(u) % 2, u)) for u in want} == {u: comparable(r) for u, r in want.items()}
    assert sink.sample_counter() == offline_sample_counter(events, None)


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=5), kids, max_size=3),
                           max_leaves=8)
field_values = st.one_of(st.integers(-5, 10**6), st.text(max_size=140), st.floats(), st.none(), json_values)
events_like = st.fixed_dictionaries({}, optional={k: field_values for k in ("user_id", "item_id", "category_id", "ts")}
                                    | {"behavior": st.sampled_from(["pv", "buy", "cart", "fav", "x", ""]) | field_values})
values = st.one_of(st.none(), st.binary(max_size=300), events_like.map(lambda d: json.dumps(d).encode()),
                   json_values.map(lambda v: json.dumps(v).encode()))
keys = st.one_of(st.none(), st.binary(max_size=20), st.just(WATERMARK_KEY), st.sampled_from([b"1", b"u", b"0"]))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(keys, values), min_size=1, max_size=25))
def test_no_record_whatever_its_bytes_raises_and_each_is_accounted_for(store, pairs):
    sink = ListSink()
    proc = Processor(store, ProcessorConfig(), sink)
    base = proc.last_processed().get(0, -1) + 1
    stats = proc.process(0, [Rec(base + k, key, value) for k, (key, value) in enumerate(pairs)], 1.0)
    assert stats.events + stats.skipped + stats.watermarks + stats.rejected.total() == len(pairs)
    assert len(sink.rejects) == stats.rejected.total()
    persist(proc)  # and everything it holds encodes
