"""Replay: an event log file → ``behavior-events`` (key = user id), paced, with rejects to the DLQ.

Also re-reads a topic from a point in time into another topic (rebuilding state). Tansu does not
implement ListOffsets by timestamp, so the timestamp lookup is verified and, when it cannot be
trusted, replaced by a scan that skips older records (DESIGN.md §7).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from tgastream.core.kafka_security import PLAINTEXT, KafkaSecurity, kafka_python_args
from tqdm import tqdm

from tgastream.core.events import WATERMARK_KEY, Event, Rejection, read_log, watermark_value
from tgastream.core.settings import Settings
from tgastream.stream.broker import BrokerError


@dataclass(frozen=True)
class ReplayConfig:
    """How to replay a log: order, pace and size."""

    path: Path
    fmt: str = "auto"
    order: str = "time"  # "time": stable sort by event time; "file": file order
    rate: float = 0.0  # target events/s; 0 = as fast as possible
    speedup: float = 0.0  # replay event time this many times faster than real; 0 = off
    limit: int = 0  # stop after this many records; 0 = all
    watermark: bool = False  # end with a watermark past every event, to close open label windows
    watermark_margin_s: float = 0.0
    # > 0 (time order only): also a watermark every this much event time, at the newest event time sent,
    # as a live source's partition watermarks: conversion windows then close on time, not at the user's
    # next event (without it a day-old negative of a quiet user waits for the end, and a trainer under
    # conversion_feedback=wait hears positives long before the negatives of the same clicks)
    watermark_every_s: float = 0.0


@dataclass
class ReplaySummary:
    sent: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def events_per_s(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict:
        return {"sent": self.sent, "rejected": dict(sorted(self.rejected.items())),
                "events_per_s": round(self.events_per_s, 1), "seconds": round(self.seconds, 3)}

    def render(self) -> str:
        lines = [f"sent        {self.sent:>10,}",
                 f"rejected    {sum(self.rejected.values()):>10,}"]
        lines += [f"  {reason:<22}{n:>8,}" for reason, n in sorted(self.rejected.items())]
        lines += [f"seconds     {self.seconds:>10.2f}", f"events/s    {self.events_per_s:>10,.0f}"]
        return "\n".join(lines)


class DeliveryError(BrokerError):
    """Records the broker never acknowledged (after the producer's retries): one line."""


@dataclass
class Deliveries:
    """Counts sends the broker never acknowledged: kafka-python reports a lost record only on its
    future, so every send is tracked, and a run that lost any says so instead of counting it sent."""

    tracked: int = 0
    failed: int = 0
    first_error: str = ""

    def track(self, future) -> None:
        self.tracked += 1
        future.add_errback(self._failed)

    def _failed(self, exc: BaseException) -> None:
        # the producer's I/O thread, or the sender's for a future that failed before it was tracked;
        # an update lost to that rare race still leaves ``failed`` above 0
        self.failed += 1
        if not self.first_error:
            self.first_error = f"{type(exc).__name__}: {exc}"

    def check(self, where: str) -> None:
        """Raise :class:`DeliveryError` if any tracked send failed (call after ``flush``: it
        returns once every send's callbacks have run)."""
        if self.failed:
            raise DeliveryError(f"{self.failed:,} of {self.tracked:,} records were not delivered to {where} "
                                f"({self.first_error}); send them again")


def make_producer(bootstrap: str, security: KafkaSecurity = PLAINTEXT, **overrides: object) -> KafkaProducer:
    """Idempotent, acks=all producer: no duplicates and no loss on retries."""
    config: dict[str, object] = kafka_python_args(
        bootstrap, security, acks="all", enable_idempotence=True, linger_ms=20,
        batch_size=256 * 1024, max_in_flight_requests_per_connection=5, retries=2**31 - 1,
        delivery_timeout_ms=120_000,
    )
    config.update(overrides)
    return KafkaProducer(**config)


def dlq_headers(rej: Rejection) -> list[tuple[str, bytes]]:
    return [("reason", rej.reason.encode()), ("detail", rej.detail.encode()), ("source", rej.source.encode())]


def send_rejection(producer: KafkaProducer, topic: str, rej: Rejection, key: bytes | None = None):
    """The original bytes go to the dead-letter topic, the reason in headers; the send's future."""
    return producer.send(topic, key=key, value=rej.raw, headers=dlq_headers(rej))


def _ordered(records: Iterable[Event | Rejection], order: str) -> list[Event | Rejection]:
    items = list(records)
    if order == "time":
        # stable: equal timestamps keep file order; rejects keep their place (ts = -inf sorts first)
        items.sort(key=lambda r: r.ts if isinstance(r, Event) else float("-inf"))
    elif order != "file":
        raise ValueError(f"order must be 'time' or 'file', got {order!r}")
    return items


class Pacer:
    """Sleeps so that record i is sent no earlier than its due time (rate or event-time speed-up)."""

    def __init__(self, rate: float, speedup: float) -> None:
        self.rate, self.speedup = rate, speedup
        self.t0 = time.monotonic()
        self.ts0: float | None = None

    def wait(self, i: int, ts: float | None) -> None:
        due = 0.0
        if self.rate > 0:
            due = i / self.rate
        if self.speedup > 0 and ts is not None:
            if self.ts0 is None:
                self.ts0 = ts
            due = max(due, (ts - self.ts0) / self.speedup)
        ahead = self.t0 + due - time.monotonic()
        if ahead > 0.002:
            time.sleep(ahead)


def replay_file(bootstrap: str, settings: Settings, opts: ReplayConfig, progress: bool = True) -> ReplaySummary:
    """Send every valid event of ``opts.path`` to the events topic and every reject to the DLQ."""
    records = _ordered(read_log(opts.path, opts.fmt), opts.order)
    if opts.limit:
        records = records[: opts.limit]
    producer = make_producer(bootstrap, settings.kafka_security)
    deliveries = Deliveries()
    summary, rejected = ReplaySummary(), Counter()
    pacer = Pacer(opts.rate, opts.speedup)
    max_ts = float("-inf")
    every = opts.watermark_every_s if opts.order == "time" else 0.0
    next_mark: float | None = None
    start = time.monotonic()
    bar = tqdm(total=len(records), unit="ev", disable=not progress, desc="replay", mininterval=0.5)
    try:
        for i, rec in enumerate(records):
            if isinstance(rec, Event):
                if opts.rate > 0 or opts.speedup > 0:
                    pacer.wait(i, rec.ts)
                if every > 0:
                    if next_mark is None:
                        next_mark = rec.ts + every
                    elif rec.ts >= next_mark and summary.sent:
                        send_watermarks(producer, settings.events_topic, max_ts, deliveries)  # every event up to it is sent
                        next_mark = rec.ts + every
                deliveries.track(producer.send(settings.events_topic, key=rec.user_id.encode(), value=rec.to_json()))
                summary.sent += 1
                max_ts = max(max_ts, rec.ts)
            else:
                deliveries.track(send_rejection(producer, settings.dlq_topic, rec))
                rejected[rec.reason] += 1
            if i % 1000 == 999:
                bar.update(1000)
        bar.update(len(records) - bar.n)
        if opts.watermark and summary.sent:
            send_watermarks(producer, settings.events_topic, max_ts + opts.watermark_margin_s, deliveries)
        producer.flush()
        deliveries.check(f"{settings.events_topic} / {settings.dlq_topic} on {bootstrap}")
    finally:
        bar.close()
        producer.close()
    summary.seconds = time.monotonic() - start
    summary.rejected = dict(rejected)
    return summary


def send_watermarks(producer: KafkaProducer, topic: str, ts: float, deliveries: Deliveries | None = None) -> None:
    """One watermark record on every partition of ``topic``."""
    for p in sorted(producer.partitions_for(topic)):
        future = producer.send(topic, key=WATERMARK_KEY, value=watermark_value(ts), partition=p)
        if deliveries is not None:
            deliveries.track(future)


def write_summary_json(summary: ReplaySummary, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary.to_json(), indent=2) + "\n")


