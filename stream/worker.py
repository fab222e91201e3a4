"""A stream worker process: topics, local state directory, metrics server, run until told to stop.

Several workers of one consumer group share the partitions of ``behavior-events``. Each keeps its
RocksDB state in its own slot directory ``<data_dir>/workers/<group>/<n>``, claimed with an
exclusive ``flock``: workers started side by side (or sharing a volume) never open the same
database, and a restarted worker (a killed process holds no lock) takes a free slot back, usually
its own, so it recovers from its local state plus the changelog tail.
"""

from __future__ import annotations

import asyncio
import faulthandler
import fcntl
import gc
import io
import logging
import os
import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from time import monotonic
from typing import Callable, TextIO

from faust.exceptions import ConsistencyError
from faust.types import TP

from tgastream.stream.deadline import StopDeadline
from tgastream.stream.generations import changed_or_none, changed_surely, read_generations, reseed_changelog
from tgastream.stream.app import StreamWorker, build_worker, changelog_topic, worker_topics
from tgastream.stream.metrics import MetricsServer, WorkerMetrics
from tgastream.stream.pipeline import PipelineTotals
from tgastream.core.settings import Settings
from tgastream.stream.topics import ensure_topics

log = logging.getLogger("tgastream.worker")

QUIET_LOGGERS = ("faust", "mode", "aiokafka", "kafka",
                 "tgastream.stream.app", "tgastream.stream.batch_consumer", "tgastream.stream.table_store")  # faust services log here


@dataclass(frozen=True)
class WorkerConfig:
    """How long and how loudly a worker runs (defaults: until SIGTERM/SIGINT)."""

    data_dir: Path | None = None  # None: claim a slot under settings.data_dir
    progress_s: float = 10.0  # 0 = no progress lines
    stop_after_records: int = 0  # stop once this many records are durable (benchmarks, tests)
    max_seconds: float = 0.0  # stop after this long (0 = no limit)
    serve_metrics: bool = True
    stop_timeout_s: float = 0.0  # > 0: a graceful stop that takes longer ends the process (StopDeadline)
    generation_check_s: float = 2.0  # how often the topic ids are compared (0: never)
    join_timeout_s: float = 0.0  # > 0: no first assignment within this long at start → leave and join again
    stall_timeout_s: float = 0.0  # > 0: records waiting on assigned partitions, none fetched this long → join again


@dataclass
class SlotLock:
    """An exclusively locked worker directory; released when the process ends or on close()."""

    path: Path
    fd: int

    def close(self) -> None:
        os.close(self.fd)


def claim_slot(root: Path, max_slots: int = 256) -> SlotLock:
    """Lock the first free ``root/<n>`` directory (n = 0, 1, ...)."""
    for n in range(max_slots):
        path = root / str(n)
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return SlotLock(path, fd)
    raise RuntimeError(f"all {max_slots} worker slots under {root} are in use")


def drop_stale_partitions(worker: StreamWorker) -> list[int]:
    """Delete local partition databases that are ahead of the changelog topic.

    A database remembers the last changelog offset it holds. If the changelog ends before it, the
    topic was recreated (Tansu keeps topics in memory only: a broker restart loses them) and the
    local state belongs to another incarnation of the stream: it is dropped and rebuilt from the
    changelog that exists. (faust's own check misses an empty or one-record changelog.)
    """
    from kafka import KafkaConsumer, TopicPartition

    from tgastream.core.kafka_security import kafka_python_args

    store = worker.store
    local = {}
    for partition in store.local_partitions():
        db = store.partition(partition)
        offset = db.changelog_offset()
        if offset is not None and db.changelog_id() is None:  # else generations tell (reseed_changelog)
            local[partition] = offset
    if not local:
        return []
    topic = changelog_topic(worker.settings)
    consumer = KafkaConsumer(**kafka_python_args(worker.settings.bootstrap, worker.settings.kafka_security,
                                                 enable_auto_commit=False, group_id=None))
    try:
        ends = consumer.end_offsets([TopicPartition(topic, p) for p in local])
    finally:
        consumer.close()
    stale = [p for p, offset in local.items() if offset >= ends.get(TopicPartition(topic, p), 0)]
    for p in stale:
        log.warning("local state of partition %d holds changelog offset %d but %s ends at %d: "
                    "the topic was recreated; dropping the local copy", p, local[p], topic,
                    ends.get(TopicPartition(topic, p), 0))
        store.close_partition(p)
        shutil.rmtree(store.path(p), ignore_errors=True)
    for p in set(local) - set(stale):
        store.close_partition(p)
    return stale


