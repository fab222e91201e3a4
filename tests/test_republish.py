"""The re-publish sweep's bookkeeping: oldest publishes first, bounded, only vectors of older models."""

from __future__ import annotations

from tgastream.stream.republish import Published


def test_stale_vectors_come_oldest_first_within_the_budget_and_only_from_older_models():
    p = Published(capacity=100)
    for k in range(5):
        p.user(f"u{k}", version=k, context=b"c%d" % k, event_ts=float(k))
        p.item(f"i{k}", version=k, category="c")
    users, items = p.stale(current=3, budget=4)
    assert list(users) == ["u0", "u1"] and list(items) == ["i0", "i1"]  # half the budget each, oldest first
    users, items = p.stale(current=3, budget=100)
    assert list(users) == ["u0", "u1", "u2"] and list(items) == ["i0", "i1", "i2"]  # versions 3, 4 are current
    assert p.version_lag(4) == 4
    p.user("u0", version=4, context=b"c0", event_ts=0.0)  # re-published: moves to the back
    assert list(p.stale(current=4, budget=100)[0]) == ["u1", "u2", "u3"] and p.version_lag(4) == 4  # i0 still old


def test_the_bookkeeping_is_bounded():
    p = Published(capacity=3)
    for k in range(10):
        p.user(f"u{k}", version=k, context=b"", event_ts=0.0)
    assert list(p.users) == ["u7", "u8", "u9"]


def test_after_a_rollback_what_the_bad_model_published_goes_out_again_first():
    p = Published()
    for k, version in enumerate([3, 5, 8, 9]):  # 8 and 9: the bad models; 5: the good one rolled back to
        p.user(f"u{k}", version, b"ctx", float(k))
        p.item(f"i{k}", version, "c")
    p.demote(newer_than=5)
    users, items = p.stale(5, budget=100)  # the sweep with the good version 5
    assert list(users) == ["u2", "u3", "u0"] and list(items) == ["i2", "i3", "i0"]  # bad ones first, 5 is current


def test_the_sweep_yields_to_training_only_while_more_than_a_batch_is_waiting():
    from tgastream.stream.trainer import republish_rate_now

    assert republish_rate_now(2000, 0.1, behind=0, batch_size=256) == 2000.0
    assert republish_rate_now(2000, 0.1, behind=256, batch_size=256) == 2000.0  # one batch: at pace
    assert republish_rate_now(2000, 0.1, behind=257, batch_size=256) == 200.0
    assert republish_rate_now(2000, 0.0, behind=10_000, batch_size=256) == 0.0


def test_a_trainer_behind_the_head_catches_up_in_steps_of_at_most_catchup_batches():
    from tgastream.stream.trainer import train_size

    assert train_size(256, 4, behind=0) == 256  # nothing waiting: a normal batch (the poll waits for it)
    assert train_size(256, 4, behind=256) == 256
    assert train_size(256, 4, behind=700) == 700  # what is waiting, not more
    assert train_size(256, 4, behind=50_000) == 1024
    assert train_size(256, 1, behind=50_000) == 256  # catchup_batches 1: always batch_size
