"""The chaos verifier finds what is lost and what is extra (no broker: fast, in the default suite).

A verifier that cannot fail proves nothing: each check is fed a record set with a known fault."""

from __future__ import annotations

from collections import Counter

from tgastream.core.events import BEHAVIORS, Event
from tgastream.state.samples import samples_from_events
from tgastream.stream.synth import SynthConfig, generate
from tests.stream_reference import offline_records, sample_identity
from tests.system.chaos import ChaosConfig, Ledger, make_schedule

DAY = 86400.0


def _events() -> list[Event]:
    rows = generate(SynthConfig(users=10, events=600, items=100, seed=5))
    return [Event(str(u + 1), str(i + 1), str(c + 1), BEHAVIORS[b], float(ts)) for ts, u, i, c, b in rows]


def _stamped(events):
    """Offline samples with identities as workers stamp them (partition, offset, seq)."""
    samples = samples_from_events(events, final_watermark=events[-1].ts + DAY)
    for n, s in enumerate(samples):
        s.partition, s.offset, s.seq = n % 4, n, 0
    return samples


def test_samples_deduplicated_by_identity_none_missing_none_invented():
    samples = _stamped(_events())
    expected = Counter(sample_identity(s) for s in samples)
    values = [s.to_bytes() for s in samples]

    ok = Ledger()
    by_id, dup = ok.samples(values + values[:7], expected)  # re-emitted copies: counted, not a loss
    assert (ok.missing, ok.extra, ok.lost, dup, len(by_id)) == ({}, {}, 0, 7, len(samples))

    lossy = Ledger()
    lossy.samples(values[:10] + values[11:], expected)
    assert lossy.lost == 1 and lossy.missing["samples"].startswith("1 [")

    forged = samples[3]
    forged.label = 1 - forged.label  # the same identity carrying another sample
    bad = Ledger()
    bad.samples(values + [forged.to_bytes()], expected)
    assert "samples: one identity, two different samples" in bad.extra


def test_trained_log_each_identity_exactly_once():
    ids = {(0, p, o, 0) for p in range(4) for o in range(5)}
    ok = Ledger()
    assert ok.trained(sorted(ids), ids) == 0 and not ok.missing and not ok.extra
    bad = Ledger()
    trained = sorted(ids)[1:] + [sorted(ids)[2], (0, 9, 9, 0)]  # one untrained, one twice, one unknown
    assert bad.trained(trained, ids) == 1
    assert bad.lost == 1 and "samples never trained" in bad.missing
    assert {"samples trained twice", "trained identities not on the samples topic"} <= set(bad.extra)


def test_dlq_states_and_vectors():
    led = Ledger()
    assert led.dlq([b"a", b"a", None, b"c"], [b"a", b"b", b""]) == 1
    assert led.lost == 1 and "bad records on the DLQ" in led.missing and "DLQ records that are no bad record of ours" in led.extra

    events = _events()
    want = offline_records(events, final_watermark=events[-1].ts + DAY)
    other = offline_records(events[:-1], final_watermark=events[-1].ts + DAY)
    stored = {u: (0, r) for u, r in want.items()}
    led = Ledger()
    led.states(stored, want)
    assert (led.missing, led.extra, led.lost) == ({}, {}, 0)
    led = Ledger()
    led.states({**stored, events[-1].user_id: (0, other[events[-1].user_id])}, want)
    assert led.lost == 1 and "user states equal to the offline build (these differ)" in led.missing

    led = Ledger()
    led.vectors({"1", "2"}, {"1", "2", "3"}, {"1", "2", "3"})
    assert led.lost == 1 and "user vectors (users with samples)" in led.missing


def test_the_schedule_is_seeded_and_holds_every_fault_kind():
    cfg = ChaosConfig()
    a, b = make_schedule(cfg), make_schedule(cfg)
    assert [f.describe() for f in a] == [f.describe() for f in b]
    assert len(a) >= 10 and {f.kind for f in a} == set(cfg.kinds)
    assert all(cfg.pause_s[0] <= f.pause_s <= cfg.pause_s[1] for f in a if f.kind == "pause_broker")
    ends = [f.at_s + f.pause_s for f in a]
    assert all(later.at_s >= end for later, end in zip(a[1:], ends))  # one fault at a time
    assert ends[-1] <= cfg.events / cfg.rate  # all within the replay
