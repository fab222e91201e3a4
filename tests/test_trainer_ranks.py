"""Two data-parallel trainer ranks (``tgastream train --nproc 2``: torchrun, gloo) on the real
broker: between them every sample is trained exactly once (each rank its own partitions, a
re-delivered copy never), every user and item gets a vector on ``embeddings``, the union's
training loss falls, and a checkpoint is the model file plus one part per rank. Killed with
kill -9, one rank takes the group down and torchrun restarts it from the newest complete
checkpoint, ending with the counts of an uninterrupted run."""

from __future__ import annotations

import signal
import time
from collections import Counter

import numpy as np
import pytest

from tgastream.stream.topics import ensure_app_topics
from tgastream.stream.trained_log import read_trained
from tests.kafka_util import read_topic
from tests.trainer_util import history, produce_identified_samples, rank_pid, start_ranks, stats

ARGS = ("--batch-size", "64", "--burst", "2", "--sample-len", "20", "--lr", "0.005", "--threads", "1")


def _trained(data, world: int = 2) -> list[tuple]:
    return [t for r in range(world) for t in read_trained(data / f"rank-{r}" / "trained-samples.log")]


def test_two_ranks_train_every_sample_once_publish_every_vector_and_learn(topic_settings, tmp_path):
    settings = topic_settings
    ensure_app_topics(settings.bootstrap, settings)
    samples = produce_identified_samples(settings, 3000, redeliver=100)
    identities = sorted((0, s.partition, s.offset, 0) for s in samples)
    data = tmp_path / "trainer"
    proc = start_ranks(settings, data, tmp_path / "ranks.log", 2, *ARGS, "--idle-exit", "4",
                       "--checkpoint-every-steps", "10")
    assert proc.wait(600) == 0, (tmp_path / "ranks.log").read_text()[-4000:]

    per_rank = [stats(data / f"rank-{r}") for r in range(2)]
    assert [s["world"] for s in per_rank] == [2, 2] and [s["rank"] for s in per_rank] == [0, 1]
    assert sum(s["trained"] for s in per_rank) == len(samples)  # every sample trained ...
    trained = _trained(data)
    assert sorted(trained) == identities  # ... exactly once between the ranks
    assert sum(s["redelivered"] for s in per_rank) == 4 * 100  # copies skipped
    for r in range(2):  # each rank its own partitions (p % 2 == r)
        assert {p for _g, p, _o, _s in read_trained(data / f"rank-{r}" / "trained-samples.log")} == {r, r + 2}
    assert per_rank[0]["steps"] == per_rank[1]["steps"] == per_rank[0]["model_version"]  # they stepped together

    published = read_topic(settings.bootstrap, settings.embeddings_topic, idle_s=1.0)
    keys = {r.key.decode() for r in published}
    users = {s.user_id for s in samples}
    items = {s.item_id for s in samples} | {s.graph.item_ids[-1] for s in samples if len(s.graph)}
    assert {f"user:{u}" for u in users} <= keys and {f"item:{i}" for i in items} <= keys

    losses = [x["loss"] for x in history(data / "rank-0")]  # the union's loss (all-reduced)
    assert [x["loss"] for x in history(data / "rank-1")] == losses
    quarter = max(1, len(losses) // 4)
    assert np.mean(losses[-quarter:]) < np.mean(losses[:quarter])

    ckpts = data / "checkpoints"
    final = f"ckpt-{per_rank[0]['steps']:012d}"
    assert {p.name for p in ckpts.glob(final + "*")} == {f"{final}.pt", f"{final}.rank-0-of-2.pt",
                                                         f"{final}.rank-1-of-2.pt"}


@pytest.mark.slow
def test_a_rank_killed_mid_stream_restarts_the_group_from_the_newest_complete_checkpoint(topic_settings, tmp_path):
    settings = topic_settings
    ensure_app_topics(settings.bootstrap, settings)
    samples = produce_identified_samples(settings, 4000)
    identities = sorted((0, s.partition, s.offset, 0) for s in samples)
    data = tmp_path / "trainer"
    log = tmp_path / "ranks.log"
    proc = start_ranks(settings, data, log, 2, *ARGS, "--idle-exit", "6", "--checkpoint-every-steps", "5",
                       "--checkpoint-every-s", "1000", "--max-restarts", "1")
    deadline = time.monotonic() + 300
    while not list((data / "checkpoints").glob("ckpt-*.pt")) or len(history(data / "rank-1")) < 13:
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(0.2)
    victim = rank_pid(proc, 1)
    assert victim is not None
    import os

    os.kill(victim, signal.SIGKILL)
    assert proc.wait(600) == 0, log.read_text()[-4000:]
    text = log.read_text()
    assert "rank 0/2 resumed from checkpoint" in text and "rank 1/2 resumed from checkpoint" in text  # the group
    per_rank = [stats(data / f"rank-{r}") for r in range(2)]
    assert sum(s["trained"] for s in per_rank) == len(samples)
    assert sorted(_trained(data)) == identities  # the final lineage trained each sample once
    assert Counter(p for _g, p, _o, _s in _trained(data)) == Counter(s.partition for s in samples)

    clean = tmp_path / "clean"  # an uninterrupted run over the same topic: the same counts
    again = start_ranks(settings, clean, tmp_path / "clean.log", 2, *ARGS, "--idle-exit", "4")
    assert again.wait(600) == 0, (tmp_path / "clean.log").read_text()[-4000:]
    assert sum(stats(clean / f"rank-{r}")["trained"] for r in range(2)) == len(samples)
    assert sorted(_trained(clean)) == identities


@pytest.mark.slow  # ~30-70 s; the default suite keeps its time budget (make test-slow)
def test_sigterm_to_one_rank_stops_both_after_a_complete_final_checkpoint(topic_settings, tmp_path):
    import os

    settings = topic_settings
    ensure_app_topics(settings.bootstrap, settings)
    produce_identified_samples(settings, 1500)
    data = tmp_path / "trainer"
    log = tmp_path / "ranks.log"
    proc = start_ranks(settings, data, log, 2, *ARGS, "--checkpoint-every-s", "1000")  # no idle exit: runs until stopped
    deadline = time.monotonic() + 300
    while len(history(data / "rank-0")) < 3:
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(0.2)
    os.kill(rank_pid(proc, 1), signal.SIGTERM)  # one rank only: the vote stops the group
    assert proc.wait(120) == 0, log.read_text()[-4000:]
    per_rank = [stats(data / f"rank-{r}") for r in range(2)]
    assert per_rank[0]["steps"] == per_rank[1]["steps"] > 0
    final = f"ckpt-{per_rank[0]['steps']:012d}"
    assert {p.name for p in (data / "checkpoints").glob(final + "*")} == {
        f"{final}.pt", f"{final}.rank-0-of-2.pt", f"{final}.rank-1-of-2.pt"}
