"""Run ``tgastream worker`` as a real child process in tests, watch its /metrics, stop or kill it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


from tgastream.stream.broker import die_with_parent, free_port
from tgastream.stream.promscrape import scrape, total
from tgastream.core.settings import Settings

REPO = Path(__file__).resolve().parents[1]


@dataclass
class WorkerProcess:
    proc: subprocess.Popen
    port: int
    log_path: Path

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics as ``name{labels}`` → value ({} while the worker is not up)."""
        return scrape(self.port)

    def total(self, name: str) -> float:
        return total(self.metrics(), name)

    def wait_up(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.metrics():
            assert self.proc.poll() is None, f"worker exited early:\n{self.log()}"
            assert time.monotonic() < deadline, f"worker /metrics not up:\n{self.log()}"
            time.sleep(0.2)

    def wait_total(self, name: str, at_least: float, timeout_s: float = 120.0) -> float:
        deadline = time.monotonic() + timeout_s
        while True:
            value = self.total(name)
            if value >= at_least:
                return value
            assert self.proc.poll() is None, f"worker exited:\n{self.log()}"
            assert time.monotonic() < deadline, f"{name} reached {value}, not {at_least}:\n{self.log()}"
            time.sleep(0.2)

    def wait_metrics(self, condition: Callable[[dict[str, float]], bool], what: str,
                     timeout_s: float = 60.0) -> dict[str, float]:
        """Scrape until ``condition`` holds of one scrape, and return that scrape.

        Wait for the very condition a test asserts: counters that move at process time (consumed)
        run ahead of those that move when a flush makes the batch durable (update latency, gauges).
        """
        deadline = time.monotonic() + timeout_s
        while True:
            metrics = self.metrics()
            if metrics and condition(metrics):
                return metrics
            assert self.proc.poll() is None, f"worker exited:\n{self.log()}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{self.log()}"
            time.sleep(0.2)

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM (graceful: drain, persist, commit) and wait for the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"worker did not stop on SIGTERM:\n{self.log()}")

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def log(self) -> str:
        return self.log_path.read_text()[-4000:] if self.log_path.exists() else ""


def wait_until(predicate, timeout_s: float, what: str, *workers: WorkerProcess) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        for w in workers:
            assert w.proc.poll() is None, f"worker exited:\n{w.log()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n" + "\n".join(w.log() for w in workers)
        time.sleep(0.3)


def committed_offsets(settings: Settings) -> dict[int, int | None]:
    """The worker group's committed offset (next offset to read) of every ``behavior-events`` partition.

    A worker acknowledges an offset only once its effects (state on the changelog, samples) are
    durable, so a committed offset past a record means its owner has applied it and persisted it.
    """
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=settings.bootstrap, group_id=settings.consumer_group,
                             enable_auto_commit=False)
    try:
        return {p: consumer.committed(TopicPartition(settings.events_topic, p), timeout_ms=10_000)
                for p in range(settings.partitions)}
    finally:
        consumer.close(autocommit=False)


def describe_group(settings: Settings) -> str:
    """The broker's view of the worker group (state, protocol, members): for reports of a stuck join."""
    from kafka import KafkaAdminClient

    try:
        admin = KafkaAdminClient(bootstrap_servers=settings.bootstrap, request_timeout_ms=10_000)
        admin._process_acl_operations = lambda d: d  # Tansu's authorized-operations bits are not all valid ACLs
        try:
            described = admin.describe_groups([settings.consumer_group])
        finally:
            admin.close()
        return f"broker's view of the group: {described!r}"
    except Exception as exc:  # a report, not a check: say why it could not be read
        return f"group {settings.consumer_group}: not described ({exc!r})"


def start_worker(settings: Settings, log_path: Path, *extra: str) -> WorkerProcess:
    """``python -m stream.cli worker`` for ``settings`` (its topics, data dir, group)."""
    port = free_port()
    cmd = [sys.executable, "-m", "tgastream.stream.cli", "worker", "--bootstrap", settings.bootstrap,
           "--partitions", str(settings.partitions), "--events-topic", settings.events_topic,
           "--dlq-topic", settings.dlq_topic, "--samples-topic", settings.samples_topic,
           "--features-topic", settings.features_topic, "--data-dir", str(settings.data_dir),
           "--metrics-port", str(port), "--progress", "2", *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = open(log_path, "ab")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env,
                            preexec_fn=die_with_parent)  # a killed test run leaves no worker behind
    log.close()
    return WorkerProcess(proc, port, log_path)


def worker_state_dir(settings: Settings, slot: int = 0) -> Path:
    return Path(settings.data_dir) / "workers" / settings.consumer_group / str(slot) / "state"
