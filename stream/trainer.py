"""The online trainer's Kafka side: micro-batches from ``training-samples``, published embeddings,
atomic checkpoints with the trained offsets (DESIGN.md §5).

The learning itself (vectors, prequential scoring, optimizer step) is a :class:`model.learner.Learner`;
this module only moves bytes. The trainer assigns itself every partition (no consumer group: no
rebalance waits on Tansu, one trainer per topic) and owns its offsets: they live in the checkpoint,
next to the model that learned from exactly those samples.

Two positions per partition, ``train_policy`` ``all`` (the default): the *head* consumer reads the
newest samples, and their users' and items' vectors are published at once; the *training* consumer
follows behind and, one step of at most ``batch_size`` per loop, scores each new sample with the
model as it is (prequential: test, then train) and trains on it, once. A trainer that is slower than the stream lets
training lag (``tgastream_trainer_backlog``) while publishing stays fresh. With ``bounded`` a step
trains a random ``batch_size`` of what the head read and the rest is never trained (its share is
reported). Either way a re-delivered sample (same identity as one already trained, e.g. re-emitted
by a worker after a failover) is skipped (:class:`state.samples.RedeliveryGuard`), and a restart
resumes from the checkpoint's trained offsets with its guard and trained log (stream/trained_log.py).

Data-parallel ranks (the learner's ``group`` has more than one rank; started by torchrun): rank r
consumes the partitions p with p % world == r, keeps its files in ``data_dir/rank-<r>`` and
publishes its own users' vectors; every rank runs every loop iteration (the learner's row sync
and optimizer step are collectives, taken with or without samples) and the iteration ends with
one all-reduce of votes (stream/ranks.py), so all ranks stop, idle-exit and checkpoint together.
A checkpoint is each rank's part plus rank 0's model file, written after every part
(state/rank_checkpoint.py); a restart resumes from the newest complete one.
"""

from __future__ import annotations

import json
import logging
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np
import torch
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from tgastream.core.kafka_security import kafka_python_args
from kafka.errors import KafkaError
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from tgastream.model.clicktime import Predictions
from tgastream.model.distributed import Group, Solo, sync_rows
from tgastream.model.drift import LossDrift
from tgastream.model.guardrails import Event, Guardrails
from tgastream.model.inference import IncompatibleCheckpoint
from tgastream.model.metrics import reliability
from tgastream.model.learner import Learner, StepOutput
from tgastream.state.checkpoint import load_latest, save_checkpoint, write_atomic
from tgastream.state.rank_checkpoint import load_step, newest_loadable, prune_parts, save_part
from tgastream.state.graph import UserGraph
from tgastream.state.samples import CLICK, CONVERSION, RedeliveryGuard, Sample
from tgastream.state.serving import ServingStore, VectorRecord
from tgastream.core.settings import Settings
from tgastream.stream.configs import guardrails_config
from tgastream.stream.deadline import StopDeadline
from tgastream.stream.generations import topic_ids
from tgastream.stream.publisher import LatestModel, PublishingThread, send_tombstones, send_vectors
from tgastream.stream.ranks import Votes, agree, owned, rank_dir
from tgastream.stream.replay import make_producer
from tgastream.stream.republish import Published
from tgastream.stream.trained_log import TrainedLog

log = logging.getLogger("tgastream.trainer")

T = TypeVar("T")

GIL_SWITCH_S = 0.0005
"""Python's thread switch interval while publishing and training run in two threads (see
:meth:`Trainer._threaded_loop`)."""

VECTOR_PRODUCER = dict(linger_ms=5, enable_idempotence=False, max_in_flight_requests_per_connection=1)
"""The embeddings producer: acks=all and retries, in order, without idempotence. Measured: after
a Tansu restart kafka-python's idempotent producer asks for a new producer id, gets UnknownError
and aborts every later batch (every vector lost, only logged); vectors are keyed and versioned, so
a retried duplicate is harmless, and one request in flight keeps a retry from overtaking newer ones."""

IDLE_GENERATION_CHECK_S = 5.0
"""While no sample arrives, how often the trainer asks whether the samples topic was re-created."""

PROGRESS_EVERY_S = 0.5
"""How often the progress callback gets :meth:`Trainer.stats` (a full snapshot: rolling AUC/GAUC,
quantiles, reliability). Built after every step it took ~5% of the training thread (py-spy, the
demo's stream at 1,000 events/s)."""

FRESHNESS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0)