def tune_gc() -> None:
    """Collect the young generation less often: a worker holds ~10⁶ live objects (cached users),
    and default thresholds spend a quarter of the CPU re-scanning them. Call in worker processes."""
    gc.set_threshold(50_000, 50, 1_000)


def configure_logging(level: int = logging.INFO) -> None:
    """Our lines at ``level``; faust, mode and the Kafka clients only when something is wrong."""
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def progress_line(t: PipelineTotals, seconds: float, worker: StreamWorker) -> str:
    rate = t.records / seconds if seconds > 0 else 0.0
    processor = worker.pipeline.processor
    pending = sum(processor.pending_windows().values()) if processor else 0
    return (f"records {t.records:,} ({rate:,.0f}/s) | applied {t.events:,} | rejected {t.rejected:,} | "
            f"re-delivered {t.redelivered:,} | samples {t.samples:,} | durable {t.records_durable:,} | "
            f"pending windows {pending:,}")


def summary_table(t: PipelineTotals, seconds: float) -> str:
    p50, p99 = t.latency.percentile(0.5), t.latency.percentile(0.99)
    rows = [
        ("records consumed", f"{t.records:,}"), ("events applied", f"{t.events:,}"),
        ("re-delivered (skipped)", f"{t.redelivered:,}"), ("rejected (DLQ)", f"{t.rejected:,}"),
        ("watermarks", f"{t.watermarks:,}"), ("samples emitted", f"{t.samples:,}"),
        ("bytes per sample", f"{t.sample_bytes / t.samples:,.0f}" if t.samples else "-"),
        ("feature records", f"{t.features:,}"), ("user writes", f"{t.users_written:,}"),
        ("state update p50 / p99", f"{p50 * 1e3:,.0f} / {p99 * 1e3:,.0f} ms" if p50 is not None else "-"),
        ("seconds", f"{seconds:,.1f}"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v:>14}" for k, v in rows)


async def run_worker(settings: Settings, options: WorkerConfig = WorkerConfig(),
                     on_started: Callable[[StreamWorker], None] | None = None,
                     out: TextIO | None = None) -> PipelineTotals:
    """Run one worker until SIGTERM/SIGINT (or an option's limit); returns its totals.

    When a topic it depends on is re-created (a new generation: a Tansu broker restart re-creates
    every topic), the worker restarts its faust app in-process on the new generation instead of
    dying (stream/generations.py); ``tgastream_topic_generations_total`` counts these.
    """
    slot = None
    if options.data_dir is None:
        slot = claim_slot(Path(settings.data_dir) / "workers" / settings.consumer_group)
        data_dir = slot.path
    else:
        data_dir = options.data_dir
    metrics = WorkerMetrics()
    totals = PipelineTotals()
    server: MetricsServer | None = None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread
            pass
    try:
        # `kill -USR1 <pid>`: what is it waiting on?
        loop.add_signal_handler(signal.SIGUSR1, lambda: dump_tasks(loop, consumer_loop(current.get("worker"))))
    except (NotImplementedError, RuntimeError):
        pass
    current: dict[str, StreamWorker] = {}  # the incarnation running now (for the task dump)
    t0 = monotonic()
    failure: str | None = None
    try:
        if options.serve_metrics:
            server = metrics.serve(settings.metrics_host, settings.metrics_port)
            log.info("metrics on %s", server.url)
        while True:
            worker = current["worker"] = await _prepare_incarnation(settings, data_dir, metrics, totals)
            outcome = "failed:start"  # what the stop below assumes if start-up raises
            try:
                outcome = await _start_watched(worker, stop, options.join_timeout_s)
                if outcome == "started":
                    gc.freeze()  # faust, aiokafka and our wiring live for the whole process: keep them out of GC scans
                    if on_started is not None:
                        on_started(worker)
                    outcome = await _supervise(worker, options, stop, t0)
            finally:
                with _stop_deadline(options, outcome, lambda: _dump_hang(loop, current.get("worker"))):
                    await worker.stop()
            if outcome == "join-timeout":
                metrics.join_retries.inc()
                log.warning("no partition assignment %.0f s after start: left the group, joining again",
                            options.join_timeout_s)
                continue
            if outcome == STALLED:
                log.warning("left the group after a stall (above): joining again")
                continue
            if worker.pipeline.failed is not None:
                failure = str(worker.pipeline.failed)
            elif outcome.startswith("recreated:"):
                metrics.generations.labels(outcome.split(":", 1)[1]).inc()
                log.warning("topic %s was re-created (new generation): restarting the worker on it",
                            outcome.split(":", 1)[1])
                continue
            elif outcome.startswith("failed:"):
                failure = outcome.split(":", 1)[1]
            break
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.remove_signal_handler(sig)
            except (NotImplementedError, RuntimeError):
                pass
        if server is not None:
            server.close()
        if slot is not None:
            slot.close()
    seconds = monotonic() - t0
    if out is not None:
        print(summary_table(totals, seconds), file=out, flush=True)
    if failure is not None:
        raise RuntimeError(f"worker stopped: {failure}")
    return totals


def await_chain(task: asyncio.Task) -> list[str]:
    """``file:line in function`` of every coroutine a task is suspended in, outermost first.

    ``Task.print_stack`` shows only the outermost frame of a suspended task; the innermost one
    (what it actually waits on) is found by following ``cr_await`` down the chain.
    """
    lines: list[str] = []
    obj = task.get_coro()
    while obj is not None and len(lines) < 64:
        frame = getattr(obj, "cr_frame", None) or getattr(obj, "gi_frame", None)
        if frame is not None:
            lines.append(f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}")
        obj = getattr(obj, "cr_await", None) or getattr(obj, "gi_yieldfrom", None)
    return lines


STOPPED_IN_START_UP = "stop:start-up"
"""What :func:`_start_watched` returns for a SIGTERM before the worker started (``stop`` is a running one's)."""

STARTUP_STOP_S = 10.0
"""Longest wait for a worker asked to stop before it started (no assignment processed yet)."""


def _stop_deadline(options: WorkerConfig, outcome: str, on_expire: Callable[[], None]) -> StopDeadline:
    """The deadline on stopping one incarnation of the worker.

    A SIGTERM during start-up (``STOPPED_IN_START_UP`` from :func:`_start_watched`) stops a worker
    that has processed nothing: there is nothing to make durable, yet aiokafka's group
    coordinator cannot be closed while a JoinGroup/SyncGroup is pending (Tansu holds a SyncGroup
    until the member it replaces times out, 10 s and more) and faust's rebalance callbacks wait on
    a loop that is stopping. So that stop is bounded by ``STARTUP_STOP_S`` and a stop that
    outlasts it still exits 0: a clean stop that lost nothing.
    """
    if outcome == STOPPED_IN_START_UP:
        seconds = min(options.stop_timeout_s, STARTUP_STOP_S)  # 0 (wait forever) stays 0
        return StopDeadline(seconds, "worker", exit_code=0, on_expire=on_expire,
                            why="It was stopped during start-up, before it processed anything: nothing to lose.")
    return StopDeadline(options.stop_timeout_s, "worker", on_expire=on_expire)


def _dump_hang(loop: asyncio.AbstractEventLoop, worker: StreamWorker | None) -> None:
    """Where a stop hangs: every task's await chain and every thread's stack, to the log's stderr."""
    dump_tasks(loop, consumer_loop(worker))
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)


