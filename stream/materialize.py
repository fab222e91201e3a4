"""An API replica's own copy of what the trainer publishes: the compacted ``embeddings`` topic as a
table (RocksDB), kept current by a background consumer, plus an item index updated in place
(state/ann_index.py: exact below a size, approximate above).

The topic is the changelog of the serving table: ``user:<id>`` / ``item:<id>`` (vectors),
``bought:<id>`` (bought items) and ``context:<id>`` (the user's latest context graph) records are
written to the local :class:`~state.serving.ServingStore` under the same keys, with the consumed
offsets in the same atomic batch. So any number of replicas run anywhere, each on its own data dir,
and a restarted replica serves at once from its store and resumes the topic where it stopped. A
re-created topic (another topic id, e.g. a Tansu broker restart) is read again from its beginning.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import numpy as np
from kafka import KafkaConsumer, TopicPartition

from tgastream.core.kafka_security import PLAINTEXT, KafkaSecurity, kafka_python_args
from tgastream.state.ann_index import AnnConfig, ItemVectorIndex
from tgastream.state.serving import ServingStore, VectorRecord
from tgastream.stream.generations import topic_ids

log = logging.getLogger("tgastream.api.materialize")

ITEM_PREFIX = b"item:"
CATEGORY_PREFIX = b"itemcat:"


@dataclass
class IndexOps:
    """What a batch of topic records does to the item index: the last record of an item wins."""

    vectors: dict[str, np.ndarray] = field(default_factory=dict)  # item → new vector
    removed: set[str] = field(default_factory=set)  # items whose record was deleted (evicted)
    categories: dict[str, str] = field(default_factory=dict)

    def apply_to(self, index: ItemVectorIndex) -> None:
        """Into ``index``, chunk by chunk (each chunk holds its lock briefly: queries wait at most one)."""
        if self.vectors:
            ids = list(self.vectors)
            index.put_many(ids, np.stack([self.vectors[i] for i in ids]))  # [n, d]
        if self.removed:
            index.remove(self.removed)
        if self.categories:
            index.set_categories(self.categories)


def index_from_store(store: ServingStore, config: AnnConfig | None = None) -> ItemVectorIndex:
    """A replica's item index rebuilt from its store (at start-up: what it served before it stopped)."""
    index = ItemVectorIndex(config)
    ids, matrix = store.item_matrix()
    cats = store.item_categories()
    if ids:
        index.put_many(ids, matrix, [cats.pop(i, "0") for i in ids])
    index.set_categories(cats)  # categories of items with no vector yet
    index.wait_built()
    return index


class TopicMaterializer:
    """Consumes the embeddings topic into a store and an item index (call :meth:`run` as a task)."""

    def __init__(self, bootstrap: str, topic: str, store: ServingStore, index: ItemVectorIndex,
                 security: KafkaSecurity = PLAINTEXT) -> None:
        self.bootstrap, self.topic, self.security = bootstrap, topic, security
        self.store, self.index = store, index
        self.records = 0
        self.bad_records = 0  # vectors that did not decode: skipped, never fatal
        self.caught_up = False
        self.error: str | None = None  # the last failure of the follow loop (it retries)

    def _consumer(self) -> KafkaConsumer:
        consumer = KafkaConsumer(**kafka_python_args(self.bootstrap, self.security, enable_auto_commit=False,
                                                     group_id=None, auto_offset_reset="earliest", fetch_max_wait_ms=50,
                                                     max_partition_fetch_bytes=8 * 1024 * 1024))
        parts = consumer.partitions_for_topic(self.topic) or set()
        tps = [TopicPartition(self.topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        current = topic_ids(self.bootstrap, [self.topic], security=self.security)[self.topic]
        offsets = self.store.offsets() if current and current == self.store.source_id() else {}
        if current and current != self.store.source_id():
            if self.store.source_id() is not None:
                log.warning("topic %s was re-created: reading it from its beginning", self.topic)
            self.store.set_source(current)
        for tp in tps:
            if tp.partition in offsets:
                consumer.seek(tp, offsets[tp.partition])
            else:
                consumer.seek_to_beginning(tp)
        return consumer

    def apply(self, records: list) -> None:
        """:meth:`apply_store`, then the index (callers that are not the event loop)."""
        self.apply_store(records).apply_to(self.index)

    def apply_store(self, records: list) -> IndexOps:
        """One atomic store batch for ``records`` (and their offsets); returns what they do to the
        item index. A vector that does not decode is counted and left out; nothing else about it
        can stop the replica. A deleted ``item:`` record (a tombstone) removes the item."""
        puts, versions = [], []
        ops = IndexOps()
        for r in records:
            if r.key is None:
                continue
            if r.value and (r.key.startswith(b"user:") or r.key.startswith(ITEM_PREFIX)):
                try:
                    vec = VectorRecord.from_bytes(r.value)
                except Exception:  # a foreign or corrupt record on the topic
                    self.bad_records += 1
                    continue
                versions.append(vec.model_version)
                if r.key.startswith(ITEM_PREFIX):
                    iid = r.key[len(ITEM_PREFIX):].decode(errors="replace")
                    ops.vectors[iid] = vec.vector
                    ops.removed.discard(iid)
            elif r.key.startswith(ITEM_PREFIX):  # a tombstone: the item is gone
                iid = r.key[len(ITEM_PREFIX):].decode(errors="replace")
                ops.vectors.pop(iid, None)
                ops.removed.add(iid)
            elif r.key.startswith(CATEGORY_PREFIX) and r.value:
                ops.categories[r.key[len(CATEGORY_PREFIX):].decode(errors="replace")] = r.value.decode(errors="replace")
            puts.append((r.key, r.value))
        self.store.write_raw(puts, {r.partition: r.offset + 1 for r in records})
        if versions:
            self.store.note_model_version(max(versions))
        self.records += len(records)
        return ops

    async def run(self, poll_ms: int = 100, retry_s: float = 1.0) -> None:
        """Follow the topic until cancelled; the blocking poll runs in a thread, the writes here.
        A failure (the broker away, say) is logged and the loop starts again from the stored offsets."""
        while True:
            try:
                await self._follow(poll_ms)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.error = f"{type(exc).__name__}: {exc}"
                log.exception("following %s failed; retrying in %.0f s", self.topic, retry_s)
                await asyncio.sleep(retry_s)

    async def _follow(self, poll_ms: int) -> None:
        consumer = await asyncio.to_thread(self._consumer)
        try:
            while True:
                polled = await asyncio.to_thread(consumer.poll, poll_ms, 5000)
                records = [r for tp in sorted(polled, key=lambda t: t.partition) for r in polled[tp]]
                if records:
                    # the index in a thread, chunk by chunk: requests wait for one chunk at most
                    await asyncio.to_thread(self.apply_store(records).apply_to, self.index)
                else:
                    self.caught_up = True
        finally:
            await asyncio.to_thread(consumer.close)
