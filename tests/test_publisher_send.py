"""Sending on the embeddings topic survives kafka-python's metadata race during a broker restart
and nothing else: errors of other kinds are raised at once."""

from __future__ import annotations

import pytest
from kafka.partitioner.default import DefaultPartitioner

from tgastream.stream.publisher import send_record


class _RestartedTopic:
    """Cluster metadata as kafka-python's partitioner may read it while a topic is re-created:
    listed with no partitions (``{}``; or None when the I/O thread swapped the map between the
    partitioner's two reads)."""

    def __init__(self, partitions: set[int] | None) -> None:
        self.partitions = partitions

    def topics(self) -> set[str]:
        return {"embeddings"}

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        return self.partitions

    def available_partitions_for_topic(self, topic: str) -> set[int]:
        return set()


class _Producer:
    """``send`` runs kafka-python's real partitioner on racing metadata ``races`` times, then
    records what it sends."""

    def __init__(self, races: int, partitions: set[int] | None = None, unassigned: bool = False) -> None:
        self.races = races
        self.partitions = partitions
        self.unassigned = unassigned  # the race outside the partitioner: send finds no partition
        self.calls = 0
        self.sent: list[tuple[str, bytes, bytes | None]] = []

    def send(self, topic: str, key: bytes, value: bytes | None) -> None:
        self.calls += 1
        if self.calls <= self.races:
            if self.unassigned:  # kafka-python's own message (producer/kafka.py)
                raise ValueError(f"Partitioner did not assign a partition for topic {topic}!")
            DefaultPartitioner().partition(topic, key, key, value, value, _RestartedTopic(self.partitions))
        if not isinstance(value, (bytes, type(None))):
            raise TypeError(f"value must be bytes, not {type(value).__name__}")
        self.sent.append((topic, key, value))


@pytest.mark.parametrize("race", [dict(partitions=None), dict(partitions=set()), dict(unassigned=True)],
                         ids=["partitions-none", "no-partitions", "no-partition-assigned"])
def test_a_send_racing_a_recreated_topic_is_sent_again_once_it_has_partitions(race):
    producer = _Producer(races=3, **race)
    send_record(producer, "embeddings", b"u:1", b"vector", backoff_s=0.0)
    assert producer.sent == [("embeddings", b"u:1", b"vector")]
    assert producer.calls == 4


def test_a_race_that_outlasts_its_attempts_is_raised():
    producer = _Producer(races=10)
    with pytest.raises(TypeError):
        send_record(producer, "embeddings", b"u:1", b"vector", attempts=3, backoff_s=0.0)
    assert producer.calls == 3 and producer.sent == []


def test_a_type_error_outside_the_partitioner_is_raised_at_once():
    producer = _Producer(races=0)
    with pytest.raises(TypeError, match="must be bytes"):
        send_record(producer, "embeddings", b"u:1", "not bytes", backoff_s=0.0)  # type: ignore[arg-type]
    assert producer.calls == 1
