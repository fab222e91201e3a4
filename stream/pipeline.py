"""The stream worker's batch pipeline: fetched batch → processor → samples → durable state → acks.

Order of durability (what makes a crash at any point safe, DESIGN.md §7):

1. a fetched batch is applied in memory (:class:`~stream.processor.Processor`); its samples and
   rejects are submitted to Kafka at once (low latency for the trainer);
2. every ``flush_s`` (or when many users changed), :meth:`Pipeline.persist` snapshots the changed
   users, waits until every sample and reject submitted so far is acknowledged, writes the users
   to the changelog topic (then a one-record marker batch, so Tansu's end offset counts every
   changelog record, DESIGN.md §7) and their features to ``user-features``, waits for those
   acknowledgements, writes the users to RocksDB in one batch per partition (the local copy is
   never ahead of the changelog), and only then acknowledges the source offsets to faust, which
   commits them.

A crash before step 2 completes re-delivers the events; each user's stored offset makes the state
skip what it already holds, so state is exactly-once and samples are at-least-once (a sample is
never lost; one can repeat only if the crash fell between its delivery and the state write).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from time import monotonic
from typing import Any, Awaitable, Callable, Mapping, Sequence

from faust.types import TP

from tgastream.state.store import INTERNAL_PREFIX, StateStore
from tgastream.stream.batch_consumer import BatchConsumer
from tgastream.stream.metrics import LatencyLog, WorkerMetrics
from tgastream.stream.output import BatchedProducer, Delivery, TopicSink, delivered, key_partition
from tgastream.stream.processor import BatchStats, Processor, ProcessorConfig

log = logging.getLogger(__name__)

MARKER_KEY = INTERNAL_PREFIX + b"marker"
"""Changelog key of the marker record that ends each changelog write (a user id never starts so)."""


@dataclass(frozen=True)
class PipelineConfig:
    events_topic: str
    samples_topic: str
    dlq_topic: str
    features_topic: str
    changelog_topic: str
    processor: ProcessorConfig
    flush_s: float = 0.5
    max_dirty_users: int = 50_000
    generation: int = 0  # of the events topic (stream/generations.py)
    generation_gap_s: float = 1.0  # a batch after this long without one is checked for a new generation


@dataclass
class PipelineTotals:
    """Running totals, for progress lines, the summary and the benchmark."""

    records: int = 0
    events: int = 0
    redelivered: int = 0
    rejected: int = 0
    watermarks: int = 0
    samples: int = 0
    sample_bytes: int = 0
    features: int = 0
    persists: int = 0
    users_written: int = 0
    records_durable: int = 0  # records whose effects are durable and acknowledged
    first_record_at: float | None = None  # monotonic
    last_durable_at: float | None = None
    latency: LatencyLog = field(default_factory=LatencyLog)

    def add(self, stats: BatchStats) -> None:
        self.records += stats.records
        self.events += stats.events
        self.redelivered += stats.skipped
        self.rejected += sum(stats.rejected.values())
        self.watermarks += stats.watermarks
        self.samples += sum(stats.samples.values())
        self.sample_bytes += stats.sample_bytes


class Pipeline:
    """Batch handler of the events topic and the persist loop of one worker process."""

    def __init__(self, config: PipelineConfig, store: StateStore, producer: BatchedProducer,
                 metrics: WorkerMetrics | None = None, totals: PipelineTotals | None = None) -> None:
        self.config = config
        self.store = store
        self.producer = producer
        self.metrics = metrics or WorkerMetrics()
        self.totals = totals or PipelineTotals()  # shared by a worker's incarnations
        self.consumer: BatchConsumer | None = None
        self.processor: Processor | None = None
        self._feature_partitions = 0
        self._features_same = True
        self._lock = asyncio.Lock()
        self._deliveries: list[Delivery] = []
        self._arrivals: list[tuple[float, int]] = []  # (monotonic arrival, records) not yet durable
        self._ack_next: dict[int, int] = {}  # partition → first offset not yet acknowledged
        self._revocations = 0  # the consumer's revocation count that _ack_next belongs to
        self._loop_task: asyncio.Task | None = None
        self._failed: BaseException | None = None
        self.generation_check: Callable[[], Awaitable[str | None]] | None = None  # → a re-created topic or None
        self.recreated: str | None = None  # set when a batch came from another generation: restart the worker
        self._last_batch_at = monotonic()

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self, consumer: BatchConsumer) -> None:
        """Start the producer and the persist loop; ``consumer`` receives the acknowledgements."""
        cfg = self.config
        self.consumer = consumer
        await self.producer.start()
        n_events = await self.producer.partition_count(cfg.events_topic)
        n_samples = await self.producer.partition_count(cfg.samples_topic)
        n_dlq = await self.producer.partition_count(cfg.dlq_topic)
        self._feature_partitions = await self.producer.partition_count(cfg.features_topic)
        self._features_same = self._feature_partitions == n_events
        sink = TopicSink(self.producer, cfg.samples_topic, cfg.dlq_topic, n_samples == n_events, n_samples, n_dlq)
        self.processor = Processor(self.store, cfg.processor, sink, cfg.generation)
        self._loop_task = asyncio.ensure_future(self._persist_loop())

    async def drain(self) -> None:
        """Stop taking batches and make everything processed so far durable (graceful stop)."""
        if self.consumer is not None:
            self.consumer.stop_flow()
        await self.persist()

    async def stop(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except (asyncio.CancelledError, Exception):
                pass
            self._loop_task = None
        await self.producer.stop()

    @property
    def failed(self) -> BaseException | None:
        """The error that stopped the persist loop, if any (the worker must then exit)."""
        return self._failed

    def on_partitions_changed(self, partitions: set[int]) -> None:
        """Rebalance: partitions revoked or newly assigned (their state may have changed elsewhere)."""
        if self.processor is not None:
            self.processor.forget(partitions)  # (acknowledgements: every revocation clears them all)
        self.metrics.drop_partitions(partitions)

    async def _same_generation(self) -> bool:
        """Before the first batch after a gap in fetching (a broker restart or a topic re-created
        causes one), make sure the events topic is still of this worker's generation: records of a
        new one must never be applied under the old generation's offsets. On a change, leave the
        batch unapplied and unacknowledged for the worker's next incarnation."""
        now, last = monotonic(), self._last_batch_at
        self._last_batch_at = now
        if self.generation_check is None or now - last < self.config.generation_gap_s:
            return True
        topic = await self.generation_check()
        if topic is not None:
            self.recreated = topic
            log.warning("a batch of %s after %.1f s without one comes from a new generation of %s: "
                        "not applied; the worker restarts on it", self.config.events_topic, now - last, topic)
            return False
        return True

    def _forget_acks_after_revocation(self) -> None:
        """After a revocation faust re-delivers from the committed offsets and no longer knows what
        was acknowledged: start acknowledging afresh from the next delivered record (what was
        processed meanwhile is not acknowledged; it comes again and is recognised as applied)."""
        assert self.consumer is not None
        if self.consumer.revocations != self._revocations:
            self._revocations = self.consumer.revocations
            self._ack_next.clear()

    # -- the hot path -----------------------------------------------------------------------

    async def handle(self, batch: Mapping[TP, Sequence[Any]]) -> None:
        """Batch handler: apply fetched records of the events topic (per partition, in order)."""
        assert self.processor is not None and self.consumer is not None
        if self._failed is not None or self.recreated is not None:
            return  # nothing can be made durable any more: leave the records for the next worker
        if not await self._same_generation():
            return
        async with self._lock:
            arrival = monotonic()
            wall = time.time()
            if self.totals.first_record_at is None:
                self.totals.first_record_at = arrival
            n = 0
            self._forget_acks_after_revocation()
            for tp, records in batch.items():
                partition = tp.partition
                if partition not in self._ack_next:
                    committed = self.consumer.committed_offset(tp)
                    first = records[0].offset
                    self._ack_next[partition] = first if committed is None else min(first, committed)
                stats = self.processor.process(partition, records, wall)
                self._account(partition, stats)
                self._update_lag(tp, records[-1].offset)
                n += len(records)
            self._arrivals.append((arrival, n))
            self.consumer.hold("stream pipeline: processed, not yet durable")
            self._deliveries += await self.producer.submit()
            if self.processor.dirty_users >= self.config.max_dirty_users:
                await self._persist_locked()

    def _account(self, partition: int, stats: BatchStats) -> None:
        self.totals.add(stats)
        m = self.metrics
        m.count_records(partition, stats.records)
        m.applied.inc(stats.events)
        m.redelivered.inc(stats.skipped)
        m.watermarks.inc(stats.watermarks)
        for reason, k in stats.rejected.items():
            m.rejected.labels(reason).inc(k)
        for kind, k in stats.samples.items():
            m.samples.labels(kind).inc(k)
        m.sample_bytes.inc(stats.sample_bytes)
        m.apply_seconds.observe(stats.apply_s)
        m.batch_records.observe(stats.records)

    def _update_lag(self, tp: TP, last_offset: int) -> None:
        try:
            end = self.consumer.highwater(tp) if self.consumer is not None else None
        except Exception:  # no highwater known yet
            end = None
        if end is not None:
            # Tansu's end offset can be short by one batch (DESIGN.md §7): never report below zero
            self.metrics.lag.labels(str(tp.partition)).set(max(0, end - last_offset - 1))

    # -- durability -------------------------------------------------------------------------

    async def _persist_loop(self) -> None:
        try:
            while True:
                await asyncio.sleep(self.config.flush_s)
                self.metrics.tick()
                if self._deliveries or self._arrivals or (self.processor and self.processor.has_unpersisted()):
                    await self.persist()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # a send or write failed: nothing more may be acknowledged
            log.exception("persisting state failed; the worker stops")
            self._failed = exc

    async def persist(self) -> None:
        """Make everything processed so far durable, then acknowledge its offsets."""
        async with self._lock:
            await self._persist_locked()

    async def _persist_locked(self) -> None:
        processor, consumer, cfg = self.processor, self.consumer, self.config
        if processor is None or consumer is None:
            return
        snap = processor.snapshot()
        deliveries, self._deliveries = self._deliveries, []
        arrivals, self._arrivals = self._arrivals, []
        await delivered(deliveries)  # 1. samples and rejects first: never lost
        for partition, puts in snap.puts.items():  # 2. state to the changelog, features published
            for key, value in puts.items():
                self.producer.append(cfg.changelog_topic, partition, key, value)
            for key, value in snap.features[partition].items():
                fp = partition if self._features_same else key_partition(key, self._feature_partitions)
                self.producer.append(cfg.features_topic, fp, key, value)
        written = await self.producer.submit()
        for partition in snap.puts:  # the marker closes each partition's changelog write
            self.producer.append(cfg.changelog_topic, partition, MARKER_KEY, b"")
        markers = await self.producer.submit()
        await delivered(written + markers)
        for partition, puts in snap.puts.items():  # 3. the local copy, never ahead of the changelog
            self.store.partition(partition).write(puts)
        for d in markers:
            self.store.partition(d.partition).set_changelog_offset(d.last_offset())
        processor.persisted(snap)
        self._forget_acks_after_revocation()
        for partition, last in snap.offsets.items():  # 4. only now may faust commit the offsets
            first = self._ack_next.get(partition)
            if first is not None and last >= first:
                consumer.ack_through(TP(cfg.events_topic, partition), first, last)
                self._ack_next[partition] = last + 1
        if not processor.has_unpersisted() and not self._deliveries:
            consumer.release()
        self._after_persist(snap.users, sum(len(f) for f in snap.features.values()), arrivals)

    def _after_persist(self, users: int, features: int, arrivals: list[tuple[float, int]]) -> None:
        now = monotonic()
        t = self.totals
        t.persists += 1
        t.users_written += users
        t.features += features
        m = self.metrics
        m.features.inc(features)
        if users:
            m.persist_users.observe(users)
        for arrival, n in arrivals:
            m.update_latency.observe(now - arrival)
            t.latency.add(now - arrival, n)
            t.records_durable += n
        if arrivals:
            t.last_durable_at = now
        assert self.processor is not None
        m.cached_users.set(self.processor.cached_users)
        for partition, n_open in self.processor.pending_windows().items():
            m.pending.labels(str(partition)).set(n_open)
        for partition, st in self.store.stats().items():
            m.store_bytes.labels(str(partition)).set(st.bytes)
            m.store_users.labels(str(partition)).set(st.keys)
