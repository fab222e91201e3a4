"""Batched Kafka output for the stream worker: records go straight into record-batch builders.

``AIOKafkaProducer.send`` is a coroutine per record (tens of µs in Python); a worker emitting a
sample, a changelog entry and a feature record per event cannot afford that. Here a record is
appended to an aiokafka :class:`BatchBuilder` per (topic, partition) — one C call — and full or
flushed builders are submitted with ``send_batch``. :meth:`BatchedProducer.submit` returns the
delivery futures of everything appended so far, so callers can order durability (samples before
state, state before offsets).

The producer uses ``acks=all`` and is idempotent where the broker supports it (a retried batch is
never written twice). Tansu 0.6 answers aiokafka's InitProducerId with an error, so there the
producer falls back to plain ``acks=all``; aiokafka keeps one batch in flight per partition, so
order holds, and a retry after a lost response can at worst repeat a batch (samples are
at-least-once anyway; a repeated changelog record carries the same value).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaProducer

from tgastream.core.kafka_security import PLAINTEXT, KafkaSecurity, aiokafka_args
from aiokafka.errors import KafkaError
from aiokafka.partitioner import murmur2

log = logging.getLogger(__name__)

MAX_BATCH_BYTES = 1 << 20
"""Largest record batch we build: Kafka's default ``message.max.bytes`` is about 1 MiB."""


@dataclass
class Delivery:
    """A submitted batch: where it went, how many records, and its delivery future."""

    topic: str
    partition: int
    records: int
    future: asyncio.Future

    def last_offset(self) -> int:
        """Offset of the batch's last record (after the future resolved)."""
        return self.future.result().offset + self.records - 1


class BatchedProducer:
    """An aiokafka producer fed through per-partition batch builders."""

    def __init__(self, bootstrap: str, *, client_id: str = "tgastream-worker",
                 max_batch_bytes: int = MAX_BATCH_BYTES, security: KafkaSecurity = PLAINTEXT, **config: Any) -> None:
        self._config: dict[str, Any] = aiokafka_args(
            bootstrap, security, client_id=client_id, acks="all", max_batch_size=max_batch_bytes,
            max_request_size=4 * max_batch_bytes, request_timeout_ms=30_000, **config)
        self._producer: AIOKafkaProducer | None = None  # made in start(): aiokafka needs the running loop
        self.idempotent = True
        self._open: dict[tuple[str, int], Any] = {}  # (topic, partition) → BatchBuilder being filled
        self._full: list[tuple[str, int, Any]] = []
        self._partitions: dict[str, int] = {}

    async def start(self) -> None:
        self._producer = AIOKafkaProducer(enable_idempotence=True, **self._config)
        sender_log = logging.getLogger("aiokafka.producer.sender")
        level = sender_log.level
        sender_log.setLevel(logging.CRITICAL)  # a refusal is handled below, not an error to log
        try:
            await self._producer.start()
        except KafkaError as exc:
            await self._producer.stop()
            log.warning("broker refused an idempotent producer (%r); using acks=all without idempotence", exc)
            self._producer = AIOKafkaProducer(enable_idempotence=False, **self._config)
            self.idempotent = False
            await self._producer.start()
        finally:
            sender_log.setLevel(level)

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()

    def _started(self) -> AIOKafkaProducer:
        if self._producer is None:
            raise RuntimeError("BatchedProducer.start() was not awaited")
        return self._producer

    async def partition_count(self, topic: str) -> int:
        """Partitions of ``topic`` (metadata is fetched once and remembered)."""
        n = self._partitions.get(topic)
        if n is None:
            n = self._partitions[topic] = len(await self._started().partitions_for(topic))
        return n

    def append(self, topic: str, partition: int, key: bytes | None, value: bytes | None,
               headers: list[tuple[str, bytes]] | None = None) -> None:
        """Add one record to the open batch of (topic, partition); nothing is sent yet."""
        slot = (topic, partition)
        builder = self._open.get(slot)
        if builder is None:
            builder = self._open[slot] = self._started().create_batch()
        if builder.append(timestamp=None, key=key, value=value, headers=headers or []) is None:
            self._full.append((topic, partition, builder))
            builder = self._open[slot] = self._started().create_batch()
            if builder.append(timestamp=None, key=key, value=value, headers=headers or []) is None:
                raise ValueError(f"record of {len(value or b'')} bytes does not fit in a batch")

    @property
    def buffered(self) -> int:
        """Records appended but not yet submitted."""
        return sum(b.record_count() for _, _, b in self._full) + sum(b.record_count() for b in self._open.values())

    async def submit(self) -> list[Delivery]:
        """Send every batch built so far; their deliveries (await :func:`delivered` for acks)."""
        batches = self._full + [(t, p, b) for (t, p), b in self._open.items() if b.record_count()]
        self._full, self._open = [], {}
        out = []
        for topic, partition, builder in batches:
            count = builder.record_count()
            fut = await self._started().send_batch(builder, topic, partition=partition)
            out.append(Delivery(topic, partition, count, fut))
        return out


async def delivered(deliveries: list[Delivery]) -> None:
    """Wait until every delivery is acknowledged; raises the first send error."""
    if deliveries:
        await asyncio.gather(*(d.future for d in deliveries))


def key_partition(key: bytes, partitions: int) -> int:
    """Kafka's default partitioner (murmur2 of the key), as Java and kafka-python clients use."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


class TopicSink:
    """The processor's :class:`~stream.processor.OutputSink` over a :class:`BatchedProducer`.

    Samples keep their user's partition when the samples topic has as many partitions as the
    events topic (the usual case: one user's events, state and samples on one partition number);
    otherwise the default partitioner places them by key.
    """

    def __init__(self, producer: BatchedProducer, samples_topic: str, dlq_topic: str,
                 same_partitions: bool, sample_partitions: int, dlq_partitions: int) -> None:
        self.producer = producer
        self.samples_topic, self.dlq_topic = samples_topic, dlq_topic
        self.same_partitions = same_partitions
        self.sample_partitions, self.dlq_partitions = sample_partitions, dlq_partitions
        self._append = producer.append

    def sample(self, partition: int, key: bytes, value: bytes) -> None:
        if not self.same_partitions:
            partition = key_partition(key, self.sample_partitions)
        self._append(self.samples_topic, partition, key, value)

    def reject(self, partition: int, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]]) -> None:
        self._append(self.dlq_topic, partition % self.dlq_partitions, key, value, headers)