@dataclass
class TrainerMetrics:
    """Prometheus metrics of the trainer (prefix ``tgastream_``), on its own registry."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.steps = Counter("tgastream_trainer_steps", "optimizer steps taken", registry=r)
        self.samples = Counter("tgastream_trainer_samples", "samples consumed (read by the head: published, scored)",
                               ["kind"], registry=r)
        self.trained = Counter("tgastream_trainer_samples_trained",
                               "new samples that reached an optimizer step (each once)", registry=r)
        self.replayed = Counter("tgastream_trainer_samples_replayed",
                                "reservoir samples mixed into optimizer steps (not new)", registry=r)
        self.redelivered = Counter("tgastream_trainer_samples_redelivered",
                                   "samples skipped because one of the same identity was trained already", registry=r)
        self.backlog = Gauge("tgastream_trainer_backlog", "samples consumed, not yet trained", registry=r)
        self.trained_share = Gauge("tgastream_trainer_trained_share", "trained / consumed samples", registry=r)
        self.drift = Counter("tgastream_drift_detected", "changes in the training loss found by ADWIN", registry=r)
        self.republished = Counter("tgastream_embeddings_republished",
                                   "vectors published again with a newer model (one embedding space)", ["kind"],
                                   registry=r)
        self.version_lag = Gauge("tgastream_published_version_lag",
                                 "model versions the oldest vector still published is behind the current model",
                                 registry=r)
        self.generations = Counter("tgastream_topic_generations_total",
                                   "topics found re-created (a new generation) while running", ["topic"], registry=r)
        self.bad_samples = Counter("tgastream_trainer_bad_samples", "undecodable sample records skipped", registry=r)
        self.step_seconds = Histogram("tgastream_trainer_step_seconds", "time of one micro-batch (score + step + publish)",
                                      registry=r, buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5))
        self.samples_per_s = Gauge("tgastream_trainer_samples_per_second", "samples/s over the last minute", registry=r)
        self.loss = Gauge("tgastream_trainer_loss", "training loss of the last step", registry=r)
        self.train_seconds = Counter("tgastream_trainer_train_seconds", "seconds spent in training steps (the "
                                     "trainer's capacity: samples trained / these seconds)", registry=r)
        self.online = Gauge("tgastream_online_metric", "rolling prequential metric of the online model, and of the "
                            "baseline (last good checkpoint) and repeat-recent scored on the same samples",
                            ["model", "metric"], registry=r)
        self.rollbacks = Counter("tgastream_trainer_rollbacks", "rollbacks to the last good model (guard trips and pins)",
                                 registry=r)
        self.guard_deficit = Gauge("tgastream_guard_deficit", "baseline minus online over the guard's paired window",
                                   ["metric"], registry=r)
        self.serving_version = Gauge("tgastream_serving_model_version",
                                     "model version of the vectors published now (the good one while rolled back)",
                                     registry=r)
        self.rolled_back = Gauge("tgastream_model_rolled_back", "1 while publishing from a rolled-back or pinned model",
                                 registry=r)
        self.model_version = Gauge("tgastream_model_version", "model version (optimizer steps since start of training)", registry=r)
        self.published = Counter("tgastream_embeddings_published", "vectors published", ["kind"], registry=r)
        self.tombstones = Counter("tgastream_item_tombstones", "evicted items' vectors deleted from serving "
                                  "(tombstones on the embeddings topic)", registry=r)
        self.freshness = Histogram("tgastream_freshness_seconds", "event arrival at a worker → its user's vector published",
                                   registry=r, buckets=FRESHNESS_BUCKETS)
        self.checkpoint_age = Gauge("tgastream_checkpoint_age_seconds", "seconds since the last checkpoint", registry=r)
        self.idmap_size = Gauge("tgastream_idmap_size", "ids with an embedding row", ["kind"], registry=r)
        self.idmap_evictions = Gauge("tgastream_idmap_evictions", "id map rows evicted so far", ["kind"], registry=r)
        self.clicktime = Gauge("tgastream_clicktime_predictions", "click-time P(buy) predictions: pending (label "
                               "not yet known), joined to a label, evicted unlabelled (store full), unmatched "
                               "(a label whose prediction was lost: not scored), predicted (in all), in_step (of them, predicted by "
                               "their training step: no prediction from the publishing forward), snapshot (of them, predicted by the "
                               "conversion snapshot: conversion_snapshot_steps)", ["state"], registry=r)
        self.lag = Gauge("tgastream_trainer_lag", "samples on the topic not yet consumed (approximate on Tansu)", registry=r)


@dataclass
class TrainerRun:
    """Counters of one trainer process, also saved in checkpoints (so restarts continue them)."""

    samples: int = 0  # consumed by the head (published, scored)
    steps: int = 0
    trained: int = 0  # new samples that reached an optimizer step
    replayed: int = 0  # reservoir samples mixed into steps
    redelivered: int = 0  # skipped as already trained
    published_users: int = 0
    published_items: int = 0
    freshness: list[float] = field(default_factory=list)  # recent values (bounded) for quantiles
    version_lags: list[int] = field(default_factory=list)  # newest model version − published vector's (recent)

    COUNTERS = ("samples", "steps", "trained", "replayed", "redelivered", "published_users", "published_items")

    def counters(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.COUNTERS}

    @property
    def trained_share(self) -> float | None:
        return self.trained / self.samples if self.samples else None

    def note_freshness(self, values: list[float], keep: int = 20000) -> None:
        self.freshness.extend(values)
        del self.freshness[:-keep]

    def note_version_lag(self, lag: int, n: int, keep: int = 20000) -> None:
        self.version_lags.extend([lag] * n)
        del self.version_lags[:-keep]

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


def _reliability(learner: Learner) -> list[dict]:
    """Reliability bins (10, equal-mass) of the learner's click-time predictions in its rolling window."""
    m = getattr(learner, "metrics", None)
    if m is None or not hasattr(m, "conv_scores"):
        return []
    return reliability(np.asarray(m.conv_labels), np.asarray(m.conv_scores), 10)


def train_size(batch_size: int, catchup_batches: int, behind: int) -> int:
    """Samples a training step takes: ``batch_size``, or while more than one batch is waiting
    behind the head up to ``catchup_batches`` batches of it. A step's work grows with its samples
    but its overhead does not (the scoring caps, the guard's shadow and verdict, the inference
    copy's refresh, metrics, the GIL hand-overs with the publishing thread), so a trainer that is
    behind catches up in fewer, larger steps. Default 2: fewer steps cost calibration unless the
    conversion head starts at its base rate (``conversion_base_rate``, docs/trainer-performance.md)."""
    if behind <= batch_size:
        return batch_size
    return min(behind, catchup_batches * batch_size)


def republish_rate_now(rate: float, behind_share: float, behind: int, batch_size: int) -> float:
    """Vectors per second the re-publish sweep may publish now: ``rate``, or ``behind_share`` of
    it while training is more than one batch behind the head. The sweep's encoding and producing
    share the process (and the GIL) with the training step: measured, a full-rate sweep cost
    about a third of one rank's capacity at 1,000 events/s; training comes first, and the sweep
    takes its full rate again once the trainer has caught up."""
    return float(rate) * (behind_share if behind > batch_size else 1.0)


def decode_samples(records: list, metrics: TrainerMetrics, count_bad: bool = True) -> list[Sample]:
    """Decode sample records; a record that does not decode is counted (once: by the head) and
    skipped, never fatal."""
    out = []
    for r in records:
        try:
            out.append(Sample.from_bytes(r.value))
        except Exception:  # any corrupt bytes: the topic is ours, but a trainer must not die on one record
            if count_bad:
                metrics.bad_samples.inc()
    return out


