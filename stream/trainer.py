"""The online trainer's Kafka side: micro-batches from ``training-samples``, published embeddings,
atomic checkpoints with the consumed offsets (DESIGN.md §5).

The learning itself (vectors, prequential scoring, optimizer step) is a :class:`model.learner.Learner`;
this module only moves bytes. The trainer assigns itself every partition (no consumer group: no
rebalance waits on Tansu, one trainer per topic) and owns its offsets: they live in the checkpoint,
next to the model that learned from exactly those samples. A restart loads the newest good
checkpoint and seeks to its offsets, so no batch is skipped or counted twice.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from tgastream.model.learner import Learner, StepOutput
from tgastream.state.checkpoint import load_latest, save_checkpoint, write_atomic
from tgastream.state.samples import CONVERSION, Sample
from tgastream.state.serving import ServingStore, VectorRecord
from tgastream.stream.replay import make_producer
from tgastream.core.settings import Settings

log = logging.getLogger("tgastream.trainer")

FRESHNESS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0)


@dataclass
class TrainerMetrics:
    """Prometheus metrics of the trainer (prefix ``tgastream_``), on its own registry."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.steps = Counter("tgastream_trainer_steps", "optimizer steps taken", registry=r)
        self.samples = Counter("tgastream_trainer_samples", "samples consumed", ["kind"], registry=r)
        self.bad_samples = Counter("tgastream_trainer_bad_samples", "undecodable sample records skipped", registry=r)
        self.step_seconds = Histogram("tgastream_trainer_step_seconds", "time of one micro-batch (score + step + publish)",
                                      registry=r, buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5))
        self.samples_per_s = Gauge("tgastream_trainer_samples_per_second", "samples/s over the last minute", registry=r)
        self.loss = Gauge("tgastream_trainer_loss", "training loss of the last step", registry=r)
        self.online = Gauge("tgastream_online_metric", "rolling prequential metric", ["metric"], registry=r)
        self.model_version = Gauge("tgastream_model_version", "model version (optimizer steps since start of training)", registry=r)
        self.published = Counter("tgastream_embeddings_published", "vectors published", ["kind"], registry=r)
        self.freshness = Histogram("tgastream_freshness_seconds", "event arrival at a worker → its user's vector published",
                                   registry=r, buckets=FRESHNESS_BUCKETS)
        self.checkpoint_age = Gauge("tgastream_checkpoint_age_seconds", "seconds since the last checkpoint", registry=r)
        self.idmap_size = Gauge("tgastream_idmap_size", "ids with an embedding row", ["kind"], registry=r)
        self.idmap_evictions = Gauge("tgastream_idmap_evictions", "id map rows evicted so far", ["kind"], registry=r)
        self.lag = Gauge("tgastream_trainer_lag", "samples on the topic not yet consumed (approximate on Tansu)", registry=r)


@dataclass
class TrainerRun:
    """Counters of one trainer process, also saved in checkpoints (so restarts continue them)."""

    samples: int = 0
    steps: int = 0
    published_users: int = 0
    published_items: int = 0
    freshness: list[float] = field(default_factory=list)  # recent values (bounded) for quantiles

    def note_freshness(self, values: list[float], keep: int = 20000) -> None:
        self.freshness.extend(values)
        del self.freshness[:-keep]

    def freshness_quantiles(self) -> tuple[float | None, float | None]:
        if not self.freshness:
            return None, None
        a = np.asarray(self.freshness)
        return float(np.quantile(a, 0.5)), float(np.quantile(a, 0.99))


def _newer_published(serving: ServingStore, user_id: str, event_ts: float) -> bool:
    """The user's published vector already reflects events after ``event_ts``: a vector from an
    older context (a conversion sample's, which ends at its click) must not replace it."""
    current = serving.user(user_id)
    return current is not None and current.event_ts > event_ts


def decode_samples(records: list, metrics: TrainerMetrics) -> list[Sample]:
    """Decode sample records; a record that does not decode is counted and skipped, never fatal."""
    out = []
    for r in records:
        try:
            out.append(Sample.from_bytes(r.value))
        except Exception:  # any corrupt bytes: the topic is ours, but a trainer must not die on one record
            metrics.bad_samples.inc()
    return out


