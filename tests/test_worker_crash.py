"""kill -9 a worker mid-replay, start a new one: the final state is the no-crash state."""

from __future__ import annotations

import threading
from collections import Counter

import pytest

from tgastream.state.samples import Sample
from tgastream.stream.replay import ReplayConfig, ReplaySummary, replay_file
from tgastream.stream.synth import SynthConfig, write_file
from tests.kafka_util import read_topic
from tests.stream_reference import (
    comparable, offline_records, offline_sample_counter, read_store, replay_order, sample_identity,
)
from tests.worker_util import start_worker, worker_state_dir

DAY = 86400.0


@pytest.mark.parametrize("restart", ["same_disk", "fresh_disk"])
def test_kill9_mid_replay_then_restart_gives_the_no_crash_state(topic_settings, tmp_path, restart):
    """same_disk: the new worker reopens the killed one's RocksDB and replays the changelog tail;
    fresh_disk: it has nothing local and rebuilds every user from the changelog topic alone."""
    settings = topic_settings
    path = tmp_path / "log.csv"
    write_file(SynthConfig(users=80, events=9000, seed=33, days=3), path)
    first = start_worker(settings, tmp_path / "first.log", "--worker-batch", "400")
    summary: list[ReplaySummary] = []
    replay = threading.Thread(target=lambda: summary.append(replay_file(
        settings.bootstrap, settings, ReplayConfig(path=path, rate=1500, watermark=True, watermark_margin_s=DAY), progress=False)))
    try:
        first.wait_up()
        replay.start()
        first.wait_total("tgastream_events_consumed_total", 3500)
        first.wait_total("tgastream_state_update_seconds_count", 2)  # some state durable (RocksDB + changelog)
        first.kill9()  # mid-replay: some state durable, some only in memory, offsets partly committed
        second_settings = settings if restart == "same_disk" else settings.replace(data_dir=tmp_path / "fresh")
        second = start_worker(second_settings, tmp_path / "second.log")
        try:
            replay.join(120)
            assert summary and summary[0].sent == 9000
            second.wait_total("tgastream_watermarks_total", settings.partitions)  # the last record of every partition
            redelivered = second.total("tgastream_events_redelivered_total")
            assert second.stop() == 0, second.log()
        finally:
            if second.proc.poll() is None:
                second.kill9()
    finally:
        if first.proc.poll() is None:
            first.kill9()
        replay.join(120)

    events = replay_order(path)
    mark = max(e.ts for e in events) + DAY
    want = offline_records(events, final_watermark=mark)
    stored = read_store(worker_state_dir(second_settings))
    assert set(stored) == set(want)
    mismatched = [u for u, (_, r) in stored.items() if comparable(r) != comparable(want[u])]
    assert not mismatched, f"{len(mismatched)} users differ from the no-crash state (re-delivered {redelivered})"

    expected = offline_sample_counter(events, mark)
    records = read_topic(settings.bootstrap, settings.samples_topic, expected=expected.total())
    got = Counter(sample_identity(Sample.from_bytes(r.value)) for r in records)
    assert set(got) == set(expected)  # no sample lost, none invented ...
    assert all(got[k] >= n for k, n in expected.items())  # ... a few may repeat (at-least-once)