@dataclass
class CopySummary:
    copied: int = 0
    skipped_older: int = 0
    seconds: float = 0.0
    used_time_index: bool = False

    def to_json(self) -> dict:
        return asdict(self)


def _start_offsets(consumer: KafkaConsumer, tps: list[TopicPartition], since_ms: int) -> tuple[dict, bool]:
    """Offsets to start from: the broker's time index where it is verifiably right, else the beginning."""
    begin = consumer.beginning_offsets(tps)
    try:
        found = consumer.offsets_for_times({tp: since_ms for tp in tps})
    except Exception:  # brokers without ListOffsets-by-time (Tansu) answer errors or nonsense
        return begin, False
    starts, trusted = {}, True
    for tp in tps:
        hit = found.get(tp)
        if hit is None or hit.timestamp is None or hit.timestamp < since_ms or hit.offset < begin[tp]:
            starts[tp], trusted = begin[tp], False
            continue
        if hit.offset > begin[tp] and not _older_than(consumer, tp, hit.offset - 1, since_ms):
            starts[tp], trusted = begin[tp], False
            continue
        starts[tp] = hit.offset
    return starts, trusted


def _older_than(consumer: KafkaConsumer, tp: TopicPartition, offset: int, since_ms: int) -> bool:
    """True when the record just before the index hit is older than ``since_ms`` (the hit is exact)."""
    consumer.assign([tp])
    consumer.seek(tp, offset)
    for _ in range(10):
        for records in consumer.poll(500, max_records=1).values():
            return records[0].timestamp < since_ms
    return False


