"""Test helpers that read topics back from the real broker."""

from __future__ import annotations

import time

from kafka import KafkaConsumer, TopicPartition

from tgastream.core.kafka_security import PLAINTEXT, KafkaSecurity, kafka_python_args


def read_topic(bootstrap: str, topic: str, expected: int | None = None, idle_s: float = 2.0,
               timeout_s: float = 60.0, security: KafkaSecurity = PLAINTEXT) -> list:
    """Every record of ``topic`` from the beginning, partition by partition in offset order.

    Stops once ``expected`` records are read (then waits ``idle_s`` more for extras) or, without a
    count, after ``idle_s`` with no new record. Counting records avoids Tansu's short end offsets.
    """
    consumer = KafkaConsumer(**kafka_python_args(bootstrap, security, enable_auto_commit=False, group_id=None))
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        out: list = []
        deadline = time.monotonic() + timeout_s
        last = time.monotonic()
        while time.monotonic() < deadline:
            batch = consumer.poll(200, max_records=10_000)
            got = sum(len(v) for v in batch.values())
            for tp in sorted(batch, key=lambda t: t.partition):
                out.extend(batch[tp])
            now = time.monotonic()
            if got:
                last = now
            enough = expected is None or len(out) >= expected
            if enough and now - last >= idle_s:
                break
        return out
    finally:
        consumer.close()
