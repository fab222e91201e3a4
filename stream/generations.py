"""Topic generations: which incarnation of a topic a process reads, and what a worker does when one
is re-created.

A topic's generation is its topic id (Kafka and Tansu report one in the metadata). It changes when
the topic is deleted and created again, and on Tansu, whose topics live in memory (DESIGN.md §7),
at every broker restart. Offsets start again at 0 in a new generation, so:

- the per-user offset guard is keyed on (generation, offset): events of a re-created source are
  all new, never skipped as "already applied" (:meth:`state.samples.UserState.holds`);
- a re-created changelog is re-seeded from the local state (every user record written again,
  then a marker), so a broker restart loses no user state; local databases then replay the whole
  new changelog on recovery, where a user's newer state always wins (:func:`state.record.supersedes`);
- a running worker watches the ids and, when one changes, restarts its faust app in-process
  (the policy; docs/operations/broker-restarts.md).
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from dataclasses import dataclass

from kafka import KafkaAdminClient
from kafka.errors import KafkaError

from tgastream.core.kafka_security import PLAINTEXT, KafkaSecurity, kafka_python_args
from tgastream.state.store import StateStore
from tgastream.stream.pipeline import MARKER_KEY

log = logging.getLogger("tgastream.generations")


def generation_of(topic_id: str | None) -> int:
    """A topic id as a 32-bit generation number (0: no id known)."""
    return zlib.crc32(topic_id.encode()) if topic_id else 0


def topic_ids(bootstrap: str, topics: list[str], timeout_s: float = 5.0,
              security: KafkaSecurity = PLAINTEXT) -> dict[str, str | None]:
    """The id of each topic (None: the topic does not exist). Raises KafkaError when the broker
    does not answer."""
    admin = KafkaAdminClient(**kafka_python_args(bootstrap, security, request_timeout_ms=int(timeout_s * 1000)))
    try:
        out: dict[str, str | None] = {t: None for t in topics}
        for meta in admin.describe_topics(topics):
            name = meta.get("name") or meta.get("topic")
            if name in out and meta.get("error_code", 0) == 0:
                out[name] = str(meta.get("topic_id") or "") or None
        return out
    finally:
        admin.close()


@dataclass(frozen=True)
class Generations:
    """The ids of the topics a worker's state depends on, as seen when an incarnation started."""

    events_id: str | None
    changelog_id: str | None

    @property
    def source(self) -> int:
        return generation_of(self.events_id)


def read_generations(bootstrap: str, events_topic: str, changelog_topic: str,
                     security: KafkaSecurity = PLAINTEXT) -> Generations:
    ids = topic_ids(bootstrap, [events_topic, changelog_topic], security=security)
    return Generations(ids[events_topic], ids[changelog_topic])


def changed(bootstrap: str, events_topic: str, changelog_topic: str, known: Generations,
            security: KafkaSecurity = PLAINTEXT) -> str | None:
    """Which topic has another generation than ``known``, or None. Raises KafkaError or OSError
    when the broker does not answer (which tells nothing either way)."""
    now = read_generations(bootstrap, events_topic, changelog_topic, security)
    if now.events_id != known.events_id:
        return events_topic
    if now.changelog_id != known.changelog_id:
        return changelog_topic
    return None


def changed_or_none(bootstrap: str, events_topic: str, changelog_topic: str, known: Generations,
                    security: KafkaSecurity = PLAINTEXT) -> str | None:
    """:func:`changed` for a periodic watch: a broker that does not answer is asked again later."""
    try:
        return changed(bootstrap, events_topic, changelog_topic, known, security)
    except (KafkaError, OSError):
        return None


async def changed_surely(bootstrap: str, events_topic: str, changelog_topic: str, known: Generations,
                         timeout_s: float = 10.0, security: KafkaSecurity = PLAINTEXT) -> str | None:
    """:func:`changed`, asked until the broker answers; with no answer within ``timeout_s`` the
    events topic counts as changed (restarting the worker is safe, applying a batch of an unknown
    generation is not)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return await asyncio.to_thread(changed, bootstrap, events_topic, changelog_topic, known, security)
        except (KafkaError, OSError):
            if time.monotonic() >= deadline:
                return events_topic
            await asyncio.sleep(0.5)


def reseed_changelog(store: StateStore, bootstrap: str, changelog_topic: str, changelog_id: str,
                     security: KafkaSecurity = PLAINTEXT) -> list[int]:
    """Write every local partition database that mirrors another generation of the changelog into
    the current one (users, then a marker), and make it replay the whole new changelog on its next
    recovery. Returns the partitions re-seeded."""
    from tgastream.stream.replay import make_producer

    reseeded: list[int] = []
    producer = None
    try:
        for partition in store.local_partitions():
            db = store.partition(partition)
            if db.changelog_id() in (None, changelog_id):
                continue  # the same generation, or a database from before ids were recorded
            if producer is None:
                producer = make_producer(bootstrap, security, enable_idempotence=False)
            users = 0
            for key, value in db.items():
                producer.send(changelog_topic, key=key, value=value, partition=partition)
                users += 1
            producer.flush()
            producer.send(changelog_topic, key=MARKER_KEY, value=b"", partition=partition)
            producer.flush()
            db.reset_changelog_position(changelog_id)
            reseeded.append(partition)
            log.warning("changelog %s was re-created: partition %d re-seeded from local state (%d users)",
                        changelog_topic, partition, users)
    finally:
        if producer is not None:
            producer.close()
        for partition in store.local_partitions():
            store.close_partition(partition)
    return reseeded
