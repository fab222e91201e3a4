"""A broker restart under a running worker (Tansu keeps topics in memory: every topic comes back
empty, with a new id). The worker stays up, keeps every user's state (it re-seeds the new
changelog from local state) and applies every event of the re-created source once: none skipped
as "already applied" because of offsets that start again at 0."""

from __future__ import annotations

import os
import signal

from tgastream.core.settings import Settings
from tgastream.stream.broker import EmbeddedBroker, free_port
from tgastream.stream.replay import ReplayConfig, replay_file
from tests.stream_reference import comparable, offline_records, read_store, replay_order
from tests.test_stop_deadline import DAY, _time_ordered_halves
from tests.worker_util import start_worker, worker_state_dir


def test_a_worker_survives_a_broker_restart_and_applies_every_later_event_once(tmp_path):
    path, first, second = _time_ordered_halves(tmp_path)
    port = free_port()
    broker = EmbeddedBroker(port=port, log_path=tmp_path / "tansu-1.log").start()
    settings = Settings(bootstrap=broker.bootstrap, partitions=4, data_dir=tmp_path / "data")
    worker = start_worker(settings, tmp_path / "worker.log")
    restarted = None
    try:
        worker.wait_up()
        sent = replay_file(settings.bootstrap, settings, ReplayConfig(path=first), progress=False).sent
        worker.wait_total("tgastream_events_applied_total", sent)
        worker.wait_total("tgastream_state_update_seconds_count", 1)
        os.killpg(broker.pid, signal.SIGKILL)  # every topic, offset and group is gone with it
        broker.stop()
        restarted = EmbeddedBroker(port=port, log_path=tmp_path / "tansu-2.log").start()
        later = replay_file(settings.bootstrap, settings,
                            ReplayConfig(path=second, watermark=True, watermark_margin_s=DAY), progress=False).sent
        worker.wait_total("tgastream_watermarks_total", settings.partitions, timeout_s=180)
        metrics = worker.metrics()
        assert worker.proc.poll() is None, worker.log()  # the same process all along
        assert worker.stop() == 0, worker.log()
    finally:
        if worker.proc.poll() is None:
            worker.kill9()
        if restarted is not None:
            restarted.stop()
        broker.stop()

    assert metrics["tgastream_events_applied_total"] == sent + later  # every later event applied once
    assert metrics["tgastream_events_redelivered_total"] == 0  # none skipped as seen before
    assert sum(v for k, v in metrics.items() if k.startswith("tgastream_topic_generations_total{")) >= 1
    events = replay_order(path)
    want = offline_records(events, final_watermark=max(e.ts for e in events) + DAY)
    stored = read_store(worker_state_dir(settings))
    assert set(stored) == set(want)  # the state from before the restart survived it
    assert {u: comparable(r) for u, (_, r) in stored.items()} == {u: comparable(r) for u, r in want.items()}
