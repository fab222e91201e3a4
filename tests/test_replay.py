"""Replay through the real broker: every record lands on the events topic or the DLQ, in order."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

from tgastream.core.events import WATERMARK_KEY, load_events, parse_json
from tgastream.stream.replay import ReplayConfig, copy_topic, make_producer, replay_file
from tgastream.stream.synth import SynthConfig, write_file
from tgastream.stream.topics import ensure_app_topics
from tests.kafka_util import read_topic

BAD_LINES = ["1,2,3,like,100", "1,2,3,pv", "1,2,3,pv,notatime", ",2,3,pv,100"]


def _log_with_bad_lines(tmp_path: Path) -> tuple[Path, int]:
    src = tmp_path / "src.csv"
    write_file(SynthConfig(users=50, events=3000, seed=11), src)
    lines = src.read_text().splitlines()
    for i, bad in enumerate(BAD_LINES):
        lines.insert(100 * (i + 1), bad)
    path = tmp_path / "log.csv"
    path.write_text("\n".join(lines) + "\n")
    return path, 3000


def test_replay_round_trip_valid_to_topic_rejects_to_dlq_order_per_user(topic_settings, tmp_path):
    settings = topic_settings
    path, n_good = _log_with_bad_lines(tmp_path)
    ensure_app_topics(settings.bootstrap, settings)
    summary = replay_file(settings.bootstrap, settings, ReplayConfig(path=path, order="file"), progress=False)
    assert summary.sent == n_good
    assert sum(summary.rejected.values()) == len(BAD_LINES)
    assert summary.rejected == {"unknown_behavior": 1, "wrong_field_count": 1, "bad_timestamp": 1, "empty_field": 1}

    records = read_topic(settings.bootstrap, settings.events_topic, expected=n_good)
    assert len(records) == n_good
    got_by_user = defaultdict(list)
    for r in records:
        ev = parse_json(r.value)
        assert r.key == ev.user_id.encode()
        got_by_user[ev.user_id].append(ev)
    want_by_user = defaultdict(list)
    for ev in load_events(path):
        want_by_user[ev.user_id].append(ev)
    assert got_by_user == want_by_user  # per-user order preserved, nothing lost or added

    dlq = read_topic(settings.bootstrap, settings.dlq_topic, expected=len(BAD_LINES))
    assert sorted(r.value.decode() for r in dlq) == sorted(BAD_LINES)
    assert all(dict(r.headers)["reason"] and dict(r.headers)["source"].startswith(b"log.csv:") for r in dlq)


def test_replay_rate_is_honoured_and_watermark_is_sent(topic_settings, tmp_path):
    settings = topic_settings
    path = tmp_path / "x.csv"
    write_file(SynthConfig(users=20, events=400, seed=5), path)
    ensure_app_topics(settings.bootstrap, settings)
    summary = replay_file(settings.bootstrap, settings, ReplayConfig(path=path, rate=500, watermark=True), progress=False)
    assert summary.sent == 400
    assert 0.7 <= summary.seconds and summary.events_per_s < 600
    records = read_topic(settings.bootstrap, settings.events_topic, expected=400 + settings.partitions)
    marks = [r for r in records if r.key == WATERMARK_KEY]
    assert sorted(r.partition for r in marks) == list(range(settings.partitions))
    assert json.loads(marks[0].value)["watermark"] == max(e.ts for e in load_events(path))


def test_periodic_watermarks_follow_event_time_and_never_pass_an_unsent_event(topic_settings, tmp_path):
    settings = topic_settings
    path = tmp_path / "x.csv"
    write_file(SynthConfig(users=20, events=400, seed=5, days=2), path)
    ensure_app_topics(settings.bootstrap, settings)
    events = sorted(load_events(path), key=lambda e: e.ts)
    summary = replay_file(settings.bootstrap, settings, ReplayConfig(path=path, watermark_every_s=6 * 3600.0),
                          progress=False)
    assert summary.sent == 400
    records = read_topic(settings.bootstrap, settings.events_topic, expected=400 + 3 * settings.partitions)
    marks = sorted({json.loads(r.value)["watermark"] for r in records if r.key == WATERMARK_KEY})
    span = events[-1].ts - events[0].ts
    assert 3 <= len(marks) <= span / (6 * 3600.0) + 1  # about one per 6 h of event time
    by_partition = defaultdict(list)
    for r in records:
        by_partition[r.partition].append(r)
    for recs in by_partition.values():  # in each partition, no event after a watermark is older than it
        mark = float("-inf")
        for r in recs:
            if r.key == WATERMARK_KEY:
                mark = json.loads(r.value)["watermark"]
            else:
                assert parse_json(r.value).ts >= mark
    assert marks[-1] <= events[-1].ts


def test_copy_topic_since_skips_older_records(topic_settings):
    settings = topic_settings
    ensure_app_topics(settings.bootstrap, settings)
    src = settings.events_topic
    producer = make_producer(settings.bootstrap)
    for i in range(20):
        producer.send(src, key=b"u%d" % (i % 3), value=b"old-%d" % i)
    producer.flush()
    time.sleep(1.1)
    since_ms = int(time.time() * 1000)
    for i in range(15):
        producer.send(src, key=b"u%d" % (i % 3), value=b"new-%d" % i, headers=[("h", b"1")])
    producer.flush()
    producer.close()
    summary = copy_topic(settings.bootstrap, src, settings.dlq_topic, since_ms, idle_s=1.0, progress=False)
    assert summary.copied == 15
    copied = read_topic(settings.bootstrap, settings.dlq_topic, expected=15)
    assert sorted(r.value for r in copied) == sorted(b"new-%d" % i for i in range(15))
    assert all(dict(r.headers) == {"h": b"1"} for r in copied)
