"""The trainer waits for a broker that does not answer yet (restarting, paused) instead of exiting."""

from __future__ import annotations

import pytest
from kafka.errors import KafkaTimeoutError

from tgastream.core.settings import Settings
from tgastream.stream import trainer as trainer_module
from tgastream.stream.trainer import Trainer


def test_connecting_is_retried_until_the_broker_answers_and_gives_up_after_its_deadline(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_module.time, "sleep", lambda s: None)
    t = Trainer(Settings(data_dir=tmp_path), "127.0.0.1:1", learner=None)
    attempts = []

    def flaky():
        attempts.append(1)
        if len(attempts) < 3:
            raise KafkaTimeoutError("Unable to bootstrap")
        return "connected"

    assert t._until_connected(flaky, "the producer") == "connected" and len(attempts) == 3
    with pytest.raises(KafkaTimeoutError):
        t._until_connected(lambda: (_ for _ in ()).throw(KafkaTimeoutError("still away")), "the producer", timeout_s=0)
