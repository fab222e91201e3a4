"""kill -9 the trainer mid-stream: it resumes from its checkpoint, counts every sample once and
trains every sample exactly once in the lineage of its final model; re-delivered copies of samples
(a worker re-emitting after a failover) are never trained again."""

from __future__ import annotations

import signal
import time

import pytest

from tgastream.stream.topics import ensure_app_topics
from tgastream.stream.trained_log import read_trained
from tests.trainer_util import history, produce_identified_samples, start_trainer, stats


def _produce_samples(settings, n_events: int, redeliver: int = 300) -> tuple[set[tuple], int]:
    """Samples with identities as a worker stamps them (partition, offset, seq), the first
    ``redeliver`` of every partition sent twice (the second time after the rest); their identities
    and how many are conversion labels."""
    from tgastream.state.samples import CONVERSION

    samples = produce_identified_samples(settings, n_events, redeliver=redeliver, seed=9)
    return {(0, s.partition, s.offset, 0) for s in samples}, sum(s.kind == CONVERSION for s in samples)


@pytest.mark.parametrize("feedback", ["wait", "fnw"])
def test_killed_trainer_resumes_from_checkpoint_and_counts_each_sample_once(topic_settings, tmp_path, feedback):
    """Under either feedback mode (fnw: a bought click's early negative and its positive are two
    samples), and with the click-time predictions pending at the kill restored: every label
    finds the prediction made at its click."""
    settings = topic_settings
    ensure_app_topics(settings.bootstrap, settings)
    identities, labels = _produce_samples(settings, 4000)
    n = len(identities)
    data = tmp_path / "trainer"
    args = ("--batch-size", "64", "--burst", "2", "--checkpoint-every-steps", "5", "--checkpoint-every-s", "1000", "--idle-exit", "4",
            "--sample-len", "20", "--conversion-feedback", feedback)
    first = start_trainer(settings, data, tmp_path / "t1.log", *args)
    deadline = time.monotonic() + 300
    while not (data / "checkpoints").exists() or len(history(data)) < 23:  # past a checkpoint, not on one
        assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "t1.log").read_text()[-3000:]
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)
    first.wait(30)
    steps_before_kill = history(data)[-1]["step"]

    second = start_trainer(settings, data, tmp_path / "t2.log", *args)
    assert second.wait(600) == 0, (tmp_path / "t2.log").read_text()[-3000:]
    log2 = (tmp_path / "t2.log").read_text()
    assert "resumed" in log2
    st = stats(data)
    assert st["samples"] == n + st["redelivered"]  # every record once: re-read after the checkpoint, not double-counted
    assert st["trained"] == n and st["redelivered"] == 4 * 300  # each sample trained once, no copy
    trained = read_trained(data / "trained-samples.log")
    assert sorted(trained) == sorted(identities)  # the final model's lineage trained each exactly once
    online = st["online"]  # pending click-time predictions came back with the checkpoint: none lost
    assert online["clicktime_unmatched"] == 0 and online["clicktime_evicted"] == 0
    assert online["clicktime_joined"] == labels and online["clicktime_pending"] == 0
    steps_logged = [x["step"] for x in history(data)]
    assert len(steps_logged) > st["steps"]  # the steps after the last checkpoint ran twice: resumed, not restarted
    assert steps_before_kill < st["steps"]

    # an uninterrupted run over the same topic ends with the same count
    clean = tmp_path / "clean"
    third = start_trainer(settings, clean, tmp_path / "t3.log", *args)
    assert third.wait(600) == 0
    assert stats(clean)["trained"] == n  # (step counts may differ: batches grow while the trainer is behind)
    # every click predicted by the publishing forward and handed over: none left to its training step
    # (unless the guard rolled back: the good model's forward is not the learner's, model/online.py)
    final = stats(clean)
    assert final["online"]["clicktime_in_step"] == 0 or final["rollbacks"] > 0, final["online"]
    assert sorted(read_trained(clean / "trained-samples.log")) == sorted(identities)