class Trainer:
    """Consume → publish → score → learn → checkpoint, until stopped or idle.

    One process with ``train_policy`` all: two threads. The publishing thread reads the head,
    gives new ids rows (under ``rows.lock``) and publishes vectors with the newest inference copy
    of the serving model (:class:`stream.publisher.LatestModel`), re-publishes stale ones, and
    never waits for a training step; the training thread (the caller's) trains behind the head,
    puts a fresh copy after every step, checkpoints and decides when to stop. Their shared state
    (head positions, the re-publish ledger, the run's counters) is behind ``_lock``. Ranks and
    ``bounded`` keep one thread in lockstep (the row sync and the step are collectives there)."""

    def __init__(self, settings: Settings, bootstrap: str, learner: Learner, metrics: TrainerMetrics | None = None,
                 publish_every: int = 1, progress: Callable[[dict], None] | None = None) -> None:
        self.settings = settings
        self.bootstrap = bootstrap
        self.security = settings.kafka_security  # TLS/SASL of every client of the trainer
        self.learner = learner
        self.metrics = metrics or TrainerMetrics()
        self.publish_every = max(1, publish_every)
        self.progress = progress
        self.group: Group = getattr(learner, "group", None) or Solo()
        self.dir = rank_dir(Path(settings.data_dir), self.group)
        self.ckpt_dir = settings.checkpoints
        self.run = TrainerRun()
        self.offsets: dict[int, int] = {}  # partition → next offset to train (the checkpoint's)
        self.head: dict[int, int] = {}  # partition → next offset to publish (≥ offsets)
        self.guard = RedeliveryGuard()  # samples trained (the training thread's)
        self.head_guard = RedeliveryGuard()  # clicks predicted at the head (the publishing thread's)
        self.published = Published()  # what the re-publish sweep may refresh
        self._evicted: list[str] = []  # items the training thread evicted, for the publisher to delete
        self.drift = LossDrift(settings.drift_delta)
        # with ranks: pooled shadow cases, rank 0 decides, every rank takes the decision
        self.guardrails = Guardrails(guardrails_config(settings), learner, self.ckpt_dir,  # type: ignore[arg-type]
                                     group=self.group)
        self._restored_version: int | None = None
        self._last_republish = time.monotonic()
        self.trained_log = TrainedLog(self.dir / "trained-samples.log")
        self.rng = random.Random(settings.seed)
        self.samples_topic_id: str | None = None
        self._stop = False
        self._last_ckpt = time.monotonic()
        self._last_progress = 0.0
        self._last_batch_at = time.monotonic()
        self._last_idle_check = self._last_batch_at
        self._head_batches = 0
        self._recent: list[tuple[float, int]] = []  # (time, samples) for samples/s
        # publishing apart from training (one process, train_policy all): see the class docstring
        self._lock = threading.RLock()
        self.latest = LatestModel()
        self._threaded = False
        self._halt = threading.Event()  # the training thread ends the publishing thread
        self._generation_reset = False  # set by the publishing thread: the training thread rewinds
        self._last_data = time.monotonic()  # publishing thread: when it last read records
        self._twin_gen = torch.Generator().manual_seed(settings.seed + 1)  # fresh rows of the copy's tables

    # -- lifecycle ---------------------------------------------------------------------------

    def stop(self, *_: object) -> None:
        self._stop = True

    @property
    def bounded(self) -> bool:
        return self.settings.train_policy == "bounded"

    def restore(self) -> bool:
        """Load the newest good checkpoint (model, optimizer, id maps, trained offsets, guard, counters)."""
        if self.group.distributed:
            return self._restore_ranks()
        ck = load_latest(self.ckpt_dir, on_bad=lambda p, e: log.warning("skipping unreadable checkpoint %s: %s", p, e))
        if ck is None:
            self.trained_log.truncate(0)  # nothing trained survives without a checkpoint
            return False
        if ck.get("world", 1) != 1:
            raise IncompatibleCheckpoint(f"was written by {ck['world']} ranks; resume it with as many "
                                         f"(tgastream train --nproc {ck['world']})")
        self.learner.load_state_dict(ck["learner"])
        self.offsets = {int(p): int(o) for p, o in ck["offsets"].items()}
        self.head = dict(self.offsets)  # what was published after the checkpoint is published again
        self.guard = RedeliveryGuard.from_state_dict(ck.get("guard", {}))
        self.head_guard = RedeliveryGuard(self.guard.seen)  # the head reads again from the trained offsets
        self.trained_log.truncate(int(ck.get("trained_log_bytes", 0)))
        self.samples_topic_id = ck.get("samples_topic_id")
        run = ck.get("run", {})
        self.run = TrainerRun(**{k: run[k] for k in TrainerRun.COUNTERS if k in run})
        self._restored_version = self.learner.version
        log.info("resumed from checkpoint step %d at offsets %s", ck["step"], self.offsets)
        return True

    def checkpoint(self) -> Path:
        if self.group.distributed:
            return self._checkpoint_ranks()
        path = save_checkpoint(self.ckpt_dir, self.run.steps, {
            "learner": self.learner.state_dict(),
            "offsets": dict(self.offsets),
            "guard": self.guard.state_dict(),
            "trained_log_bytes": self.trained_log.size(),
            "samples_topic_id": self.samples_topic_id,
            # consumed as of the trained offsets: the head's lead is read (and counted) again on a restart
            "run": self._consumed_counters(),
        }, protect=self.guardrails.protected_files())
        self._last_ckpt = time.monotonic()
        self.guardrails.after_checkpoint(path, self.run.steps, self.learner.online_metrics())
        self.learner.after_checkpoint(self.dir, self.run.steps)
        return path

    def _consumed_counters(self) -> dict[str, int]:
        """The run's counters as of the trained offsets: the head's lead is read (and counted)
        again on a restart. Read together, under the lock the publishing thread updates them under."""
        with self._lock:
            return {**self.run.counters(), "samples": self.run.samples - self.backlog()}

    def _rank_part(self) -> dict:
        """What this rank alone knows: its partitions' offsets, guard, trained log, learner part."""
        return {"offsets": dict(self.offsets), "guard": self.guard.state_dict(),
                "trained_log_bytes": self.trained_log.size(), "samples_topic_id": self.samples_topic_id,
                "run": self._consumed_counters(),
                "learner_rank": self.learner.rank_state_dict()}

    def _checkpoint_ranks(self) -> Path:
        """Every rank writes its part; after all did (an all-reduce of 'written'), rank 0 writes
        the model file that makes the checkpoint complete (state/rank_checkpoint.py)."""
        g, step = self.group, self.run.steps
        written = 0.0
        try:
            save_part(self.ckpt_dir, step, g.rank, g.world, self._rank_part())
            written = 1.0
        except OSError as exc:
            log.error("rank %d could not write its checkpoint part: %s", g.rank, exc)
        complete = g.all_sum(torch.tensor([written], dtype=torch.float64))[0] == g.world
        path = self.ckpt_dir / f"ckpt-{step:012d}.pt"
        if complete and g.rank == 0:
            path = save_checkpoint(self.ckpt_dir, step, {"learner": self.learner.state_dict(), "world": g.world},
                                   protect=self.guardrails.protected_files())
            self.guardrails.after_checkpoint(path, step, self.learner.online_metrics())  # rank 0 keeps the registry
        prune_parts(self.ckpt_dir, g.rank, current=step)
        self._last_ckpt = time.monotonic()
        self.learner.after_checkpoint(self.dir, step)
        return path

    def _restore_ranks(self) -> bool:
        """All ranks resume from the newest checkpoint complete for every one of them (the
        oldest of the ranks' newest loadable), or all start afresh."""
        g = self.group
        mine = newest_loadable(self.ckpt_dir, g.rank, g.world)
        step = -int(g.all_max(torch.tensor([-mine], dtype=torch.float64))[0])  # min over ranks
        if step < 0:
            newest = load_latest(self.ckpt_dir)
            if newest is not None and newest.get("world", 1) != g.world:
                raise IncompatibleCheckpoint(f"was written by {newest.get('world', 1)} rank(s); resume it with as "
                                             f"many (tgastream train --nproc {newest.get('world', 1)})")
            self.trained_log.truncate(0)
            return False
        model, part = load_step(self.ckpt_dir, step, g.rank, g.world)
        self.learner.load_state_dict(model["learner"])
        self.learner.load_rank_state_dict(part["learner_rank"])
        self._restored_version = self.learner.version  # the guard's lineage (and a restored bad version) on restart
        self.offsets = {int(p): int(o) for p, o in part["offsets"].items()}
        self.head = dict(self.offsets)
        self.guard = RedeliveryGuard.from_state_dict(part.get("guard", {}))
        self.head_guard = RedeliveryGuard(self.guard.seen)
        self.trained_log.truncate(int(part.get("trained_log_bytes", 0)))
        self.samples_topic_id = part.get("samples_topic_id")
        run = part.get("run", {})
        self.run = TrainerRun(**{k: run[k] for k in TrainerRun.COUNTERS if k in run})
        log.info("rank %d/%d resumed from checkpoint step %d at offsets %s", g.rank, g.world, step, self.offsets)
        return True

    # -- consumers ---------------------------------------------------------------------------

    def _consumer(self, positions: dict[int, int]) -> tuple[KafkaConsumer, list[TopicPartition]]:
        """A consumer of every samples partition, at ``positions`` (else the beginning)."""
        consumer = KafkaConsumer(**kafka_python_args(
            self.bootstrap, self.security, enable_auto_commit=False, group_id=None,
            auto_offset_reset="earliest",  # a position past the end: a re-created topic
            max_partition_fetch_bytes=8 * 1024 * 1024, fetch_max_wait_ms=100))
        deadline = time.monotonic() + 30
        parts = consumer.partitions_for_topic(self.settings.samples_topic)
        while not parts and time.monotonic() < deadline:
            time.sleep(0.2)
            parts = consumer.partitions_for_topic(self.settings.samples_topic)
        if not parts:
            raise RuntimeError(f"topic {self.settings.samples_topic} does not exist on {self.bootstrap}")
        tps = [TopicPartition(self.settings.samples_topic, p) for p in owned(sorted(parts), self.group)]
        consumer.assign(tps)
        self._seek(consumer, tps, positions)
        return consumer, tps

    @staticmethod
    def _seek(consumer: KafkaConsumer, tps: list[TopicPartition], positions: dict[int, int]) -> None:
        begin = consumer.beginning_offsets(tps)
        for tp in tps:
            consumer.seek(tp, max(positions.get(tp.partition, 0), begin[tp]))

    def _next_batch(self, consumer: KafkaConsumer, wait: bool = True) -> list:
        """The next micro-batch: waits at most max_wait_s (from the first record) to gather
        batch_size records; beyond that takes only what has already arrived, up to burst ×
        batch_size (a trainer that fell behind catches up in big steps without waiting for more).
        ``wait`` False: only what has arrived (training has a backlog to work on meanwhile)."""
        limit = self.settings.batch_size * self.settings.burst
        records: list = []
        deadline = None
        while len(records) < limit and not self._stop:
            full = len(records) >= self.settings.batch_size
            idle_ms = 100 if wait else 0
            timeout_ms = 0 if full else idle_ms if deadline is None else max(1, int((deadline - time.monotonic()) * 1000))
            polled = consumer.poll(timeout_ms, max_records=limit - len(records))
            got = 0
            for tp in sorted(polled, key=lambda t: t.partition):
                records.extend(polled[tp])
                got += len(polled[tp])
            if records and deadline is None:
                deadline = time.monotonic() + (self.settings.max_wait_s if wait else 0.0)
            if deadline is None:
                return records  # nothing yet: let the caller check idleness
            if (full and not got) or time.monotonic() >= deadline:
                break
        return records

    # -- loop --------------------------------------------------------------------------------

    def serve_forever(self, idle_exit_s: float = 0.0, max_samples: int = 0) -> TrainerRun:
        """Run until stopped (SIGTERM/SIGINT), idle for ``idle_exit_s`` (0 = never) or ``max_samples``
        consumed (and, with ``train_policy`` all, trained)."""
        producer = self._until_connected(lambda: make_producer(self.bootstrap, self.security, **VECTOR_PRODUCER),
                                         "the producer")
        self.dir.mkdir(parents=True, exist_ok=True)
        serving = ServingStore(self.dir / "serving")
        self._history = open(self.dir / "trainer-history.jsonl", "a", buffering=1)
        self._check_samples_generation()
        self._on_guard(self.guardrails.start(self._restored_version))
        head, tps = self._until_connected(lambda: self._consumer(self.head or self.offsets), "the head consumer")
        trainer = None if self.bounded else \
            self._until_connected(lambda: self._consumer(self.offsets)[0], "the training consumer")
        clean = False  # ranks: the final checkpoint is a collective, taken only when all left the loop together
        publisher: PublishingThread | None = None
        try:
            if self.group.distributed:
                self._rank_loop(head, trainer, tps, producer, serving, idle_exit_s, max_samples)
            elif trainer is not None:
                publisher = PublishingThread(lambda: self._publish_loop(head, tps, producer, serving, max_samples))
                self._threaded_loop(publisher, trainer, idle_exit_s, max_samples)
            else:
                self._loop(head, trainer, tps, producer, serving, idle_exit_s, max_samples)
            clean = True
        finally:
            self._halt.set()
            if publisher is not None and publisher.is_alive():
                publisher.join(timeout=max(5.0, self.settings.stop_timeout_s))
            with StopDeadline(self.settings.stop_timeout_s, "trainer"):  # the checkpoint is local; Kafka may be gone
                if clean or not self.group.distributed:
                    self.checkpoint()
                self.write_stats()
                if publisher is None or not publisher.is_alive():
                    self._send_tombstones(producer, serving)  # evicted in the last steps
                producer.flush(timeout=max(1.0, self.settings.stop_timeout_s / 2))
                producer.close(timeout=1.0)
                head.close()
                if trainer is not None:
                    trainer.close()
                serving.close()
                self._history.close()
                self.trained_log.close()
        return self.run

    def _loop(self, head: KafkaConsumer, trainer: KafkaConsumer | None, tps: list[TopicPartition],
              producer: KafkaProducer, serving: ServingStore, idle_exit_s: float, max_samples: int) -> None:
        """One process: publish what arrives, train behind it, until stopped or idle."""
        last_data = time.monotonic()
        while not self._stop:
            backlog = self.backlog()
            records = [] if max_samples and self.run.samples >= max_samples else \
                self._next_batch(head, wait=not backlog)
            now = time.monotonic()
            if not self._same_generation(head, trainer, tps, records):
                records = []
            if records:
                last_data = now
                self._head_step(records, producer, serving)
            if trainer is not None and self.backlog():
                last_data = now
                self._train_step(trainer)
            if self.settings.republish_rate:
                self._republish(producer, serving)
            self._send_tombstones(producer, serving)
            self._housekeeping(head, tps)
            if not records and not self.backlog():
                if idle_exit_s and now - last_data >= idle_exit_s:
                    break
                if max_samples and self.run.samples >= max_samples:
                    break

    def _threaded_loop(self, publisher: PublishingThread, trainer: KafkaConsumer, idle_exit_s: float,
                       max_samples: int) -> None:
        """The training thread of one process: train behind the publishing thread's head, hand it
        a fresh copy of the weights after every step, keep house, until stopped or idle."""
        self._threaded = True
        self._put_latest()
        # The two threads share the GIL: a training step calls ~500 torch ops, each waits for the
        # GIL when the publishing thread runs Python (decoding, batching, producing), by default up
        # to 5 ms each: measured, steps of ~2.5 s while publishing at 2,000 events/s. A 0.5 ms
        # switch interval bounds that wait (both threads still make progress).
        switch = sys.getswitchinterval()
        sys.setswitchinterval(min(switch, GIL_SWITCH_S))
        publisher.start()
        try:
            self._train_behind(publisher, trainer, idle_exit_s, max_samples)
        finally:
            sys.setswitchinterval(switch)

    def _train_behind(self, publisher: PublishingThread, trainer: KafkaConsumer, idle_exit_s: float,
                      max_samples: int) -> None:
        tps = sorted(trainer.assignment(), key=lambda t: t.partition)
        last_step = time.monotonic()
        while not self._stop:
            publisher.check()
            if self._generation_reset:  # the samples topic was re-created: train it from its beginning
                with self._lock:
                    self._generation_reset = False
                    self.offsets = {}
                self._seek(trainer, tps, {})
            if self.backlog():
                self._train_step(trainer, wait=False)
                last_step = time.monotonic()
            else:
                self._halt.wait(0.02)  # nothing to train: the publisher reads on
            self._housekeeping(None, tps)
            now = time.monotonic()
            if not self.backlog():
                # idle: leave once the sweep has re-sent what older weights made (a trainer far behind
                # ends its last step long after the last record), or after idle_exit_s more of trying
                if idle_exit_s and now - self._last_data >= idle_exit_s \
                        and (self._swept() or now - last_step >= idle_exit_s):
                    break
                if max_samples and self.run.samples >= max_samples:
                    break
        publisher.check()

    def _swept(self) -> bool:
        """Whether every vector published is from the serving model now (or nothing re-publishes)."""
        if not self.settings.republish_rate:
            return True
        with self._lock:
            return self.published.version_lag(self.serving_version) == 0

    def _publish_loop(self, head: KafkaConsumer, tps: list[TopicPartition], producer: KafkaProducer,
                      serving: ServingStore, max_samples: int) -> None:
        """The publishing thread: read the head, publish its vectors with the newest weights,
        re-publish stale vectors, until the training thread halts it."""
        last_lag = 0.0
        while not self._halt.is_set() and not self._stop:
            records = [] if max_samples and self.run.samples >= max_samples else self._next_batch(head)
            if not self._same_generation(head, None, tps, records):
                records = []
            if records:
                self._last_data = time.monotonic()
                self._publish_step(records, producer, serving)
            elif max_samples and self.run.samples >= max_samples:
                self._halt.wait(0.05)
            if self.settings.republish_rate:
                self._republish(producer, serving)
            self._send_tombstones(producer, serving)
            if time.monotonic() - last_lag >= 1.0:
                last_lag = time.monotonic()
                self._note_lag(head, tps)

    def _publish_step(self, records: list, producer: KafkaProducer, serving: ServingStore) -> None:
        """Publishing thread: rows for the batch's new ids, their vectors with the newest copy of
        the weights (never waiting for a step in progress), published; the head moves on."""
        t0 = time.perf_counter()
        samples = decode_samples(records, self.metrics)
        if samples:
            rows = self.learner.rows  # type: ignore[attr-defined]
            with rows.lock:
                sync_rows(self.group, rows, samples)
            new = self._new_clicks(samples)
            with self.latest.use() as twin:
                # rows beyond the copy's tables: grown in the copy (fresh rows; the next copy has the learner's)
                rows.grow_tables(twin.model, None, self._twin_gen)
                out = twin.vectors(samples, clicks_later=True)
                version = twin.version
                if self.latest.copied_from(twin, self.learner):  # (not the good model's while rolled back)
                    self._hand_over(out.clicks, new)  # the clicks that share a user's row: from this forward
            self._head_batches += 1
            if self._head_batches % self.publish_every == 0:
                self._publish(out, producer, serving, version)
            if out.later_clicks:  # the other clicks once the vectors are out (freshness first), newest weights
                with self.latest.use() as twin:
                    rows.grow_tables(twin.model, None, self._twin_gen)
                    if self.latest.copied_from(twin, self.learner):
                        self._hand_over(twin.click_predictions(out.later_clicks), new)
            self._count_kinds(samples)
        with self._lock:
            for r in records:
                self.head[r.partition] = max(self.head.get(r.partition, 0), r.offset + 1)
            self.run.samples += len(samples)
        self.metrics.step_seconds.observe(time.perf_counter() - t0)
        self._note_rate(len(samples))

    def _new_clicks(self, samples: list[Sample]) -> set[int]:
        """The ids of the batch's clicks the head has not seen before, in stream order (the head's
        own :class:`RedeliveryGuard`, ahead of the training one)."""
        return {id(s) for s in samples if s.kind == CLICK and self.head_guard.admit(s)}

    def _hand_over(self, predictions: Predictions | None, new: set[int]) -> None:
        """The clicks' click-time P(buy) from the head's forward, to the learner (their training
        step needs no row for them: model/online.py). Only ``new`` clicks (:meth:`_new_clicks`):
        a re-delivered click's first copy was predicted, and a second prediction made after its
        label joined would wait in the store for ever."""
        if predictions is None:
            return
        keep = [k for k, c in enumerate(predictions.clicks) if id(c) in new]
        if keep:
            self.learner.note_predictions(Predictions([predictions.clicks[k] for k in keep],
                                                      predictions.probs[keep], predictions.version))

    def _count_kinds(self, samples: list[Sample]) -> None:
        """The head's samples by kind, into ``tgastream_trainer_samples``."""
        conversions = sum(1 for s in samples if s.kind == CONVERSION)
        clicks = sum(1 for s in samples if s.kind == CLICK)
        self.metrics.samples.labels("conversion").inc(conversions)
        self.metrics.samples.labels("click").inc(clicks)
        self.metrics.samples.labels("retrieval").inc(len(samples) - conversions - clicks)

    def _put_latest(self) -> None:
        """Training thread: an inference copy of the serving model (the online learner, or the
        good model while rolled back) for the publishing thread."""
        self.latest.put(self.guardrails.serving, self.guardrails.serving_version)

    def _rank_loop(self, head: KafkaConsumer, trainer: KafkaConsumer | None, tps: list[TopicPartition],
                   producer: KafkaProducer, serving: ServingStore, idle_exit_s: float, max_samples: int) -> None:
        """Data-parallel ranks: every iteration, on every rank, a head step (row sync: a
        collective), a training step (a collective, with or without samples) and one all-reduce
        of votes; stop, idle exit, checkpoints and ``max_samples`` (over all ranks) follow the
        agreed sums, so no rank leaves a collective the others are in."""
        last_data = time.monotonic()
        total_samples = 0
        while True:
            backlog = self.backlog()
            records = [] if max_samples and total_samples >= max_samples else \
                self._next_batch(head, wait=not backlog)
            if not self._same_generation(head, trainer, tps, records):
                records = []
            self._head_step(records, producer, serving)
            if trainer is not None:
                self._train_step(trainer, wait=bool(self.backlog()))
            if self.settings.republish_rate:
                self._republish(producer, serving)
            self._send_tombstones(producer, serving)
            now = time.monotonic()
            votes = Votes(stop=self._stop, data=bool(records) or self.backlog() > 0, checkpoint=self._checkpoint_due(),
                          idle=self.group.rank == 0 and bool(idle_exit_s) and now - last_data >= idle_exit_s,
                          samples=self.run.samples, backlog=self.backlog())
            agreed = agree(self.group, votes)
            total_samples = agreed.samples
            if agreed.data:
                last_data = now
            self._housekeeping(head, tps, checkpoint=agreed.checkpoint)
            if agreed.stop:
                break
            if not agreed.data and agreed.backlog == 0:
                if agreed.idle or (max_samples and agreed.samples >= max_samples):
                    break

    def _until_connected(self, connect: Callable[[], T], what: str, timeout_s: float = 300.0) -> T:
        """``connect()``, again every few seconds while the broker does not answer (it may be
        restarting or paused), for up to ``timeout_s``; then the last error stands."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return connect()
            except (KafkaError, OSError) as exc:
                if time.monotonic() >= deadline or self._stop:
                    raise
                log.warning("connecting %s to %s failed (%s); retrying", what, self.bootstrap, exc)
                time.sleep(2.0)

    def backlog(self) -> int:
        """Samples consumed by the head, not yet through the training consumer."""
        if self.bounded:
            return 0
        with self._lock:
            return sum(max(0, h - self.offsets.get(p, 0)) for p, h in self.head.items())

    def _head_step(self, records: list, producer: KafkaProducer, serving: ServingStore) -> None:
        """Publish the vectors of a batch; with ``bounded``, score and learn from it too."""
        t0 = time.perf_counter()
        samples = decode_samples(records, self.metrics)
        for r in records:
            self.head[r.partition] = max(self.head.get(r.partition, 0), r.offset + 1)
        if samples or self.group.distributed:  # (ranks: the row sync is a collective, joined even without samples)
            # publish → score → learn: vectors go out before any optimizer step on them (fresher)
            out = self._vectors(samples)
        if samples:
            self._head_batches += 1
            if self._head_batches % self.publish_every == 0:
                self._publish(out, producer, serving)
            self.run.samples += len(samples)
            self._count_kinds(samples)
            if self.bounded:
                fresh = self._admit(samples)
                if len(fresh) > self.settings.batch_size:
                    fresh = self.rng.sample(fresh, self.settings.batch_size)
                self._learn(fresh)
        elif self.bounded and self.group.distributed:
            self._learn([])  # the step is a collective: joined without samples
        if self.bounded:
            self.offsets = dict(self.head)
        self.metrics.step_seconds.observe(time.perf_counter() - t0)
        self._note_rate(len(samples))

    def _train_step(self, trainer: KafkaConsumer, wait: bool = True) -> None:
        """One optimizer step on the next samples behind the head (at most :meth:`_train_size`;
        ``wait`` False: only what the consumer has fetched already)."""
        t0 = time.perf_counter()
        polled = trainer.poll(200 if wait else 0, max_records=self._train_size())
        records: list = []
        for tp in sorted(polled, key=lambda t: t.partition):
            recs = polled[tp]
            with self._lock:
                end = self.head.get(tp.partition, 0)
            kept = [r for r in recs if r.offset < end]  # never ahead of the head
            if len(kept) < len(recs):  # read past what was published: come back for those later
                trainer.seek(tp, recs[len(kept)].offset)
            records.extend(kept)
        with self._lock:
            for r in records:
                self.offsets[r.partition] = max(self.offsets.get(r.partition, 0), r.offset + 1)
        self._learn(self._admit(decode_samples(records, self.metrics, count_bad=False)))
        if records:
            self.metrics.train_seconds.inc(time.perf_counter() - t0)

    def _train_size(self) -> int:
        """Samples the next training step takes: with a publishing thread, :func:`train_size` of
        the backlog now; in the lockstep loop (ranks, ``bounded``) ``batch_size``, because there
        the head waits for the step, and a larger step would delay every vector behind it
        (measured with 2 ranks at 2,000 events/s: freshness p50 1.5 → 2.5 s)."""
        if not self._threaded:
            return self.settings.batch_size
        return train_size(self.settings.batch_size, self.settings.catchup_batches, self.backlog())

    def _admit(self, samples: list[Sample]) -> list[Sample]:
        """The samples not trained before (re-deliveries counted and dropped)."""
        fresh = [s for s in samples if self.guard.admit(s)]
        skipped = len(samples) - len(fresh)
        if skipped:
            self.run.redelivered += skipped
            self.metrics.redelivered.inc(skipped)
        return fresh

    def _learn(self, samples: list[Sample]) -> None:
        """Score the samples with the model as it is (prequential: none of them was trained on
        yet), then take one optimizer step on them."""
        if not samples and not self.group.distributed:
            return
        if self._threaded:  # rows the publishing thread gave the batch's new ids: in the tables first
            self.learner.grow_tables()
        # shadow cases: baseline and repeat-recent scored now, before learning
        cases = self.guardrails.cases(samples)
        version = self.learner.version
        # prequential scores and the online model's shadow outcomes from the step's own forward
        # (the model before the update); ranks: a collective, a step of the union of their samples
        loss = self.learner.learn(samples, score_limit=self.settings.batch_size,
                                  cases=None if cases is None else (cases.conv, cases.ret))
        self.guardrails.note_cases(cases, self.learner.last_cases)  # (ranks: a collective)
        gone = self.learner.take_evicted_items()
        if gone and self.group.rank == 0:  # (every rank evicts the same ids: one sends the tombstones)
            with self._lock:
                self._evicted += gone
        if self.learner.version == version:  # no step: no rank had anything to train on
            self._consumed(samples)  # (e.g. only clicks under conversion_feedback wait: consumed all the same)
            return
        self.trained_log.append(samples)
        self.run.steps += 1
        self.run.trained += len(samples)
        self.run.replayed += self.learner.last_replayed
        self.metrics.trained.inc(len(samples))
        self.metrics.replayed.inc(self.learner.last_replayed)
        self.metrics.steps.inc()
        self.metrics.loss.set(loss)
        self.metrics.model_version.set(self.learner.version)
        drifted = self.drift.update(loss)
        if drifted:
            self.metrics.drift.inc()
            log.warning("drift: the training loss changed at step %d (ADWIN; mean since then %.4f)",
                        self.run.steps, self.drift.mean)
        event = self._on_guard(self.guardrails.after_step())
        if self._threaded:
            self._put_latest()  # the publishing thread's weights: this step's (or the good model's)
        online = self.learner.online_metrics()
        for name, value in online.items():
            if value is None:
                continue
            if name.startswith("clicktime_"):
                self.metrics.clicktime.labels(name.removeprefix("clicktime_")).set(value)
            else:
                self.metrics.online.labels("online", name).set(value)
        shadow = self._note_guard()
        self._history.write(json.dumps({"time": time.time(), "step": self.run.steps, "samples": self.run.samples,
                                        "trained": self.run.trained, "loss": loss, "drift": drifted, **online,
                                        "serving_version": self.guardrails.serving_version,
                                        "model_state": self.guardrails.state, "guard_event": event and event.kind,
                                        "shadow": shadow}) + "\n")

    def _consumed(self, samples: list[Sample]) -> None:
        """Samples a step took but had nothing to learn from (a click under ``wait`` is only
        predicted): logged and counted as trained, so every identity is consumed exactly once."""
        if not samples:
            return
        self.trained_log.append(samples)
        self.run.trained += len(samples)
        self.metrics.trained.inc(len(samples))

    # -- guardrails (model/guardrails.py decides; these hooks publish and count) ---------------------

    def _vectors(self, samples: list[Sample]) -> StepOutput:
        """The vectors to publish: the online learner's, or the good model's while rolled back
        (the online learner still gives the batch's new ids their rows)."""
        out = self.learner.vectors(samples)
        if not self.bounded:  # (bounded trains a random part: a click left out would keep its prediction pending)
            self._hand_over(out.clicks, self._new_clicks(samples))  # the online model's, whoever serves
        serving = self.guardrails.serving
        return out if serving is self.learner else serving.vectors(samples)

    @property
    def serving_version(self) -> int:
        """Model version of what is published now."""
        return self.guardrails.serving_version

    def _on_guard(self, event: Event | None) -> Event | None:
        """Count and log what the guardrails did; after a rollback, vectors the bad model
        published are re-published with the good one first."""
        if event is None:
            return None
        if event.kind in ("rollback", "pin"):
            self.metrics.rollbacks.inc()
        if event.kind in ("rollback", "pin", "hold"):  # what a newer model published goes out again first
            with self._lock:
                self.published.demote(newer_than=event.version if event.version is not None else -1)
        log.info("guard: %s (version %s) %s", event.kind, event.version, event.detail)
        return event

    def _note_guard(self) -> dict:
        """Per-model shadow metrics and the guard's deficits into Prometheus; returns the former."""
        g = self.guardrails
        self.metrics.serving_version.set(g.serving_version)
        self.metrics.rolled_back.set(0 if g.state == "live" else 1)
        if not g.cfg.enabled:
            return {}
        shadow = g.shadow.metrics()
        for model in ("baseline", "repeat"):
            for name, value in shadow[model].items():
                if value is not None:
                    self.metrics.online.labels(model, name).set(value)
        for name, value in g.last_verdict.deficit.items():
            if value is not None:
                self.metrics.guard_deficit.labels(name).set(value)
        return shadow

    def _note_rate(self, n: int) -> None:
        now = time.monotonic()
        self._recent.append((now, n))
        self._recent = [(t, k) for t, k in self._recent if now - t <= 60]
        span = max(now - self._recent[0][0], 1e-3)
        self.metrics.samples_per_s.set(sum(k for _, k in self._recent) / span if len(self._recent) > 1 else 0.0)

    # -- re-created topics ---------------------------------------------------------------------

    def _samples_id(self) -> str | None:
        return topic_ids(self.bootstrap, [self.settings.samples_topic], security=self.security)[self.settings.samples_topic]

    def _check_samples_generation(self) -> bool:
        """Whether the samples topic was re-created (a new id, e.g. after a broker restart) since
        the offsets were taken; if so, both positions start again from its beginning, since every
        offset referred to the old topic. A broker that does not answer tells nothing (False)."""
        try:
            current = self._samples_id()
        except Exception:  # no answer: ask again later
            return False
        previous, self.samples_topic_id = self.samples_topic_id, current or self.samples_topic_id
        if current is None or previous is None or current == previous:
            return False
        log.warning("topic %s was re-created (new generation): reading it from its beginning",
                    self.settings.samples_topic)
        self.metrics.generations.labels(self.settings.samples_topic).inc()
        with self._lock:
            self.head = {}
            if self._threaded:  # the training thread resets its own offsets and consumer
                self._generation_reset = True
            else:
                self.offsets = {}
        return True

    def _same_generation(self, head: KafkaConsumer, trainer: KafkaConsumer | None,
                         tps: list[TopicPartition], records: list) -> bool:
        """Make sure the samples topic was not re-created (a broker restart re-creates it) before
        a batch that follows a gap in fetching, and every ``IDLE_GENERATION_CHECK_S`` while
        nothing arrives (a consumer left at offsets of the old topic may never fetch again); if it
        was, drop the batch and rewind both consumers to the new topic's beginning."""
        now = time.monotonic()
        if records:
            last, self._last_batch_at = self._last_batch_at, now
            if now - last < 1.0:
                return True
        elif now - max(self._last_batch_at, self._last_idle_check) < IDLE_GENERATION_CHECK_S:
            return True
        else:
            self._last_idle_check = now
        if not self._check_samples_generation():
            return True
        for consumer in (head, trainer):
            if consumer is not None:
                self._seek(consumer, tps, {})
        return False

    def _publish(self, out: StepOutput, producer: KafkaProducer, serving: ServingStore,
                 version: int | None = None) -> None:
        """Vectors of a batch out, stamped with ``version`` (default: the serving model's now)."""
        now = time.time()
        version = self.serving_version if version is None else version
        users = {u: VectorRecord(version, ev_ts, now, vec) for u, (vec, ev_ts) in out.users.items()
                 if u not in out.from_clicks or not _newer_published(serving, u, ev_ts)}
        items = {i: VectorRecord(version, now, now, vec) for i, vec in out.items.items()}
        bought = {u: b for u, b in out.bought.items() if u in users}
        contexts = {u: c for u, c in out.contexts.items() if u in users}
        with self._lock:
            categories = {i: c for i in items if (c := out.item_categories.get(i, "0")) != self._published_category(i)}
        self._send(users, items, bought, contexts, producer, serving, categories)
        with self._lock:
            for u, rec in users.items():
                if u in contexts:
                    self.published.user(u, version, contexts[u], rec.event_ts)
            for i in items:
                self.published.item(i, version, out.item_categories.get(i, "0"))
            self.run.note_version_lag(self.serving_version - version, len(users) + len(items))
        fresh = [now - arr for arr in out.arrivals]  # every event of the batch is in a vector now
        for f in fresh:
            self.metrics.freshness.observe(f)
        self.run.note_freshness(fresh)

    def _published_category(self, item_id: str) -> str | None:
        entry = self.published.items.get(item_id)
        return None if entry is None else entry[1]

    def _republish(self, producer: KafkaProducer, serving: ServingStore) -> None:
        """Publish again, with the current model, vectors an older one made (bounded rate, less
        while training is behind: :func:`republish_rate_now`)."""
        now = time.monotonic()
        rate = republish_rate_now(self.settings.republish_rate, self.settings.republish_behind_share,
                                  self.backlog(), self.settings.batch_size)
        budget = int(rate * min(now - self._last_republish, 5.0))
        if budget < 2:
            return
        self._last_republish = now
        if self._threaded:  # the publishing thread: with its newest copy of the weights
            with self.latest.use() as model:
                self.learner.rows.grow_tables(model.model, None, self._twin_gen)  # type: ignore[attr-defined]
                self._republish_with(model, model.version, budget, producer, serving)
        else:
            self._republish_with(self.guardrails.serving, self.serving_version, budget, producer, serving)
        with self._lock:
            self.metrics.version_lag.set(self.published.version_lag(self.serving_version))

    def _republish_with(self, model, version: int, budget: int, producer: KafkaProducer,
                        serving: ServingStore) -> None:
        with self._lock:
            stale_users, stale_items = self.published.stale(version, budget)
        if stale_users or stale_items:
            wall = time.time()
            graphs = {u: (UserGraph.from_bytes(ctx), ts) for u, (ctx, ts) in stale_users.items()}
            users = {u: VectorRecord(version, ts, wall, vec) for u, (vec, ts) in model.user_vectors_of(graphs).items()}
            items = {i: VectorRecord(version, wall, wall, vec) for i, vec in model.item_vectors_of(stale_items).items()}
            self._send(users, items, {}, {}, producer, serving)
            with self._lock:
                for u, (ctx, ts) in stale_users.items():
                    self.published.user(u, version, ctx, ts)
                for i, cat in stale_items.items():
                    self.published.item(i, version, cat)  # (an evicted item keeps no row: dropped next time)
            self.metrics.republished.labels("user").inc(len(users))
            self.metrics.republished.labels("item").inc(len(items))

    def _send_tombstones(self, producer: KafkaProducer, serving: ServingStore) -> None:
        """Delete from serving the vectors of items whose rows were evicted: from this process's
        store and, by a tombstone on the embeddings topic (its compaction drops the key), from
        every API replica's store and index. An item that got a row again meanwhile is left alone:
        its new vector was (or will be) published after this, by this thread. (Rank 0 only collects
        them: every rank evicts the same ids.)"""
        with self._lock:
            gone, self._evicted = self._evicted, []
        if not gone:
            return
        rows = self.learner.rows  # type: ignore[attr-defined]
        with rows.lock:
            gone = [i for i in gone if i not in rows.items]
        if not gone:
            return
        serving.delete_items(gone)
        send_tombstones(producer, self.settings.embeddings_topic, gone)
        with self._lock:
            for i in gone:
                self.published.items.pop(i, None)
        self.metrics.tombstones.inc(len(gone))

    def _send(self, users: dict[str, VectorRecord], items: dict[str, VectorRecord], bought: dict[str, list[str]],
              contexts: dict[str, bytes], producer: KafkaProducer, serving: ServingStore,
              categories: dict[str, str] | None = None) -> None:
        """Vectors (and bought items, contexts, categories of items new to the topic) to the
        serving store and the embeddings topic."""
        serving.write(users, items, bought=bought, contexts=contexts, model_version=self.serving_version,
                      categories=categories)
        send_vectors(producer, self.settings.embeddings_topic, users, items, bought, contexts, categories)
        self.run.published_users += len(users)
        self.run.published_items += len(items)
        self.metrics.published.labels("user").inc(len(users))
        self.metrics.published.labels("item").inc(len(items))

    def _checkpoint_due(self) -> bool:
        since = time.monotonic() - self._last_ckpt
        return bool(self.run.steps) and (since >= self.settings.checkpoint_every_s
                                         or self.run.steps % self.settings.checkpoint_every_steps == 0 and since > 1.0)

    def _housekeeping(self, consumer: KafkaConsumer, tps: list[TopicPartition], checkpoint: bool | None = None) -> None:
        """Metrics, progress and, when due (``checkpoint``: as the ranks agreed), a checkpoint."""
        self.metrics.backlog.set(self.backlog())
        if self.run.trained_share is not None:
            self.metrics.trained_share.set(self.run.trained_share)
        self.metrics.checkpoint_age.set(time.monotonic() - self._last_ckpt)
        if self._checkpoint_due() if checkpoint is None else checkpoint:
            self.checkpoint()
            self.write_stats()
        for kind, size, ev in self.learner.idmap_stats():
            self.metrics.idmap_size.labels(kind).set(size)
            self.metrics.idmap_evictions.labels(kind).set(ev)
        if consumer is not None:  # (publishing thread: its own consumer, :meth:`_note_lag`)
            self._note_lag(consumer, tps)
        now = time.monotonic()
        if self.progress and now - self._last_progress >= PROGRESS_EVERY_S:
            self._last_progress = now
            self.progress(self.stats())

    def _note_lag(self, consumer: KafkaConsumer, tps: list[TopicPartition]) -> None:
        """Samples on the topic the head has not read (from the thread that owns ``consumer``)."""
        try:
            ends = consumer.end_offsets(tps)
            self.metrics.lag.set(sum(max(0, ends[tp] - consumer.position(tp)) for tp in tps))
        except Exception:  # lag is informational; a metadata hiccup must not stop training
            pass

    def stats(self) -> dict:
        p50, p99 = self.run.freshness_quantiles()
        with self._lock:
            version_lag = self.published.version_lag(self.serving_version)
            lags = np.asarray(self.run.version_lags or [0])
        return {"samples": self.run.samples, "steps": self.run.steps, "model_version": self.learner.version,
                "trained": self.run.trained, "trained_share": self.run.trained_share, "backlog": self.backlog(),
                "replayed": self.run.replayed, "redelivered": self.run.redelivered,
                "version_lag": version_lag,
                # model versions the weights of a published vector were behind the newest, at publish
                "published_version_lag_p50": float(np.quantile(lags, 0.5)),
                "published_version_lag_max": int(lags.max()),
                "publishing": "thread" if self._threaded else "in the loop",
                "serving_version": self.serving_version, "model_state": self.guardrails.state,
                "rollbacks": self.guardrails.rollbacks,
                "train_policy": self.settings.train_policy,
                "published_users": self.run.published_users, "published_items": self.run.published_items,
                "online": self.learner.online_metrics(), "freshness_p50_s": p50, "freshness_p99_s": p99,
                "reliability": _reliability(self.learner),
                "device": str(self.learner.device), "rank": self.group.rank, "world": self.group.world,
                "time": time.time()}

    def write_stats(self) -> None:
        write_atomic(self.dir / "trainer-stats.json", (json.dumps(self.stats(), indent=2) + "\n").encode())


def install_stop_handlers(trainer: Trainer) -> None:
    """SIGTERM and SIGINT finish the current batch, checkpoint and exit cleanly."""
    signal.signal(signal.SIGTERM, trainer.stop)
    signal.signal(signal.SIGINT, trainer.stop)