class Trainer:
    """Consume → learn → publish → checkpoint, until stopped or idle."""

    def __init__(self, settings: Settings, bootstrap: str, learner: Learner, metrics: TrainerMetrics | None = None,
                 publish_every: int = 1, progress: Callable[[dict], None] | None = None) -> None:
        self.settings = settings
        self.bootstrap = bootstrap
        self.learner = learner
        self.metrics = metrics or TrainerMetrics()
        self.publish_every = max(1, publish_every)
        self.progress = progress
        self.dir = Path(settings.data_dir)
        self.ckpt_dir = self.dir / "checkpoints"
        self.run = TrainerRun()
        self.offsets: dict[int, int] = {}  # partition → next offset to consume
        self._stop = False
        self._last_ckpt = time.monotonic()
        self._recent: list[tuple[float, int]] = []  # (time, samples) for samples/s

    # -- lifecycle ---------------------------------------------------------------------------

    def stop(self, *_: object) -> None:
        self._stop = True

    def restore(self) -> bool:
        """Load the newest good checkpoint (model, optimizer, id maps, offsets, counters)."""
        ck = load_latest(self.ckpt_dir, on_bad=lambda p, e: log.warning("skipping unreadable checkpoint %s: %s", p, e))
        if ck is None:
            return False
        self.learner.load_state_dict(ck["learner"])
        self.offsets = {int(p): int(o) for p, o in ck["offsets"].items()}
        run = ck.get("run", {})
        self.run = TrainerRun(**{k: run[k] for k in ("samples", "steps", "published_users", "published_items") if k in run})
        log.info("resumed from checkpoint step %d at offsets %s", ck["step"], self.offsets)
        return True

    def checkpoint(self) -> Path:
        path = save_checkpoint(self.ckpt_dir, self.run.steps, {
            "learner": self.learner.state_dict(),
            "offsets": dict(self.offsets),
            "run": {"samples": self.run.samples, "steps": self.run.steps,
                    "published_users": self.run.published_users, "published_items": self.run.published_items},
        })
        self._last_ckpt = time.monotonic()
        self.learner.after_checkpoint(self.dir, self.run.steps)
        return path

    # -- loop --------------------------------------------------------------------------------

    def _consumer(self) -> tuple[KafkaConsumer, list[TopicPartition]]:
        consumer = KafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False, group_id=None,
                                 max_partition_fetch_bytes=8 * 1024 * 1024, fetch_max_wait_ms=100)
        deadline = time.monotonic() + 30
        parts = consumer.partitions_for_topic(self.settings.samples_topic)
        while not parts and time.monotonic() < deadline:
            time.sleep(0.2)
            parts = consumer.partitions_for_topic(self.settings.samples_topic)
        if not parts:
            raise RuntimeError(f"topic {self.settings.samples_topic} does not exist on {self.bootstrap}")
        tps = [TopicPartition(self.settings.samples_topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        begin = consumer.beginning_offsets(tps)
        for tp in tps:
            consumer.seek(tp, max(self.offsets.get(tp.partition, 0), begin[tp]))
        return consumer, tps

    def _next_batch(self, consumer: KafkaConsumer) -> list:
        """The next micro-batch: waits at most max_wait_s (from the first record) to gather
        batch_size records; beyond that takes only what has already arrived, up to burst ×
        batch_size (a trainer that fell behind catches up in big steps without waiting for more)."""
        limit = self.settings.batch_size * self.settings.burst
        records: list = []
        deadline = None
        while len(records) < limit and not self._stop:
            full = len(records) >= self.settings.batch_size
            timeout_ms = 0 if full else 100 if deadline is None else max(1, int((deadline - time.monotonic()) * 1000))
            polled = consumer.poll(timeout_ms, max_records=limit - len(records))
            got = 0
            for tp in sorted(polled, key=lambda t: t.partition):
                records.extend(polled[tp])
                got += len(polled[tp])
            if records and deadline is None:
                deadline = time.monotonic() + self.settings.max_wait_s
            if deadline is None:
                return records  # nothing yet: let the caller check idleness
            if (full and not got) or time.monotonic() >= deadline:
                break
        return records

    def serve_forever(self, idle_exit_s: float = 0.0, max_samples: int = 0) -> TrainerRun:
        """Run until stopped (SIGTERM/SIGINT), idle for ``idle_exit_s`` (0 = never) or ``max_samples``."""
        producer = make_producer(self.bootstrap, linger_ms=5)
        self.dir.mkdir(parents=True, exist_ok=True)
        serving = ServingStore(self.dir / "serving")
        self._history = open(self.dir / "trainer-history.jsonl", "a", buffering=1)
        consumer, tps = self._consumer()
        last_data = time.monotonic()
        try:
            while not self._stop:
                records = self._next_batch(consumer)
                now = time.monotonic()
                if not records:
                    self._housekeeping(consumer, tps)
                    if idle_exit_s and now - last_data >= idle_exit_s:
                        break
                    continue
                last_data = now
                self._step(records, producer, serving)
                self._housekeeping(consumer, tps)
                if max_samples and self.run.samples >= max_samples:
                    break
        finally:
            self.checkpoint()
            self.write_stats()
            producer.flush()
            producer.close()
            consumer.close()
            serving.close()
            self._history.close()
        return self.run

    def _step(self, records: list, producer: KafkaProducer, serving: ServingStore) -> None:
        t0 = time.perf_counter()
        samples = decode_samples(records, self.metrics)
        for r in records:
            self.offsets[r.partition] = max(self.offsets.get(r.partition, 0), r.offset + 1)
        if samples:
            # publish → score → learn: vectors go out before the optimizer step (fresher), and the
            # prequential score is of the model that made them (test-then-train)
            out = self.learner.vectors(samples)
            if self.run.steps % self.publish_every == self.publish_every - 1:
                self._publish(out, producer, serving)
            self.learner.score(samples, score_limit=self.settings.batch_size)
            out.loss = self.learner.learn(samples, train_limit=self.settings.batch_size)
            self.run.steps += 1
            self.run.samples += len(samples)
            conversions = sum(1 for s in samples if s.kind == CONVERSION)
            self.metrics.samples.labels("conversion").inc(conversions)
            self.metrics.samples.labels("retrieval").inc(len(samples) - conversions)
            self.metrics.steps.inc()
            self.metrics.loss.set(out.loss)
            self.metrics.model_version.set(self.learner.version)
        self.metrics.step_seconds.observe(time.perf_counter() - t0)
        now = time.monotonic()
        self._recent.append((now, len(samples)))
        self._recent = [(t, n) for t, n in self._recent if now - t <= 60]
        span = max(now - self._recent[0][0], 1e-3)
        self.metrics.samples_per_s.set(sum(n for _, n in self._recent) / span if len(self._recent) > 1 else 0.0)
        online = self.learner.online_metrics()
        for name, value in online.items():
            if value is not None:
                self.metrics.online.labels(name).set(value)
        self._history.write(json.dumps({"time": time.time(), "step": self.run.steps, "samples": self.run.samples,
                                        "loss": self.learner.last_loss, **online}) + "\n")

    def _publish(self, out: StepOutput, producer: KafkaProducer, serving: ServingStore) -> None:
        now = time.time()
        version = self.learner.version
        users = {u: VectorRecord(version, ev_ts, now, vec) for u, (vec, ev_ts) in out.users.items()
                 if u not in out.from_clicks or not _newer_published(serving, u, ev_ts)}
        items = {i: VectorRecord(version, now, now, vec) for i, vec in out.items.items()}
        serving.write(users, items, bought={u: b for u, b in out.bought.items() if u in users},
                      contexts={u: c for u, c in out.contexts.items() if u in users}, model_version=version)
        for u, rec in users.items():
            producer.send(self.settings.embeddings_topic, key=b"user:" + u.encode(), value=rec.to_bytes())
        for i, rec in items.items():
            producer.send(self.settings.embeddings_topic, key=b"item:" + i.encode(), value=rec.to_bytes())
        fresh = [now - arr for arr in out.arrivals]  # every event of the batch is in a vector now
        for f in fresh:
            self.metrics.freshness.observe(f)
        self.run.note_freshness(fresh)
        self.run.published_users += len(users)
        self.run.published_items += len(items)
        self.metrics.published.labels("user").inc(len(users))
        self.metrics.published.labels("item").inc(len(items))

    def _housekeeping(self, consumer: KafkaConsumer, tps: list[TopicPartition]) -> None:
        since = time.monotonic() - self._last_ckpt
        self.metrics.checkpoint_age.set(since)
        if self.run.steps and (since >= self.settings.checkpoint_every_s
                               or self.run.steps % self.settings.checkpoint_every_steps == 0 and since > 1.0):
            self.checkpoint()
            self.write_stats()
        for kind, size, ev in self.learner.idmap_stats():
            self.metrics.idmap_size.labels(kind).set(size)
            self.metrics.idmap_evictions.labels(kind).set(ev)
        try:
            ends = consumer.end_offsets(tps)
            self.metrics.lag.set(sum(max(0, ends[tp] - consumer.position(tp)) for tp in tps))
        except Exception:  # lag is informational; a metadata hiccup must not stop training
            pass
        if self.progress:
            self.progress(self.stats())

    def stats(self) -> dict:
        p50, p99 = self.run.freshness_quantiles()
        return {"samples": self.run.samples, "steps": self.run.steps, "model_version": self.learner.version,
                "published_users": self.run.published_users, "published_items": self.run.published_items,
                "online": self.learner.online_metrics(), "freshness_p50_s": p50, "freshness_p99_s": p99,
                "device": str(self.learner.device), "time": time.time()}

    def write_stats(self) -> None:
        write_atomic(self.dir / "trainer-stats.json", (json.dumps(self.stats(), indent=2) + "\n").encode())


def install_stop_handlers(trainer: Trainer) -> None:
    """SIGTERM and SIGINT finish the current batch, checkpoint and exit cleanly."""
    signal.signal(signal.SIGTERM, trainer.stop)
    signal.signal(signal.SIGINT, trainer.stop)
