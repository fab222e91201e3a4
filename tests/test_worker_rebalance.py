"""Two workers share the partitions: a second one joins mid-stream, state moves, nothing breaks."""

from __future__ import annotations

from collections import Counter

from tgastream.state.record import UserRecord
from tgastream.state.samples import Sample
from tgastream.state.store import INTERNAL_PREFIX
from tgastream.stream.app import changelog_topic
from tgastream.stream.replay import ReplayConfig, replay_file
from tgastream.stream.synth import SynthConfig, write_file
from tests.kafka_util import read_topic
from tests.stream_reference import comparable, offline_records, offline_sample_counter, replay_order, sample_identity
from tests.worker_util import committed_offsets, start_worker, wait_until

DAY = 86400.0


def last_offsets(settings) -> dict[int, int]:
    """Offset of the last record of every partition of the events topic (all records counted in)."""
    records = read_topic(settings.bootstrap, settings.events_topic, expected=8000 + settings.partitions)
    ends: dict[int, int] = {}
    for r in records:
        ends[r.partition] = max(r.offset, ends.get(r.partition, -1))
    assert len(ends) == settings.partitions and len(records) == 8000 + settings.partitions, (len(ends), len(records))
    return ends


def test_a_second_worker_joining_takes_partitions_and_the_changelog_holds_the_no_crash_state(topic_settings, tmp_path):
    settings = topic_settings
    first_half, second_half = tmp_path / "a.csv", tmp_path / "b.csv"
    write_file(SynthConfig(users=80, events=8000, seed=44, days=3), tmp_path / "all.csv")
    lines = (tmp_path / "all.csv").read_text().splitlines(keepends=True)  # time-ordered already
    first_half.write_text("".join(lines[:4000]))
    second_half.write_text("".join(lines[4000:]))
    a = start_worker(settings, tmp_path / "a.log")
    b = None
    try:
        a.wait_up()
        replay_file(settings.bootstrap, settings, ReplayConfig(path=first_half, order="file"), progress=False)
        a.wait_total("tgastream_events_applied_total", 4000)
        b = start_worker(settings, tmp_path / "b.log")  # same data dir: it claims the next free slot
        b.wait_up()
        replay_file(settings.bootstrap, settings, ReplayConfig(path=second_half, order="file", rate=1000, watermark=True,
                                                  watermark_margin_s=DAY), progress=False)
        # Done means: every partition's last record (its watermark) applied by the partition's
        # current owner and made durable, i.e. the group's committed offset is past it. Counting
        # processed watermarks is not that: a rebalance re-delivers records (faust seeks back to the
        # committed offsets), so the workers' watermark counts can add up to the partition count
        # while a worker still rejoining the group has not yet read the tail of its partitions.
        ends = last_offsets(settings)
        wait_until(lambda: all((done.get(p) or 0) > last for done in [committed_offsets(settings)]
                               for p, last in ends.items()),
                   120, "every partition's last record committed", a, b)
        b_applied = b.total("tgastream_events_applied_total")
        assert a.stop() == 0, a.log()
        assert b.stop() == 0, b.log()
    finally:
        for w in (a, b):
            if w is not None and w.proc.poll() is None:
                w.kill9()
    assert b_applied > 0, "the second worker got no partitions"

    events = replay_order(first_half) + replay_order(second_half)
    mark = max(e.ts for e in events) + DAY
    want = offline_records(events, final_watermark=mark)
    changelog = read_topic(settings.bootstrap, changelog_topic(settings))
    latest = {r.key.decode(): UserRecord.from_bytes(r.value) for r in changelog
              if not r.key.startswith(INTERNAL_PREFIX)}
    assert {u: comparable(r) for u, r in latest.items()} == {u: comparable(r) for u, r in want.items()}

    expected = offline_sample_counter(events, mark)
    got = Counter(sample_identity(Sample.from_bytes(r.value))
                  for r in read_topic(settings.bootstrap, settings.samples_topic, expected=expected.total()))
    assert set(got) == set(expected) and all(got[k] >= n for k, n in expected.items())
