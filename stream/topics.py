"""Explicit topic creation (DESIGN.md §7): every topic exists with the configured partition count
before anything produces to it, because Tansu auto-creates unknown topics with 4 partitions and
faust refuses a table whose changelog partition count differs from its source topic.
"""

from __future__ import annotations

import time

from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from tgastream.core.kafka_security import PLAINTEXT, KafkaSecurity, kafka_python_args
from tgastream.core.settings import Settings


class TopicError(RuntimeError):
    """A topic exists with the wrong shape, or could not be created; one-line message."""


def app_topics(settings: Settings) -> dict[str, dict[str, str]]:
    """Every topic the pipeline uses, with its topic configs (compacted or compressed)."""
    return {
        settings.events_topic: {},
        settings.dlq_topic: {},
        settings.samples_topic: {"compression.type": "lz4"},
        settings.embeddings_topic: {"cleanup.policy": "compact"},
        settings.features_topic: {"cleanup.policy": "compact"},
    }


def partition_counts(admin: KafkaAdminClient, names: list[str]) -> dict[str, int]:
    """Partition count of each existing topic among ``names``."""
    counts: dict[str, int] = {}
    for meta in admin.describe_topics(names):
        if meta.get("error_code", 0) == 0 and meta.get("partitions"):
            counts[meta.get("name") or meta["topic"]] = len(meta["partitions"])  # kafka-python 3.x / 2.x
    return counts


def ensure_topics(bootstrap: str, topics: dict[str, dict[str, str]], partitions: int,
                  timeout_s: float = 15.0, security: KafkaSecurity = PLAINTEXT) -> None:
    """Create the missing topics with ``partitions`` partitions; fail if one exists with another count."""
    try:
        admin = KafkaAdminClient(**kafka_python_args(bootstrap, security, request_timeout_ms=int(timeout_s * 1000)))
    except KafkaError as exc:
        raise TopicError(f"could not connect to {bootstrap} ({security.protocol}): {exc}") from None
    try:
        existing = set(admin.list_topics())
        missing = [t for t in topics if t not in existing]
        if missing:
            try:
                admin.create_topics([NewTopic(t, partitions, 1, topic_configs=topics[t]) for t in missing])
            except TopicAlreadyExistsError:
                pass  # another process won the race
        deadline = time.monotonic() + timeout_s
        while True:
            counts = partition_counts(admin, list(topics))
            if len(counts) == len(topics):
                break
            if time.monotonic() > deadline:
                raise TopicError(f"topics {sorted(set(topics) - set(counts))} did not appear on {bootstrap}")
            time.sleep(0.1)
        wrong = {t: n for t, n in counts.items() if n != partitions}
        if wrong:
            raise TopicError(
                f"topics exist with other partition counts than {partitions}: {wrong}; "
                "use --partitions to match, or delete them")
    except KafkaError as exc:
        raise TopicError(f"could not create topics on {bootstrap}: {exc}") from None
    finally:
        admin.close()


def ensure_app_topics(bootstrap: str, settings: Settings) -> None:
    ensure_topics(bootstrap, app_topics(settings), settings.partitions, security=settings.kafka_security)