def consumer_loop(worker: StreamWorker | None) -> asyncio.AbstractEventLoop | None:
    """The event loop of faust's consumer thread (group membership, fetches), if it runs one."""
    if worker is None:
        return None
    thread = getattr(worker.app.consumer, "_thread", None)
    return getattr(thread, "thread_loop", None)


def dump_tasks(main: asyncio.AbstractEventLoop, *others: asyncio.AbstractEventLoop | None) -> None:
    """Log every asyncio task's await chain, on the ``main`` loop and on ``others`` (faust's consumer
    thread runs the group coordinator on its own loop): where a worker that seems stuck is waiting.
    Safe from another thread (the stop deadline's timer): it only reads the tasks."""
    seen: set[int] = set()
    for loop in (main, *others):
        if loop is None or id(loop) in seen:
            continue
        seen.add(id(loop))
        for task in list(asyncio.all_tasks(loop)):
            buf = io.StringIO()
            print(f"task {task.get_name()}{'' if loop is main else ' (consumer thread)'}:", file=buf)
            for line in await_chain(task):
                print(f"  {line}", file=buf)
            log.warning("%s", buf.getvalue())


async def _prepare_incarnation(settings: Settings, data_dir: Path, metrics: WorkerMetrics,
                               totals: PipelineTotals) -> StreamWorker:
    """Topics, generations, local state made consistent with the changelog: a worker ready to start."""
    security = settings.kafka_security
    ensure_topics(settings.bootstrap, worker_topics(settings), settings.partitions, security=security)
    changelog = changelog_topic(settings)
    generations = await asyncio.to_thread(read_generations, settings.bootstrap, settings.events_topic, changelog,
                                          security)
    worker = build_worker(settings, data_dir, metrics, generations=generations, totals=totals)
    log.info("worker of group %s on %s, state in %s (events generation %08x)", settings.consumer_group,
             settings.bootstrap, data_dir, generations.source)
    if generations.changelog_id:
        await asyncio.to_thread(reseed_changelog, worker.store, settings.bootstrap, changelog, generations.changelog_id,
                                security)
    drop_stale_partitions(worker)
    worker.pipeline.generation_check = lambda: changed_surely(
        settings.bootstrap, settings.events_topic, changelog, generations, security=security)
    return worker


