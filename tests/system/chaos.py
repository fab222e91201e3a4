"""Fault injection over the whole pipeline, after Kafka Streams' EOS system test.

A run: a private Tansu broker, stream workers and the trainer as real processes, a synthetic log
(with about 1% bad records) replayed at a steady rate, and a SEEDED schedule of faults while it
flows: kill -9 of a worker, SIGTERM of a worker, a worker joining, kill -9 of the trainer (it is
restarted on its data dir), the broker paused (SIGSTOP) and resumed. Replacements keep at least
one worker up at all times.

Then the verifier reads everything back and compares it with what an uninterrupted offline build
says must be there:

- state: every user's final record == the offline build. A fresh verification worker (fresh data
  dir, the same group, alone once the others are stopped) rebuilds every partition from the
  changelog; its store is read back;
- samples: the ``training-samples`` records deduplicated by identity (generation, partition,
  offset, seq) == the offline samples (by content); re-emitted copies are counted, none may be
  missing, none invented, and two records of one identity must be the same sample;
- DLQ: every bad record (rejected by replay or by a worker) is on the dead-letter topic;
- trainer: ``trained-samples.log`` holds every distinct sample identity on the topic exactly once
  (trained twice 0, missing 0, unknown 0);
- embeddings: every user with an event has a ``user:<id>`` vector.

It prints ``ALL-RECORDS-DELIVERED`` or exactly what is missing and what is extra.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import threading
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tgastream.core.settings import Settings
from tgastream.state.record import UserRecord
from tgastream.state.samples import Sample, samples_from_events
from tgastream.state.store import StateStore
from tgastream.stream.broker import EmbeddedBroker
from tgastream.stream.replay import ReplayConfig, ReplaySummary, make_producer, replay_file, send_watermarks
from tgastream.stream.synth import SynthConfig, write_file
from tgastream.stream.trained_log import read_trained
from tests.kafka_util import read_topic
from tests.stream_reference import comparable, offline_records, read_store, replay_order, sample_identity
from tests.trainer_util import start_trainer
from tests.worker_util import WorkerProcess, committed_offsets, describe_group, start_worker, worker_state_dir

DAY = 86400.0
VERDICT_OK = "ALL-RECORDS-DELIVERED"
FAULT_KINDS = ("kill9_worker", "sigterm_worker", "join_worker", "kill9_trainer", "pause_broker")


# -- configuration and schedule ------------------------------------------------------------------

@dataclass(frozen=True)
class ChaosConfig:
    events: int = 50_000
    users: int = 400
    days: float = 4.0
    rate: float = 200.0  # events/s, steady
    partitions: int = 4
    workers: int = 3
    max_workers: int = 4
    faults: int = 12
    kinds: tuple[str, ...] = FAULT_KINDS  # each at least once (when faults allow), the rest drawn at random
    pause_s: tuple[float, float] = (15.0, 30.0)
    bad_share: float = 0.01
    seed: int = 2026
    settle_s: float = 240.0  # longest wait for the workers to commit the last record after the replay
    drain_s: float = 600.0  # longest wait for the trainer to train everything


@dataclass
class Fault:
    at_s: float  # seconds after the replay starts (a fault waits for the one before it)
    kind: str
    pause_s: float = 0.0  # pause_broker: how long
    pick: float = 0.0  # which worker (a fraction of the live list, seeded)
    # filled in as it runs
    started_at_s: float | None = None
    detail: str = ""

    def describe(self) -> str:
        what = f"{self.kind}" + (f" {self.pause_s:.0f}s" if self.kind == "pause_broker" else "")
        ran = f" (ran at {self.started_at_s:6.1f}s: {self.detail})" if self.started_at_s is not None else ""
        return f"t={self.at_s:6.1f}s  {what}{ran}"


def make_schedule(cfg: ChaosConfig) -> list[Fault]:
    """``cfg.faults`` faults spread over the replay, seeded: the same config gives the same schedule.

    A fault starts a seeded gap after the one before it has ended (a broker pause lasts its
    ``pause_s``), so faults do not run into each other and all fall within the replay."""
    rng = random.Random(cfg.seed)
    kinds = list(cfg.kinds[: cfg.faults])
    while len(kinds) < cfg.faults:
        kinds.append(rng.choice(cfg.kinds))
    rng.shuffle(kinds)
    pauses = [round(rng.uniform(*cfg.pause_s), 1) if k == "pause_broker" else 0.0 for k in kinds]
    span = cfg.events / cfg.rate
    base = max(2.0, (span - sum(pauses)) / (cfg.faults + 1))
    out, at = [], 0.0
    for kind, pause, in zip(kinds, pauses):
        at += base * rng.uniform(0.6, 1.4)
        out.append(Fault(round(at, 1), kind, pause_s=pause, pick=rng.random()))
        at += pause
    return out


# -- bad records -----------------------------------------------------------------------------------

def file_bad(n: int) -> str:
    """A line replay itself rejects (to the DLQ); unique, so each can be found there."""
    return f"{900_000 + n},1,1,like,100" if n % 2 else f"{900_000 + n},2,3,pv,notatime"


def wire_bad(n: int) -> bytes:
    """A record any client may write to the events topic: a worker must reject it to the DLQ."""
    kind = n % 4
    if kind == 0:
        return b"<xml n='%d'/>" % n
    if kind == 1:
        return b'{"user_id":"9","item_id":"%d","category_id":"1","behavior":"pv","ts":"x"}' % n
    if kind == 2:
        return b"\xff\xfe\x00%d" % n
    return b"{" * 6000 + b"%d" % n


def write_log(cfg: ChaosConfig, path: Path) -> tuple[list[str], list[bytes]]:
    """The synthetic log with file-bad lines mixed in (seeded places); the file-bad lines and the
    wire-bad values to produce during the run (together ``bad_share`` of the events)."""
    write_file(SynthConfig(users=cfg.users, events=cfg.events, seed=cfg.seed, days=cfg.days), path)
    lines = path.read_text().splitlines()
    n_bad = max(2, round(cfg.events * cfg.bad_share))
    rng = random.Random(cfg.seed + 1)
    bad_lines = [file_bad(n) for n in range(n_bad // 2)]
    for line in bad_lines:
        lines.insert(rng.randrange(len(lines) + 1), line)
    path.write_text("\n".join(lines) + "\n")
    return bad_lines, [wire_bad(n) for n in range(n_bad - n_bad // 2)]


# -- the run ---------------------------------------------------------------------------------------

@dataclass
class Outcome:
    verdict: str
    faults: int
    events: int
    lost: int
    duplicate_samples: int
    trained_twice: int
    missing: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    figures: dict = field(default_factory=dict)
    schedule: list = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)

    def report(self) -> str:
        lines = ["chaos fault schedule:"] + [f"  {s}" for s in self.schedule]
        lines.append(f"verdict: {self.verdict}")
        for name, value in (("faults injected", self.faults), ("events in", self.events), ("lost", self.lost),
                            ("duplicate samples on the topic", self.duplicate_samples),
                            ("samples trained twice", self.trained_twice)):
            lines.append(f"  {name}: {value}")
        for k, v in self.figures.items():
            lines.append(f"  {k}: {v}")
        for title, d in (("MISSING", self.missing), ("EXTRA", self.extra)):
            for k, v in d.items():
                lines.append(f"  {title} {k}: {v}")
        return "\n".join(lines)


def _short(items, n: int = 10) -> str:
    items = sorted(items, key=repr)
    head = ", ".join(repr(x)[:120] for x in items[:n])
    return f"{len(items)} [{head}{', ...' if len(items) > n else ''}]"


def read_final_owner_stores(settings: Settings) -> dict[str, tuple[int, UserRecord]]:
    """user → (partition, record) from the stopped workers' own stores: each partition from the
    slot whose copy of it went furthest on the changelog (its final owner)."""
    slots = sorted((Path(settings.data_dir) / "workers" / settings.consumer_group).glob("*/state"))
    best: dict[int, tuple[int, Path]] = {}
    for root in slots:
        store = StateStore(root, "user-state")
        try:
            for db in root.glob("user-state-*.db"):
                p = int(db.name[len("user-state-"):-3])
                off = store.partition(p).changelog_offset()
                if off is not None and off > best.get(p, (-1, root))[0]:
                    best[p] = (off, root)
        finally:
            store.close()
    out: dict[str, tuple[int, UserRecord]] = {}
    for p, (_, root) in sorted(best.items()):
        store = StateStore(root, "user-state")
        try:
            for key, value in store.partition(p).items():
                out[key.decode()] = (p, UserRecord.from_bytes(value))
        finally:
            store.close()
    return out


class Ledger:
    """What is missing and what is extra, by kind, and how many records were lost: the checks of
    the verifier that need no broker (so they are tested on their own: tests/system/test_verifier.py)."""

    def __init__(self, missing: dict | None = None, extra: dict | None = None, lost: int = 0) -> None:
        self.missing = {} if missing is None else missing
        self.extra = {} if extra is None else extra
        self.lost = lost

    def states(self, stored: dict[str, tuple[int, object]], want: dict[str, object]) -> None:
        """Every user's stored record (``read_store``) equal to the offline build (``comparable``)."""
        gone, invented = set(want) - set(stored), set(stored) - set(want)
        differ = {u for u in set(want) & set(stored) if comparable(stored[u][1]) != comparable(want[u])}
        if gone:
            self.missing["user states"] = _short(gone)
        if invented:
            self.extra["user states"] = _short(invented)
        if differ:
            self.missing["user states equal to the offline build (these differ)"] = _short(differ)
        self.lost += len(gone) + len(differ)

    def samples(self, values: list[bytes], expected: Counter) -> tuple[dict[tuple, tuple], int]:
        """Sample records deduplicated by identity (generation, partition, offset, seq) against the
        offline samples (``sample_identity`` counts): none missing, none invented, one sample per
        identity. The distinct identities (→ content) and how many records were duplicates."""
        by_id: dict[tuple, tuple] = {}
        conflicting = set()
        for value in values:
            s = Sample.from_bytes(value)
            ident = (s.generation, s.partition, s.offset, s.seq)
            content = sample_identity(s)
            if ident in by_id and by_id[ident] != content:
                conflicting.add(ident)
            by_id.setdefault(ident, content)
        got = Counter(by_id.values())
        short, over = expected - got, got - expected
        if short:  # (kind, user, item, event_ts) of each
            self.missing["samples"] = _short([(k[0], k[1], k[2], k[6]) for k in short.elements()])
        if over:
            self.extra["samples (distinct identities beyond the offline set)"] = _short(
                [(k[0], k[1], k[2], k[6]) for k in over.elements()])
        if conflicting:
            self.extra["samples: one identity, two different samples"] = _short(conflicting)
        self.lost += short.total()
        return by_id, len(values) - len(by_id)

    def dlq(self, values: list[bytes | None], want: list[bytes]) -> int:
        """Every bad record on the dead-letter topic (copies allowed, counted); the copies."""
        got = Counter(v or b"" for v in values)
        gone, unknown = set(want) - set(got), set(got) - set(want)
        if gone:
            self.missing["bad records on the DLQ"] = _short(v[:60] for v in gone)
        if unknown:
            self.extra["DLQ records that are no bad record of ours"] = _short(v[:60] for v in unknown)
        self.lost += len(gone)
        return len(values) - len(got)

    def trained(self, trained: list[tuple], distinct: set[tuple]) -> int:
        """The trained log holds every distinct identity exactly once; how many were trained twice."""
        counts = Counter(trained)
        twice = sum(n - 1 for n in counts.values() if n > 1)
        untrained, unknown = distinct - set(counts), set(counts) - distinct
        if twice:
            self.extra["samples trained twice"] = _short([k for k, n in counts.items() if n > 1])
        if untrained:
            self.missing["samples never trained"] = _short(untrained)
        if unknown:
            self.extra["trained identities not on the samples topic"] = _short(unknown)
        self.lost += len(untrained)
        return twice

    def vectors(self, vectors: set[str], users: set[str], with_samples: set[str]) -> None:
        """Every user with an event has a vector (told apart: users without a sample to train on)."""
        none = users - vectors
        if none & with_samples:
            self.missing["user vectors (users with samples)"] = _short(none & with_samples)
        if none - with_samples:
            self.missing["user vectors (users without a sample: nothing to train on)"] = _short(none - with_samples)
        self.lost += len(none)


