"""The faust app of a stream worker: group membership, the state table, the batch pipeline.

faust gives the worker its consumer group (several workers share the partitions of
``behavior-events``), partition assignment co-partitioned with the state table's changelog,
recovery of state from the changelog after a crash or a rebalance, and offset commits. The
events topic is consumed through :mod:`stream.batch_consumer`: whole fetched batches go to
:class:`~stream.pipeline.Pipeline` instead of one faust event at a time.

Tansu settings (DESIGN.md §7): a short rebalance timeout (its JoinGroup waits the full timeout),
and no topic declaration by faust: every topic, the changelog included, is created explicitly
with the configured partition count before the app starts (:func:`worker_topics`).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faust

from tgastream.core.kafka_security import faust_args
from tgastream.state.store import StateStore, StoreConfig
from tgastream.stream.generations import Generations
from tgastream.stream.batch_consumer import BatchConsumer, BatchHandler, BatchTransport
from tgastream.stream.metrics import WorkerMetrics
from tgastream.stream.output import BatchedProducer
from tgastream.stream.pipeline import Pipeline, PipelineConfig, PipelineTotals
from tgastream.stream.processor import ProcessorConfig
from tgastream.core.settings import Settings
from tgastream.stream.topics import app_topics

TABLE_NAME = "user-state"


class WorkerApp(faust.App):
    """A faust App whose consumer hands the topics in ``batch_handlers`` over in whole batches."""

    def __init__(self, *args: Any, batch_handlers: dict[str, BatchHandler] | None = None, **kwargs: Any) -> None:
        self.batch_handlers: dict[str, BatchHandler] = dict(batch_handlers or {})
        super().__init__(*args, **kwargs)

    def _new_transport(self) -> BatchTransport:
        return BatchTransport(self.conf.broker_consumer, self)


def changelog_topic(settings: Settings) -> str:
    """faust's name for the state table's changelog: ``<group>-user-state-changelog``."""
    return f"{settings.consumer_group}-{TABLE_NAME}-changelog"


def worker_topics(settings: Settings) -> dict[str, dict[str, str]]:
    """Every topic a worker needs, with its configs (the changelog is compacted)."""
    topics = app_topics(settings)
    topics.pop(settings.embeddings_topic, None)
    topics[changelog_topic(settings)] = {"cleanup.policy": "compact"}
    return topics


def faust_config(settings: Settings, datadir: Path) -> dict[str, Any]:
    """faust settings of a worker (short rebalance timeout for Tansu, no web server, no declares)."""
    return dict(
        **faust_args(settings.bootstrap, settings.kafka_security),  # broker URLs and credentials
        datadir=str(datadir),
        store="memory://",
        topic_partitions=settings.partitions,
        topic_allow_declare=False,
        topic_disable_leader=True,
        broker_rebalance_timeout=settings.rebalance_timeout_s,
        broker_session_timeout=max(10.0, 3 * settings.rebalance_timeout_s),
        broker_heartbeat_interval=1.0,
        broker_commit_interval=1.0,
        broker_max_poll_records=settings.worker_batch,
        consumer_max_fetch_size=4 << 20,
        consumer_auto_offset_reset="earliest",
        stream_wait_empty=True,
        table_standby_replicas=settings.standby_replicas,
        web_enabled=False,
    )


@dataclass
class StreamWorker:
    """A configured (not yet started) worker: faust app, state store, pipeline, metrics, and the
    topic generations it was built for."""

    app: WorkerApp
    store: StateStore
    pipeline: Pipeline
    metrics: WorkerMetrics
    settings: Settings
    generations: Generations = field(default_factory=lambda: Generations(None, None))

    @property
    def consumer(self) -> BatchConsumer:
        return self.app.consumer  # type: ignore[return-value]

    async def start(self) -> None:
        """Start the pipeline (producer, persist loop), then the faust app (consumer, recovery)."""
        await self.pipeline.start(self.consumer)
        await self.app.start()

    async def stop(self) -> None:
        """Make processed work durable, let faust commit it, then stop everything."""
        try:
            if self.pipeline.failed is None:
                await self.pipeline.drain()
        finally:
            unblock = asyncio.ensure_future(self._unblock_group_close())
            try:
                await self.app.stop()
            finally:
                unblock.cancel()
            await self.pipeline.stop()
            self.store.close()

    async def _unblock_group_close(self, every_s: float = 0.5) -> None:
        """While faust stops: once the group coordinator is closing, fail any join it still
        waits on (:meth:`BatchConsumer.abort_join_if_closing`), again every ``every_s`` until the
        stop ends, so the stop never hangs on a group that is forming."""
        while True:
            await asyncio.sleep(every_s)
            self.consumer.abort_join_if_closing()


def build_worker(settings: Settings, data_dir: Path, metrics: WorkerMetrics | None = None,
                 store_options: StoreConfig | None = None, generations: Generations | None = None,
                 totals: PipelineTotals | None = None) -> StreamWorker:
    """Wire a worker for ``settings`` keeping its local state under ``data_dir``, for the topic
    ``generations`` it starts with (None: unknown, generation 0)."""
    metrics = metrics or WorkerMetrics()
    generations = generations or Generations(None, None)
    (data_dir / "faust").mkdir(parents=True, exist_ok=True)
    store = StateStore(data_dir / "state", TABLE_NAME, store_options, changelog_id=generations.changelog_id)
    config = PipelineConfig(
        events_topic=settings.events_topic, samples_topic=settings.samples_topic,
        dlq_topic=settings.dlq_topic, features_topic=settings.features_topic,
        changelog_topic=changelog_topic(settings),
        processor=ProcessorConfig(max_len=settings.max_len, sample_len=settings.sample_len,
                                  window_s=settings.conversion_window_s,
                                  max_cached_users=settings.worker_cache_users, topic=settings.events_topic),
        flush_s=settings.worker_flush_s,
        generation=generations.source,
    )
    producer = BatchedProducer(settings.bootstrap, client_id=f"{settings.consumer_group}-worker",
                               security=settings.kafka_security)
    pipeline = Pipeline(config, store, producer, metrics, totals)
    app = WorkerApp(settings.consumer_group, batch_handlers={settings.events_topic: pipeline.handle},
                    **faust_config(settings, data_dir / "faust"))
    from tgastream.stream.table_store import StateTable

    table = StateTable(app, state=store, on_partitions_changed=pipeline.on_partitions_changed,
                       generation=generations.source if generations.events_id else None,
                       name=TABLE_NAME, partitions=settings.partitions, beacon=app.tables.beacon,
                       help="per-user graph, pending labels, features and last source offset")
    app.tables.add(table)
    app.topics.add(app.topic(settings.events_topic, key_type=bytes, value_type=bytes,
                             key_serializer="raw", value_serializer="raw", partitions=settings.partitions))
    return StreamWorker(app, store, pipeline, metrics, settings, generations)