def copy_topic(bootstrap: str, source: str, dest: str, since_ms: int, idle_s: float = 3.0,
               progress: bool = True, security: KafkaSecurity = PLAINTEXT) -> CopySummary:
    """Re-send every record of ``source`` with timestamp >= ``since_ms`` to ``dest`` (same key, headers)."""
    consumer = KafkaConsumer(**kafka_python_args(bootstrap, security, enable_auto_commit=False, group_id=None))
    producer = make_producer(bootstrap, security)
    deliveries = Deliveries()
    summary = CopySummary()
    start = time.monotonic()
    try:
        parts = consumer.partitions_for_topic(source)
        if not parts:
            raise ValueError(f"topic {source!r} does not exist on {bootstrap}")
        tps = [TopicPartition(source, p) for p in sorted(parts)]
        starts, summary.used_time_index = _start_offsets(consumer, tps, since_ms)
        consumer.assign(tps)
        for tp, off in starts.items():
            consumer.seek(tp, off)
        ends = consumer.end_offsets(tps)
        bar = tqdm(unit="rec", disable=not progress, desc="copy", mininterval=0.5)
        last_data = time.monotonic()
        while True:
            batch = consumer.poll(500, max_records=5000)
            n = 0
            for records in batch.values():
                for r in records:
                    n += 1
                    if r.timestamp < since_ms:
                        summary.skipped_older += 1
                        continue
                    deliveries.track(producer.send(dest, key=r.key, value=r.value, headers=list(r.headers or [])))
                    summary.copied += 1
            bar.update(n)
            now = time.monotonic()
            if n:
                last_data = now
            caught_up = all(consumer.position(tp) >= ends[tp] for tp in tps)
            # Tansu's end offsets can be short by one batch: also wait for an idle spell
            if caught_up and now - last_data >= idle_s:
                break
        bar.close()
        producer.flush()
        deliveries.check(f"{dest} on {bootstrap}")
    finally:
        producer.close()
        consumer.close()
    summary.seconds = time.monotonic() - start
    return summary