async def _start_watched(worker: StreamWorker, stop: asyncio.Event, join_timeout_s: float) -> str:
    """Start ``worker`` (join the group, recover its partitions) unless asked to stop first.

    Returns ``started``, ``STOPPED_IN_START_UP`` (SIGTERM during start-up: the start is cancelled, so a worker
    that cannot join still stops within its deadline) or ``join-timeout`` (no assignment within
    ``join_timeout_s``: what each task waited on is logged, and the caller joins again). Recovery
    after an assignment may legitimately take long; only the wait for the first assignment is bounded.
    """
    start = asyncio.ensure_future(worker.start())
    waiter = asyncio.ensure_future(stop.wait())
    t0 = monotonic()
    try:
        while not start.done():
            await asyncio.wait({start, waiter}, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
            if stop.is_set() and not start.done():
                return STOPPED_IN_START_UP
            if (join_timeout_s and not start.done() and worker.consumer.assignments == 0
                    and monotonic() - t0 > join_timeout_s):
                dump_tasks(asyncio.get_running_loop(), consumer_loop(worker))
                return "join-timeout"
        start.result()  # a failed start raises here
        return "started"
    finally:
        waiter.cancel()
        if not start.done():
            start.cancel()
            await asyncio.gather(start, return_exceptions=True)


STALLED = "stalled"
"""What :func:`_supervise` returns when :class:`StallWatch` found the worker stuck: it joins again."""


def end_offsets(settings: Settings, tps: list[TP]) -> dict[TP, int]:
    """The broker's end offset of each partition ({} when the broker does not answer)."""
    from kafka import KafkaConsumer, TopicPartition

    from tgastream.core.kafka_security import kafka_python_args

    try:
        consumer = KafkaConsumer(**kafka_python_args(settings.bootstrap, settings.kafka_security,
                                                     enable_auto_commit=False, group_id=None,
                                                     request_timeout_ms=10_000))
        try:
            ends = consumer.end_offsets([TopicPartition(tp.topic, tp.partition) for tp in tps])
        finally:
            consumer.close()
    except Exception as exc:  # no answer tells nothing either way: asked again later
        log.debug("end offsets not read: %r", exc)
        return {}
    return {TP(tp.topic, tp.partition): end for tp, end in ends.items()}


class StallWatch:
    """Finds a worker that holds partitions with records waiting and fetches nothing.

    Seen on Tansu under load (the chaos test, once in a full suite run), after the rebalance that
    followed a sibling's kill -9: a worker kept two partitions for the rest of the run and never
    fetched them again, no other worker took them over, and nothing was logged. Whatever left faust's
    or aiokafka's fetch machinery stuck (not found yet: the consumer's state is logged when it
    happens), the remedy is the one for a stuck join: leave the group and join again. Stuck means:
    no fetch returned a record for ``timeout_s`` (a changelog
    record read during recovery counts; so does an assignment, which restarts the wait) while the
    broker holds records past this worker's position on one of its assigned source partitions
    (end offsets are asked only once the fetches have been quiet that long).
    """

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._check: asyncio.Future | None = None
        self._positions: dict[TP, int] = {}
        self._next_at = 0.0

    def poll(self, worker: StreamWorker, now: float) -> str | None:
        """A description of the stall, or None (never waits: end offsets are read in a thread)."""
        consumer = worker.consumer
        if self._check is not None:
            if not self._check.done():
                return None
            ends, self._check = self._check.result(), None
            behind = {tp: (pos, ends[tp]) for tp, pos in self._positions.items() if ends.get(tp, 0) > pos}
            quiet = now - consumer.fetched_at
            if behind and quiet > self.timeout_s:
                return (f"nothing fetched for {quiet:.0f} s while records wait on assigned partitions: "
                        + ", ".join(f"{tp.topic}[{tp.partition}] at {pos} of {end}"
                                    for tp, (pos, end) in sorted(behind.items())))
            self._next_at = now + min(self.timeout_s, 10.0)
            return None
        if now - consumer.fetched_at <= self.timeout_s or now < self._next_at:
            return None
        self._positions = consumer.batch_positions()
        if self._positions:
            self._check = asyncio.ensure_future(asyncio.to_thread(end_offsets, worker.settings, list(self._positions)))
        return None


async def _supervise(worker: StreamWorker, options: WorkerConfig, stop: asyncio.Event, t0: float) -> str:
    """Wait for a stop signal, a limit, a pipeline failure, a crashed app, a re-created topic or a
    stall; log progress. Returns why it stopped: ``stop``, ``limit``, ``failed:<why>``,
    ``recreated:<topic>`` or ``STALLED``."""
    settings = worker.settings
    changelog = changelog_topic(settings)
    next_progress = t0 + options.progress_s
    next_check = monotonic() + options.generation_check_s
    check: asyncio.Future | None = None
    stall = StallWatch(options.stall_timeout_s) if options.stall_timeout_s else None
    totals = worker.pipeline.totals
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), timeout=0.2)
        except asyncio.TimeoutError:
            pass
        now = monotonic()
        if check is not None and check.done():
            topic, check = check.result(), None
            if topic is not None:
                return f"recreated:{topic}"
        if check is None and options.generation_check_s and now >= next_check:
            check = asyncio.ensure_future(asyncio.to_thread(
                changed_or_none, settings.bootstrap, settings.events_topic, changelog, worker.generations,
                settings.kafka_security))
            next_check = now + options.generation_check_s
        if worker.pipeline.recreated is not None:
            return f"recreated:{worker.pipeline.recreated}"
        if worker.pipeline.failed is not None or worker.app.crashed:
            reason = worker.pipeline.failed or worker.app.crash_reason
            if isinstance(reason, ConsistencyError):  # faust found the changelog behind its state
                return f"recreated:{changelog}"
            log.error("worker failed: %s", reason)
            return f"failed:{reason}"
        if options.stop_after_records and totals.records_durable >= options.stop_after_records:
            return "limit"
        stalled = stall.poll(worker, now) if stall is not None else None
        if stalled is not None:
            log.warning("worker stalled: %s; its consumer:\n%s", stalled, worker.consumer.describe_state())
            dump_tasks(asyncio.get_running_loop(), consumer_loop(worker))
            return STALLED
        if options.max_seconds and now - t0 >= options.max_seconds:
            return "limit"
        if options.progress_s and now >= next_progress:
            log.info(progress_line(totals, now - t0, worker))
            next_progress = now + options.progress_s
    return "stop"
