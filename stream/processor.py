"""The hot path of a stream worker: raw records of ``behavior-events`` → user state + samples.

Kafka-free and synchronous on purpose: the faust app (:mod:`stream.app`) feeds it whole fetched
batches of one partition, it writes samples and rejects into an :class:`OutputSink`, and the app
persists the users it changed (:meth:`Processor.snapshot`) on an interval. That split is what lets
the worker run below faust's one-await-per-event layer (DESIGN.md §7).

Per record, in partition order:

- the watermark control record (key ``__watermark__``) closes every open conversion window that
  ended at or before its event time (negative conversion samples);
- anything else is validated (:func:`tgastream.core.events.parse_json`); a bad record goes to the DLQ
  with its original bytes and a reason, and so does a record whose key is not its user id (the
  topic is keyed by user id: a user's state must live in one partition);
- a valid event is applied to the user's :class:`~state.record.UserRecord` unless its offset is
  at or below the offset stored in that record (a re-delivery after a crash or rebalance: exactly-
  once state on an at-least-once stream);
- should applying an event raise (a bug, not bad input: validation guarantees ids encode), the
  record goes to the DLQ as ``internal_error`` and the user is rebuilt from its last persisted
  value plus the events applied since, so neither the worker nor the user's state is harmed.

Users are cached decoded between batches (bounded; only persisted users are evicted), so a hot
user is decoded once, not once per event, and encoded once per persist interval, not per event.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol, Sequence

from tgastream.state.record import UserRecord, peek_pending
from tgastream.state.samples import CLICK, CONVERSION, Sample
from tgastream.state.store import StateStore
from tgastream.core.events import WATERMARK_KEY, Event, Rejection, parse_json, parse_watermark
from tgastream.core.settings import CONVERSION_WINDOW_S, MAX_LEN, SAMPLE_LEN
from tgastream.stream.replay import dlq_headers

log = logging.getLogger(__name__)


class InRecord(Protocol):
    """What the processor reads of a consumed record (an aiokafka ``ConsumerRecord`` fits)."""

    offset: int
    key: bytes | None
    value: bytes | None


class OutputSink(Protocol):
    """Where samples and rejects go (batched Kafka producer in the worker, lists in tests)."""

    def sample(self, partition: int, key: bytes, value: bytes) -> None: ...

    def reject(self, partition: int, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]]) -> None: ...


@dataclass(frozen=True)
class ProcessorConfig:
    max_len: int = MAX_LEN
    sample_len: int = SAMPLE_LEN
    window_s: float = CONVERSION_WINDOW_S
    max_cached_users: int = 200_000
    topic: str = "behavior-events"  # for the DLQ 'source' header


@dataclass
class BatchStats:
    """What one call of :meth:`Processor.process` did."""

    records: int = 0
    events: int = 0  # valid events applied
    skipped: int = 0  # re-delivered events (offset at or below the user's stored offset)
    watermarks: int = 0
    rejected: Counter = field(default_factory=Counter)  # reason → count
    samples: Counter = field(default_factory=Counter)  # retrieval / conversion_pos / conversion_neg / click
    sample_bytes: int = 0
    apply_s: float = 0.0


@dataclass
class Snapshot:
    """Encoded users changed since the last snapshot, and the source offsets they cover."""

    puts: dict[int, dict[bytes, bytes]]  # partition → user key → record bytes
    features: dict[int, dict[bytes, bytes]]  # partition → user key → feature record (JSON)
    offsets: dict[int, int]  # partition → last source offset processed before the snapshot
    cuts: dict[int, tuple[list, int]]  # partition → (replay log, its length at the snapshot)

    @property
    def users(self) -> int:
        return sum(len(p) for p in self.puts.values())


def _identify(samples: list[Sample], generation: int, partition: int, offset: int, first_seq: int = 0
              ) -> list[Sample]:
    """Stamp each sample with the source record that produced it (its identity, for the trainer)."""
    for k, s in enumerate(samples):
        s.generation, s.partition, s.offset, s.seq = generation, partition, offset, first_seq + k
    return samples


def sample_kind(s: Sample) -> str:
    if s.kind == CONVERSION:
        return "conversion_pos" if s.label > 0.5 else "conversion_neg"
    if s.kind == CLICK:
        return "click"
    return "retrieval"


class Processor:
    """Applies batches of raw records to per-user records held in a :class:`StateStore`."""

    def __init__(self, store: StateStore, config: ProcessorConfig, sink: OutputSink, generation: int = 0) -> None:
        self.store = store
        self.config = config
        self.sink = sink
        self.generation = generation  # of the source topic: offsets order events only within one
        self._cache: dict[int, dict[str, UserRecord]] = {}
        self._dirty: dict[int, dict[str, UserRecord]] = {}
        self._pending: dict[int, dict[str, int]] = {}  # partition → user → open windows
        self._pending_total: dict[int, int] = {}
        self._processed: dict[int, int] = {}  # partition → last offset processed
        self._log: dict[int, list[tuple[int, Event | float]]] = {}  # applied since last persist

    # -- queries ----------------------------------------------------------------------------

    @property
    def cached_users(self) -> int:
        return sum(len(c) for c in self._cache.values())

    @property
    def dirty_users(self) -> int:
        return sum(len(d) for d in self._dirty.values())

    def pending_windows(self) -> dict[int, int]:
        """Open conversion windows per partition (of the partitions seen since assignment)."""
        return dict(self._pending_total)

    def last_processed(self) -> dict[int, int]:
        return dict(self._processed)

    def record(self, partition: int, user_id: str) -> UserRecord | None:
        """The current (possibly not yet persisted) record of a user, or None."""
        return self._lookup(partition, user_id)

    # -- processing -------------------------------------------------------------------------

    def process(self, partition: int, records: Sequence[InRecord], arrival_ts: float | None = None) -> BatchStats:
        """Apply one partition's records, in offset order; samples and rejects go to the sink.

        ``arrival_ts`` (default: now) is stamped on the samples as the time their event reached
        the worker; validation always judges timestamps against the wall clock.
        """
        t0 = time.perf_counter()
        wall = time.time()
        now = wall if arrival_ts is None else arrival_ts
        stats = BatchStats(records=len(records))
        if partition not in self._pending:
            self._build_pending_index(partition)
        cache = self._cache.setdefault(partition, {})
        dirty = self._dirty.setdefault(partition, {})
        pending, applied = self._pending[partition], self._log.setdefault(partition, [])
        sink_sample = self.sink.sample
        cfg = self.config
        window_s, sample_len, generation = cfg.window_s, cfg.sample_len, self.generation
        for rec in records:
            key, value, offset = rec.key, rec.value, rec.offset
            if key == WATERMARK_KEY:
                self._watermark(partition, rec, now, stats)
                continue
            raw = value if value is not None else b""
            parsed = parse_json(raw, "", wall)
            if type(parsed) is Rejection:
                self._reject(partition, rec, parsed.reason, parsed.detail, stats)
                continue
            uid = parsed.user_id
            ukey = uid.encode()
            if key != ukey:
                self._reject(partition, rec, "wrong_key",
                             f"record key {key!r:.60} is not the user id {uid!r:.60}: behavior-events "
                             "must be keyed by user id so each user's events share a partition", stats)
                continue
            user = cache.get(uid) or self._load(partition, uid)
            if user.state.holds(generation, offset):
                stats.skipped += 1
                continue
            try:
                samples = user.apply(parsed, offset, window_s, sample_len, now, generation)
                encoded = [(s, s.to_bytes()) for s in _identify(samples, generation, partition, offset)]
            except Exception as exc:  # a bug, never bad input: keep the worker and the user sound
                self._poisoned(partition, uid, rec, exc, stats)
                continue
            applied.append((offset, parsed))
            for s, data in encoded:
                sink_sample(partition, ukey, data)
                stats.samples[sample_kind(s)] += 1
                stats.sample_bytes += len(data)
            stats.events += 1
            dirty[uid] = user
            n_open = len(user.state.pending)
            if n_open != pending.get(uid, 0):
                self._set_pending(partition, uid, n_open)
        if records:
            self._processed[partition] = records[-1].offset
        stats.apply_s = time.perf_counter() - t0
        return stats

    def _lookup(self, partition: int, uid: str) -> UserRecord | None:
        cache = self._cache.setdefault(partition, {})
        user = cache.get(uid)
        if user is None:
            raw = self.store.partition(partition).get(uid.encode())
            if raw is not None:
                user = cache[uid] = UserRecord.from_bytes(raw)
        return user

    def _load(self, partition: int, uid: str) -> UserRecord:
        user = self._lookup(partition, uid)
        if user is None:
            user = self._cache[partition][uid] = UserRecord.new(uid, self.config.max_len)
        return user

    def _set_pending(self, partition: int, uid: str, n_open: int) -> None:
        pending = self._pending[partition]
        before = pending.pop(uid, 0)
        if n_open:
            pending[uid] = n_open
        self._pending_total[partition] = self._pending_total.get(partition, 0) + n_open - before

    def _build_pending_index(self, partition: int) -> None:
        """Users with open windows in a partition, from the store (headers only, no decoding)."""
        index: dict[str, int] = {}
        for key, value in self.store.partition(partition).items():
            n = peek_pending(value)
            if n:
                index[key.decode()] = n
        self._pending[partition] = index
        self._pending_total[partition] = sum(index.values())

    def _watermark(self, partition: int, rec: InRecord, now: float, stats: BatchStats) -> None:
        ts = parse_watermark(rec.value or b"")
        if ts is None:
            self._reject(partition, rec, "bad_timestamp", "watermark record without a finite 'watermark' number", stats)
            return
        stats.watermarks += 1
        self._log.setdefault(partition, []).append((rec.offset, ts))
        cfg = self.config
        dirty = self._dirty.setdefault(partition, {})
        seq = 0  # one sequence over every user's negatives: they share the watermark's offset
        for uid in list(self._pending[partition]):
            user = self._load(partition, uid)
            samples = user.expire(ts, cfg.window_s, cfg.sample_len, now)
            if not samples:
                continue
            ukey = uid.encode()
            for s in _identify(samples, self.generation, partition, rec.offset, seq):
                seq += 1
                data = s.to_bytes()
                self.sink.sample(partition, ukey, data)
                stats.samples[sample_kind(s)] += 1
                stats.sample_bytes += len(data)
            dirty[uid] = user
            self._set_pending(partition, uid, len(user.state.pending))

    def _reject(self, partition: int, rec: InRecord, reason: str, detail: str, stats: BatchStats) -> None:
        raw = rec.value if rec.value is not None else b""
        rej = Rejection(reason, detail, raw, f"{self.config.topic}:{partition}:{rec.offset}")
        self.sink.reject(partition, rec.key, raw, dlq_headers(rej))
        stats.rejected[reason] += 1

    def _poisoned(self, partition: int, uid: str, rec: InRecord, exc: Exception, stats: BatchStats) -> None:
        """Applying ``rec`` raised: reject it, rebuild the user from the store + events since."""
        log.error("applying %s:%d:%d raised; record sent to the DLQ\n%s", self.config.topic, partition,
                  rec.offset, "".join(traceback.format_exception(exc)))
        self._reject(partition, rec, "internal_error", f"{type(exc).__name__}: {exc}"[:300], stats)
        self._cache[partition].pop(uid, None)
        raw = self.store.partition(partition).get(uid.encode())
        user = UserRecord.from_bytes(raw) if raw is not None else UserRecord.new(uid, self.config.max_len)
        cfg = self.config
        for offset, item in self._log.get(partition, []):
            if isinstance(item, Event):
                if item.user_id == uid:
                    user.apply(item, offset, cfg.window_s, cfg.sample_len, generation=self.generation)
            else:
                user.expire(item, cfg.window_s, cfg.sample_len)
        self._cache[partition][uid] = user
        self._dirty.setdefault(partition, {})[uid] = user
        self._set_pending(partition, uid, len(user.state.pending))

    # -- persistence ------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """Encode every user changed since the last snapshot (and clear the changed set)."""
        puts: dict[int, dict[bytes, bytes]] = {}
        features: dict[int, dict[bytes, bytes]] = {}
        for partition, dirty in self._dirty.items():
            if not dirty:
                continue
            p_puts = puts[partition] = {}
            p_feat = features[partition] = {}
            for uid, user in dirty.items():
                key = uid.encode()
                p_puts[key] = user.to_bytes()
                p_feat[key] = user.features.to_json(uid)
            dirty.clear()
        cuts = {p: (entries, len(entries)) for p, entries in self._log.items()}
        return Snapshot(puts, features, dict(self._processed), cuts)

    def persisted(self, snap: Snapshot) -> None:
        """``snap`` is durable: forget its replay log and evict clean users past the cache bound."""
        for partition, (entries, cut) in snap.cuts.items():
            if self._log.get(partition) is entries:  # not forgotten by a rebalance meanwhile
                del entries[:cut]
        excess = self.cached_users - self.config.max_cached_users
        if excess > 0:
            self._evict(excess + self.config.max_cached_users // 5)

    def _evict(self, n: int) -> None:
        """Drop up to ``n`` clean users, oldest cached first."""
        for partition, cache in self._cache.items():
            dirty = self._dirty.get(partition, {})
            victims = []
            for uid in cache:
                if len(victims) >= n:
                    break
                if uid not in dirty:
                    victims.append(uid)
            for uid in victims:
                del cache[uid]
            n -= len(victims)
            if n <= 0:
                return

    def has_unpersisted(self) -> bool:
        return any(self._dirty.values()) or any(self._log.values())

    def forget(self, partitions: set[int]) -> None:
        """Partitions were revoked or (re)assigned: drop what is cached about them."""
        for partition in partitions:
            for d in (self._cache, self._dirty, self._pending, self._pending_total, self._processed, self._log):
                d.pop(partition, None)
