"""A real worker on the real broker: state equals the offline build, samples and DLQ are exact."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from kafka import KafkaProducer

from tgastream.state.samples import Sample
from tgastream.core.events import WATERMARK_KEY
from tgastream.stream.replay import ReplayConfig, replay_file
from tgastream.stream.synth import SynthConfig, write_file
from tests.kafka_util import read_topic
from tests.stream_reference import (
    comparable, offline_records, offline_sample_counter, read_store, replay_order, sample_identity,
)
from tests.worker_util import start_worker, worker_state_dir

DAY = 86400.0
FILE_BAD = ["1,2,3,like,100", "1,2,3,pv,notatime"]  # rejected by replay itself
WIRE_BAD = [  # records any client may write: the worker must reject them and keep going
    (b"9", None, "empty_record"),
    (b"9", b"\xff\xfe\x00\x01", "not_utf8"),
    (b"9", b"{" * 6000, "oversize"),
    (b"9", b"<xml/>", "not_json"),
    (b"9", b'{"user_id":"9","item_id":"1","category_id":"1","behavior":"pv","ts":"x"}', "wrong_type"),
    (b"9", b'{"user_id":"\\udc80","item_id":"1","category_id":"1","behavior":"pv","ts":5}', "not_utf8"),
    (None, b'{"user_id":"9","item_id":"1","category_id":"1","behavior":"pv","ts":5}', "wrong_key"),
    (WATERMARK_KEY, b"{}", "bad_timestamp"),
]


def _log(tmp_path: Path) -> Path:
    src = tmp_path / "src.csv"
    write_file(SynthConfig(users=60, events=6000, seed=21, days=4), src)
    lines = src.read_text().splitlines()
    for i, bad in enumerate(FILE_BAD):
        lines.insert(500 * (i + 1), bad)
    path = tmp_path / "log.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


GAUGES = ("tgastream_partition_lag", "tgastream_pending_windows", "tgastream_store_bytes",
          "tgastream_events_per_second")


def _durable_everything(metrics: dict[str, float], applied: int) -> bool:
    """Every valid event applied and at least one flush observed (it sets the latency and the gauges)."""
    return (metrics.get("tgastream_events_applied_total", 0) >= applied
            and metrics.get("tgastream_state_update_seconds_count", 0) > 0
            and all(any(k.startswith(name) for k in metrics) for name in GAUGES))


def test_worker_state_samples_features_and_dlq_match_the_offline_build(topic_settings, tmp_path):
    settings = topic_settings
    path = _log(tmp_path)
    worker = start_worker(settings, tmp_path / "worker.log")
    try:
        worker.wait_up()
        producer = KafkaProducer(bootstrap_servers=settings.bootstrap)
        for i, (key, value, _) in enumerate(WIRE_BAD):
            producer.send(settings.events_topic, key=key, value=value, partition=i % settings.partitions)
        producer.flush()
        producer.close()
        summary = replay_file(settings.bootstrap, settings, ReplayConfig(path=path, watermark=True, watermark_margin_s=DAY),
                              progress=False)
        total = summary.sent + len(WIRE_BAD) + settings.partitions
        worker.wait_total("tgastream_events_consumed_total", total)
        metrics = worker.wait_metrics(lambda m: _durable_everything(m, summary.sent), "every batch durable")
        assert worker.stop() == 0, worker.log()
    finally:
        if worker.proc.poll() is None:
            worker.kill9()

    events = replay_order(path)
    mark = max(e.ts for e in events) + DAY
    want = offline_records(events, final_watermark=mark)
    stored = read_store(worker_state_dir(settings))
    assert set(stored) == set(want)
    assert {u: comparable(r) for u, (_, r) in stored.items()} == {u: comparable(r) for u, r in want.items()}

    expected = offline_sample_counter(events, mark)
    records = read_topic(settings.bootstrap, settings.samples_topic, expected=expected.total())
    got = Counter(sample_identity(Sample.from_bytes(r.value)) for r in records)
    assert got == expected  # every sample exactly once (no crash here)
    assert all(r.key == Sample.from_bytes(r.value).user_id.encode() for r in records)
    assert {r.partition for r in records if r.key == b"9"} <= {stored["9"][0]}  # samples stay on the user's partition

    dlq = read_topic(settings.bootstrap, settings.dlq_topic, expected=len(FILE_BAD) + len(WIRE_BAD))
    got_bad = sorted((r.value or b"", dict(r.headers)["reason"].decode()) for r in dlq)
    want_bad = sorted([(line.encode(), None) for line in FILE_BAD] + [(v or b"", reason) for _, v, reason in WIRE_BAD],
                      key=lambda t: t[0])
    assert [v for v, _ in got_bad] == [v for v, _ in want_bad]
    assert Counter(r for _, r in got_bad if r in {x for *_, x in WIRE_BAD}) >= Counter(r for *_, r in WIRE_BAD)

    features = read_topic(settings.bootstrap, settings.features_topic, expected=len(want))
    latest = {r.key.decode(): json.loads(r.value) for r in features}
    assert latest == {u: r.features.snapshot(u) for u, r in want.items()}

    assert metrics["tgastream_events_applied_total"] == summary.sent
    for _, _, reason in WIRE_BAD:
        assert metrics[f"tgastream_events_rejected_total{{reason={reason}}}"] >= 1
    assert sum(v for k, v in metrics.items() if k.startswith("tgastream_samples_emitted_total")) == expected.total()
    assert metrics["tgastream_state_update_seconds_count"] > 0
    for name in GAUGES:
        assert any(k.startswith(name) for k in metrics), name


def test_local_state_ahead_of_the_changelog_is_dropped_at_start(topic_settings, tmp_path):
    """A broker restart (Tansu: memory only) recreates an empty changelog; stale local state goes."""
    from tgastream.state.store import StateStore
    from tgastream.stream.app import build_worker, worker_topics
    from tgastream.stream.topics import ensure_topics
    from tgastream.stream.worker import drop_stale_partitions

    settings = topic_settings
    ensure_topics(settings.bootstrap, worker_topics(settings), settings.partitions)
    stale = StateStore(tmp_path / "w" / "state", "user-state")
    stale.partition(1).write({b"u": b"from another incarnation"})
    stale.partition(1).set_changelog_offset(500)
    stale.close()
    worker = build_worker(settings, tmp_path / "w")
    try:
        assert drop_stale_partitions(worker) == [1]
        assert worker.store.partition(1).get(b"u") is None
    finally:
        worker.store.close()
