"""A broker restart under a running worker and trainer (Tansu keeps topics in memory: every topic
comes back empty, with a new id). Both stay up; the worker keeps every user's state (it re-seeds
the new changelog from local state) and applies every event of the re-created source once: none
skipped as "already applied" because of offsets that start again at 0; the trainer trains every
sample of the new samples topic once and publishes every later user's vector on the new embeddings topic."""

from __future__ import annotations

import os
import signal

from tgastream.core.settings import Settings
from tgastream.stream.broker import EmbeddedBroker, free_port
from tgastream.stream.replay import ReplayConfig, replay_file
from tests.stream_reference import comparable, offline_records, read_store, replay_order
from tests.test_stop_deadline import DAY, _time_ordered_halves
from tests.kafka_util import read_topic
from tests.trainer_util import start_trainer
from tests.worker_util import start_worker, wait_until, worker_state_dir
from tgastream.stream.promscrape import scrape, total


def test_a_worker_survives_a_broker_restart_and_applies_every_later_event_once(tmp_path):
    path, first, second = _time_ordered_halves(tmp_path)
    port = free_port()
    broker = EmbeddedBroker(port=port, log_path=tmp_path / "tansu-1.log").start()
    settings = Settings(bootstrap=broker.bootstrap, partitions=4, data_dir=tmp_path / "data")
    worker = start_worker(settings, tmp_path / "worker.log")
    trainer_port = free_port()
    trainer = start_trainer(settings, tmp_path / "trainer", tmp_path / "trainer.log", "--batch-size", "128",
                            "--metrics-port", str(trainer_port))
    restarted = None

    def trained() -> float:
        return total(scrape(trainer_port), "tgastream_trainer_samples_trained_total")

    def all_trained() -> bool:
        return 0 < worker.total("tgastream_samples_emitted_total") == trained()

    try:
        worker.wait_up()
        sent = replay_file(settings.bootstrap, settings, ReplayConfig(path=first), progress=False).sent
        worker.wait_total("tgastream_events_applied_total", sent)
        worker.wait_total("tgastream_state_update_seconds_count", 1)
        wait_until(all_trained, 180, "the trainer trained every sample", worker)
        os.killpg(broker.pid, signal.SIGKILL)  # every topic, offset and group is gone with it
        broker.stop()
        restarted = EmbeddedBroker(port=port, log_path=tmp_path / "tansu-2.log").start()
        later = replay_file(settings.bootstrap, settings,
                            ReplayConfig(path=second, watermark=True, watermark_margin_s=DAY), progress=False).sent
        worker.wait_total("tgastream_watermarks_total", settings.partitions, timeout_s=180)
        wait_until(all_trained, 180, "the trainer trained every sample after the restart", worker)
        assert trainer.poll() is None, (tmp_path / "trainer.log").read_text()[-3000:]
        trainer_metrics = scrape(trainer_port)
        metrics = worker.metrics()
        assert worker.proc.poll() is None, worker.log()  # the same process all along
        assert worker.stop() == 0, worker.log()
        trainer.send_signal(signal.SIGTERM)
        assert trainer.wait(30) == 0, (tmp_path / "trainer.log").read_text()[-3000:]
        # the trainer's vectors reach the new embeddings topic: its producer outlived the restart
        later_users = {line.split(",", 1)[0] for line in second.read_text().splitlines() if line}
        published: set[str] = set()

        def every_later_user_published() -> bool:
            published.update(r.key[len(b"user:"):].decode() for r in read_topic(settings.bootstrap, settings.embeddings_topic)
                             if r.key and r.key.startswith(b"user:"))
            return later_users <= published

        if not every_later_user_published():  # (one read can come back short on a loaded machine)
            wait_until(every_later_user_published, 60,
                       f"vectors of {sorted(later_users - published)[:10]} on the new embeddings topic")
    finally:
        if trainer.poll() is None:
            trainer.kill()
        if worker.proc.poll() is None:
            worker.kill9()
        if restarted is not None:
            restarted.stop()
        broker.stop()

    assert metrics["tgastream_events_applied_total"] == sent + later  # every later event applied once
    assert metrics["tgastream_events_redelivered_total"] == 0  # none skipped as seen before
    assert sum(v for k, v in metrics.items() if k.startswith("tgastream_topic_generations_total{")) >= 1
    assert total(trainer_metrics, "tgastream_topic_generations_total") >= 1  # it noticed the new samples topic
    assert total(trainer_metrics, "tgastream_trainer_samples_redelivered_total") == 0
    events = replay_order(path)
    want = offline_records(events, final_watermark=max(e.ts for e in events) + DAY)
    stored = read_store(worker_state_dir(settings))
    assert set(stored) == set(want)  # the state from before the restart survived it
    assert {u: comparable(r) for u, (_, r) in stored.items()} == {u: comparable(r) for u, r in want.items()}