class ChaosRun:
    def __init__(self, cfg: ChaosConfig, root: Path, say=print) -> None:
        self.cfg, self.root, self.say = cfg, Path(root), say
        self.root.mkdir(parents=True, exist_ok=True)
        self.schedule = make_schedule(cfg)
        self.rng = random.Random(cfg.seed + 2)
        self.broker: EmbeddedBroker | None = None
        self.settings: Settings | None = None
        self.live: list[WorkerProcess] = []
        self.names: dict[int, str] = {}
        self.all_workers: list[WorkerProcess] = []
        self.trainer = None
        self.trainer_dir = self.root / "trainer"
        self.trainer_starts = 0
        self.exit_codes: list[str] = []
        self.unexpected: list[str] = []  # processes that exited without being told to (restarted, as a supervisor would)
        self.t0 = 0.0
        self.paused = False

    # processes
    def _start_worker(self) -> WorkerProcess:
        name = f"w{len(self.all_workers) + 1}"
        # a worker stuck with records waiting rejoins after 30 s (StallWatch), well within settle_s
        w = start_worker(self.settings, self.root / f"{name}.log", "--stall-timeout-s", "30")
        self.names[id(w)] = name
        self.live.append(w)
        self.all_workers.append(w)
        return w

    def _name(self, w: WorkerProcess) -> str:
        return self.names[id(w)]

    def _start_trainer(self, *extra: str):
        self.trainer_starts += 1
        return start_trainer(self.settings, self.trainer_dir, self.root / f"trainer-{self.trainer_starts}.log",
                             "--batch-size", "128", "--checkpoint-every-steps", "10", "--checkpoint-every-s", "5",
                             *extra)

    def _reap(self) -> None:
        """Workers that died on their own (not killed by us) are reported and replaced."""
        for w in list(self.live):
            if w.proc.poll() is not None:
                self.live.remove(w)
                self.unexpected.append(f"{self._name(w)} exited by itself: exit {w.proc.returncode} ({w.log_path.name})")
                self.say(f"  !! {self._name(w)} exited by itself ({w.proc.returncode}); starting a replacement")
                self._start_worker()
        if self.trainer is not None and self.trainer.poll() is not None:
            self.unexpected.append(f"trainer exited by itself: exit {self.trainer.returncode} "
                                   f"(trainer-{self.trainer_starts}.log)")
            self.say(f"  !! the trainer exited by itself ({self.trainer.returncode}); restarting it")
            self.trainer = self._start_trainer()

    def _stuck_report(self) -> str:
        """What each live worker waits on (``kill -USR1``: every task's await chain, in its log), its
        log lines other than progress lines, and the broker's view of the group: for a worker that
        holds partitions and consumes nothing."""
        for w in self.live:
            if w.proc.poll() is None:
                w.proc.send_signal(signal.SIGUSR1)
        time.sleep(2.0)
        parts = [describe_group(self.settings)]
        for w in self.live:
            lines = w.log_path.read_text().splitlines() if w.log_path.exists() else []
            events = [ln for ln in lines if "| applied" not in ln and not re.match(r"  [a-z_]+ = ", ln)]  # not settings
            parts.append(f"--- {self._name(w)} ({w.log_path}): last progress line, then its other lines\n"
                         + "\n".join([ln for ln in lines if "| applied" in ln][-1:] + events[-400:]))
        return "\n".join(parts)

    def _victim(self, fault: Fault) -> WorkerProcess:
        return self.live[min(int(fault.pick * len(self.live)), len(self.live) - 1)]

    def _inject(self, fault: Fault) -> str:
        kind = fault.kind
        if kind == "kill9_worker":
            w = self._victim(fault)
            w.kill9()
            self.live.remove(w)
            new = self._start_worker()
            return f"kill -9 {self._name(w)}, replacement {self._name(new)}"
        if kind == "sigterm_worker":
            w = self._victim(fault)
            self.live.remove(w)
            t = time.monotonic()
            code = w.stop(60)
            self.exit_codes.append(f"{self._name(w)} SIGTERM: exit {code} in {time.monotonic() - t:.1f}s")
            new = self._start_worker()
            return f"SIGTERM {self._name(w)} (exit {code}, {time.monotonic() - t:.1f}s), replacement {self._name(new)}"
        if kind == "join_worker":
            if len(self.live) >= self.cfg.max_workers:  # full: one leaves (kill -9) as the new one joins
                w = self._victim(fault)
                w.kill9()
                self.live.remove(w)
                new = self._start_worker()
                return f"{self._name(new)} joins, {self._name(w)} killed -9 (at most {self.cfg.max_workers})"
            new = self._start_worker()
            return f"{self._name(new)} joins ({len(self.live)} workers)"
        if kind == "kill9_trainer":
            self.trainer.send_signal(signal.SIGKILL)
            self.trainer.wait(30)
            self.trainer = self._start_trainer()
            return f"kill -9 trainer, restarted (start #{self.trainer_starts})"
        if kind == "pause_broker":
            os.kill(self.broker.pid, signal.SIGSTOP)
            self.paused = True
            try:
                time.sleep(fault.pause_s)
            finally:
                os.kill(self.broker.pid, signal.SIGCONT)
                self.paused = False
            return f"broker SIGSTOP {fault.pause_s:.1f}s, SIGCONT"
        raise ValueError(kind)

    def _produce_wire_bad(self, values: list[bytes], span_s: float, stop: threading.Event) -> None:
        producer = make_producer(self.settings.bootstrap)
        try:
            for i, value in enumerate(values):
                wait = self.t0 + span_s * (i + 1) / (len(values) + 1) - time.monotonic()
                if wait > 0 and stop.wait(wait):
                    break
                producer.send(self.settings.events_topic, key=b"9", value=value, partition=i % self.cfg.partitions)
            producer.flush()
        finally:
            producer.close()

    def run(self) -> Outcome:
        cfg = self.cfg
        self.say("chaos fault schedule (seed %d):" % cfg.seed)
        for f in self.schedule:
            self.say(f"  {f.describe()}")
        path = self.root / "log.csv"
        bad_lines, wire_values = write_log(cfg, path)
        self.broker = EmbeddedBroker(log_path=self.root / "tansu.log").start()
        try:
            tag = uuid.uuid4().hex[:8]
            self.settings = Settings(
                bootstrap=self.broker.bootstrap, partitions=cfg.partitions, data_dir=self.root / "data",
                events_topic=f"events-{tag}", dlq_topic=f"dlq-{tag}", samples_topic=f"samples-{tag}",
                embeddings_topic=f"embeddings-{tag}", features_topic=f"features-{tag}")
            return self._run(path, bad_lines, wire_values)
        finally:
            if self.paused:
                os.kill(self.broker.pid, signal.SIGCONT)
            for w in self.all_workers:
                if w.proc.poll() is None:
                    w.kill9()
            if self.trainer is not None and self.trainer.poll() is None:
                self.trainer.kill()
                self.trainer.wait(30)
            self.broker.stop()

    def _verification_worker(self, mark: float, attempts: int = 1, patience_s: float = 100.0) -> Settings | None:
        """Start a worker on a fresh data dir, send a watermark to every partition and wait until it
        has processed them (so it holds every partition, rebuilt from the changelog); stop it. A
        worker that does not get there in ``patience_s`` is reported (unexpected) and, with
        ``attempts`` > 1, replaced. One by default: after Tansu's stuck join (group state
        ``Unknown``) a second fresh worker has never got further, and each attempt costs ~1 min."""
        for attempt in range(1, attempts + 1):
            verify_settings = self.settings.replace(data_dir=self.root / f"verify-{attempt}")
            # a start-up that gets no assignment in 30 s joins again by itself (counted, reported below)
            verifier = start_worker(verify_settings, self.root / f"verify-{attempt}.log", "--join-timeout-s", "30")
            try:
                verifier.wait_up(120)
                producer = make_producer(self.settings.bootstrap)
                send_watermarks(producer, self.settings.events_topic, mark)
                producer.flush()
                producer.close()
                deadline = time.monotonic() + patience_s
                while verifier.total("tgastream_watermarks_total") < self.cfg.partitions:
                    if verifier.proc.poll() is not None:  # e.g. a stuck join whose stop outlasted its deadline
                        self.unexpected.append(f"verification worker {attempt} exited {verifier.proc.returncode} "
                                               f"before processing the watermarks ({verifier.log_path}); "
                                               f"{describe_group(self.settings)}")
                        self.say(f"  !! {self.unexpected[-1]}")
                        break
                    if time.monotonic() > deadline:
                        last = [ln for ln in verifier.log().splitlines() if "kafka" not in ln][-1:]
                        verifier.proc.send_signal(signal.SIGUSR1)  # the worker logs what each task waits on
                        time.sleep(1.0)
                        self.unexpected.append(f"verification worker {attempt} processed nothing in {patience_s:.0f}s "
                                               f"after start (killed, replaced; task dump in {verifier.log_path}); "
                                               f"its last line: {last}; {describe_group(self.settings)}")
                        self.say(f"  !! {self.unexpected[-1]}")
                        break
                    time.sleep(0.3)
                else:
                    retries = verifier.total("tgastream_worker_join_retries_total")
                    if retries:
                        self.unexpected.append(f"verification worker {attempt} joined the group again {retries:.0f} "
                                               f"time(s) before its first assignment ({verifier.log_path})")
                        self.say(f"  !! {self.unexpected[-1]}")
                    assert verifier.stop(60) == 0, verifier.log()
                    return verify_settings
            finally:
                if verifier.proc.poll() is None:
                    verifier.kill9()
        self.unexpected.append(f"no verification worker processed the watermarks in {attempts} attempts: user "
                               "states read from the stopped workers' stores instead (each partition from its final owner)")
        self.say(f"  !! {self.unexpected[-1]}")
        return None

    def _run(self, path: Path, bad_lines: list[str], wire_values: list[bytes]) -> Outcome:
        cfg, settings = self.cfg, self.settings
        for _ in range(cfg.workers):
            self._start_worker()
        for w in self.live:
            w.wait_up(120)
        self.trainer = self._start_trainer()
        summary: list[ReplaySummary] = []
        errors: list[BaseException] = []

        def replay() -> None:
            try:
                summary.append(replay_file(settings.bootstrap, settings, ReplayConfig(
                    path=path, rate=cfg.rate, watermark=True, watermark_margin_s=DAY), progress=False))
            except BaseException as exc:  # reported, not swallowed
                errors.append(exc)

        span = cfg.events / cfg.rate
        stop = threading.Event()
        self.t0 = time.monotonic()
        threads = [threading.Thread(target=replay, daemon=True),
                   threading.Thread(target=self._produce_wire_bad, args=(wire_values, span * 0.95, stop), daemon=True)]
        for t in threads:
            t.start()
        try:
            for fault in self.schedule:
                while time.monotonic() - self.t0 < fault.at_s:
                    self._reap()
                    time.sleep(0.2)
                fault.started_at_s = time.monotonic() - self.t0
                fault.detail = self._inject(fault)
                self.say(f"  fault {fault.describe()}")
            for t in threads:
                while t.is_alive():
                    self._reap()
                    t.join(0.5)
        finally:
            stop.set()
        assert not errors, f"replay failed: {errors[0]!r}"
        sent = summary[0].sent
        self.say(f"  replay done in {time.monotonic() - self.t0:.0f}s: {sent} events sent, "
                 f"{sum(summary[0].rejected.values())} rejected by replay")

        # done: every partition's last record committed by its current owner (durable)
        records = read_topic(settings.bootstrap, settings.events_topic, expected=sent + len(wire_values) + cfg.partitions)
        ends: dict[int, int] = {}
        for r in records:
            ends[r.partition] = max(r.offset, ends.get(r.partition, -1))
        deadline = time.monotonic() + cfg.settle_s
        while True:
            done = committed_offsets(settings)
            if all((done.get(p) or 0) > last for p, last in ends.items()):
                break
            if time.monotonic() >= deadline:
                raise AssertionError(f"workers did not commit the last records: committed {done}, ends {ends}\n"
                                     + self._stuck_report())
            self._reap()
            time.sleep(1.0)
        self.say(f"  workers committed every record at {time.monotonic() - self.t0:.0f}s")
        for w in self.live:  # all at once: each may take its stop deadline
            w.proc.send_signal(signal.SIGTERM)
        for w in list(self.live):
            try:
                code = w.proc.wait(60)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"{self._name(w)} did not stop on SIGTERM:\n{w.log()}")
            self.exit_codes.append(f"{self._name(w)} final SIGTERM: exit {code}")
            self.live.remove(w)

        # a fresh verification worker alone in the group rebuilds every partition from the changelog;
        # a second watermark (same time: changes nothing) per partition says when it is processing
        events = replay_order(path)
        mark = max(e.ts for e in events) + DAY
        verify_settings = self._verification_worker(mark)

        # the trainer: stop it (SIGTERM checkpoints), then one more on its data dir trains what is left and exits idle
        self.trainer.send_signal(signal.SIGTERM)
        code = self.trainer.wait(60)
        self.exit_codes.append(f"trainer final SIGTERM: exit {code}")
        self.trainer = self._start_trainer("--idle-exit", "6")
        code = self.trainer.wait(cfg.drain_s)
        self.exit_codes.append(f"trainer drain: exit {code}")
        assert code == 0, (self.root / f"trainer-{self.trainer_starts}.log").read_text()[-3000:]
        self.say(f"  trainer drained at {time.monotonic() - self.t0:.0f}s")

        return self.verify(path, events, mark, sent, bad_lines, wire_values, verify_settings)

    # -- the verifier --------------------------------------------------------------------------------

    def verify(self, path: Path, events, mark: float, sent: int, bad_lines: list[str], wire_values: list[bytes],
               verify_settings: Settings | None) -> Outcome:
        settings = self.settings
        ledger = Ledger()

        # state
        want = offline_records(events, final_watermark=mark)
        ledger.states(read_store(worker_state_dir(verify_settings)) if verify_settings is not None
                      else read_final_owner_stores(settings), want)

        # samples: deduplicate by identity, compare by content
        offline = samples_from_events(events, window_s=settings.conversion_window_s, final_watermark=mark)
        expected = Counter(sample_identity(s) for s in offline)
        records = read_topic(settings.bootstrap, settings.samples_topic, expected=expected.total(), idle_s=3.0,
                             timeout_s=180)
        by_id, duplicates = ledger.samples([r.value for r in records], expected)

        # DLQ: every bad record there
        want_bad = [line.encode() for line in bad_lines] + wire_values
        dlq = read_topic(settings.bootstrap, settings.dlq_topic, expected=len(want_bad), idle_s=2.0)
        dlq_duplicates = ledger.dlq([r.value for r in dlq], want_bad)

        # trainer: the lineage of the final model trained every distinct identity exactly once
        trained = read_trained(self.trainer_dir / "trained-samples.log")
        trained_twice = ledger.trained(trained, set(by_id))

        # embeddings: every user with an event has a vector
        emb = read_topic(settings.bootstrap, settings.embeddings_topic, idle_s=2.0)
        vectors = {r.key.decode()[5:] for r in emb if r.key and r.key.startswith(b"user:")}
        users = {e.user_id for e in events}
        ledger.vectors(vectors, users, {s.user_id for s in offline})
        missing, extra, lost = ledger.missing, ledger.extra, ledger.lost

        problems = bool(missing or extra or trained_twice)
        verdict = "RECORDS-MISSING-OR-EXTRA" if problems else VERDICT_OK
        figures = {
            "valid events sent": sent, "bad records": len(bad_lines) + len(wire_values),
            "users": len(users), "samples expected": expected.total(), "sample records on the topic": len(records),
            "distinct sample identities": len(by_id), "trained (log entries)": len(trained),
            "DLQ records": len(dlq), "DLQ duplicates": dlq_duplicates,
            "user vectors": len(vectors), "workers started": len(self.all_workers),
            "trainer starts": self.trainer_starts, "exits": self.exit_codes,
            "unexpected exits (restarted)": self.unexpected,
        }
        return Outcome(verdict=verdict, faults=sum(f.started_at_s is not None for f in self.schedule),
                       events=sent + len(bad_lines) + len(wire_values), lost=lost, duplicate_samples=duplicates,
                       trained_twice=trained_twice, missing=missing, extra=extra, figures=figures,
                       schedule=[f.describe() for f in self.schedule])


def run_chaos(cfg: ChaosConfig, root: Path, json_path: Path, say=print) -> Outcome:
    """Run, print the report, write the JSON summary; the outcome."""
    outcome = ChaosRun(cfg, root, say).run()
    say(outcome.report())
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(outcome.to_json(), indent=2) + "\n")
    say(f"chaos summary JSON: {json_path}")
    say(outcome.verdict)
    return outcome
