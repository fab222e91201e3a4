"""The trainer's multi-machine path on loopback: two ``tgastream train --nproc 1 --nnodes 2``
launchers (one per "node", c10d rendezvous on 127.0.0.1, one shared data volume) train one stream
together, every sample exactly once between them; with ``--max-restarts`` the pair survives one
node's kill -9 (its launcher and rank) once the node is started again, as a supervisor would,
resuming from the newest complete checkpoint."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tgastream.stream.broker import free_port
from tgastream.stream.topics import ensure_app_topics
from tgastream.stream.trained_log import read_trained
from tests.trainer_util import history, process_tree, produce_identified_samples, start_trainer, stats

ARGS = ("--batch-size", "64", "--burst", "2", "--sample-len", "20", "--lr", "0.005", "--threads", "1")


def _node(settings, data: Path, log: Path, endpoint: str, run_id: str, *extra: str) -> subprocess.Popen:
    return start_trainer(settings, data, log, "--nproc", "1", "--nnodes", "2", "--rdzv-endpoint", endpoint,
                         "--rdzv-id", run_id, *ARGS, *extra)


def _wait_listening(endpoint: str, proc: subprocess.Popen, logs: list[Path], timeout: float = 120) -> None:
    host, port = endpoint.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
            return
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, _logs(*logs)
            time.sleep(0.2)


def _trained(data: Path) -> list[tuple]:
    return [t for r in range(2) for t in read_trained(data / f"rank-{r}" / "trained-samples.log")]


def _logs(*paths: Path) -> str:
    return "\n----\n".join(p.read_text()[-3000:] for p in paths if p.exists())


def test_two_nodes_train_one_stream_every_sample_once(topic_settings, tmp_path):
    settings = topic_settings
    ensure_app_topics(settings.bootstrap, settings)
    samples = produce_identified_samples(settings, 2000)
    data = tmp_path / "trainer"  # the shared volume both nodes mount
    endpoint, run_id = f"127.0.0.1:{free_port()}", uuid.uuid4().hex[:8]
    logs = [tmp_path / "node-a.log", tmp_path / "node-b.log"]
    nodes = [_node(settings, data, log, endpoint, run_id, "--idle-exit", "4") for log in logs]
    for n in nodes:
        assert n.wait(600) == 0, _logs(*logs)
    per_rank = [stats(data / f"rank-{r}") for r in range(2)]
    assert [s["world"] for s in per_rank] == [2, 2]
    assert sum(s["trained"] for s in per_rank) == len(samples)
    assert sorted(_trained(data)) == sorted((0, s.partition, s.offset, 0) for s in samples)
    assert per_rank[0]["steps"] == per_rank[1]["steps"] > 0


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_nodes_survive_one_nodes_kill_9_and_restart(topic_settings, tmp_path):
    settings = topic_settings
    ensure_app_topics(settings.bootstrap, settings)
    samples = produce_identified_samples(settings, 4000)
    data = tmp_path / "trainer"
    endpoint, run_id = f"127.0.0.1:{free_port()}", uuid.uuid4().hex[:8]
    logs = [tmp_path / "node-a.log", tmp_path / "node-b.log", tmp_path / "node-b-again.log"]
    extra = ("--idle-exit", "6", "--checkpoint-every-steps", "5", "--checkpoint-every-s", "1000", "--max-restarts", "2")
    a = _node(settings, data, logs[0], endpoint, run_id, *extra)
    _wait_listening(endpoint, a, logs)  # a hosts the rendezvous store (the first to bind it does)
    b = _node(settings, data, logs[1], endpoint, run_id, *extra)
    deadline = time.monotonic() + 300
    while not list((data / "checkpoints").glob("ckpt-*.pt")) or len(history(data / "rank-0")) < 13:
        assert a.poll() is None and b.poll() is None and time.monotonic() < deadline, _logs(*logs)
        time.sleep(0.2)
    for pid in reversed(process_tree(b.pid)):  # the whole node: launcher and rank
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    b.wait(30)
    while "failed (exitcode" not in logs[0].read_text():  # a's rank saw its peer go: a restarts its group
        assert a.poll() is None and time.monotonic() < deadline + 300, _logs(*logs)
        time.sleep(0.2)
    b_again = _node(settings, data, logs[2], endpoint, run_id, *extra)  # the supervisor starts it again
    assert a.wait(600) == 0, _logs(*logs)
    assert b_again.wait(120) == 0, _logs(*logs)
    for log in (logs[0], logs[2]):  # both ranks of the second attempt started from the checkpoint
        assert "resumed from checkpoint" in log.read_text(), _logs(*logs)
    per_rank = [stats(data / f"rank-{r}") for r in range(2)]
    assert sum(s["trained"] for s in per_rank) == len(samples)
    assert sorted(_trained(data)) == sorted((0, s.partition, s.offset, 0) for s in samples)
