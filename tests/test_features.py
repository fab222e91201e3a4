"""Real-time user features: sliding windows, conversion rate, recent categories, encodings."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from tgastream.state.features import UserFeatures, build_features

CLICK, FAV, CART, BUY = 0, 1, 2, 3
T0 = 1_511_568_000.0  # a minute boundary


def test_window_counts_slide_with_the_latest_event_time():
    f = build_features([("c", CLICK, T0), ("c", CART, T0 + 30), ("c", BUY, T0 + 2 * 3600)])
    assert f.window_counts(3600) == [0, 0, 0, 1]  # the click and cart are 2 h old
    assert f.window_counts(86400) == [1, 0, 1, 1]
    f.observe("c", FAV, T0 + 25 * 3600)  # a day later: only this event and the buy's hour remain
    assert f.window_counts(86400) == [0, 1, 0, 1] and f.window_counts(3600) == [0, 1, 0, 0]


def test_windows_are_exact_to_the_minute():
    f = build_features([("c", CLICK, T0), ("c", CLICK, T0 + 3600 - 1), ("c", CLICK, T0 + 3600)])
    # buckets: minute 0, minute 59, minute 60; the 1 h window at minute 60 holds minutes 1..60
    assert f.window_counts(3600) == [2, 0, 0, 0]


def test_late_events_count_in_their_own_minute_unless_older_than_a_day():
    f = build_features([("c", CLICK, T0 + 86400 * 3), ("c", CART, T0 + 86400 * 3 - 60), ("c", BUY, T0)])
    assert f.window_counts(86400) == [1, 0, 1, 0] and f.events == 3


def test_conversion_rate_and_last_categories():
    f = build_features([("a", CLICK, T0), ("b", CLICK, T0 + 1), ("a", CART, T0 + 2), ("c", BUY, T0 + 3),
                        ("d", CLICK, T0 + 4), ("e", CLICK, T0 + 5), ("f", CLICK, T0 + 6)], labels=[1, 0, 0, 0])
    assert f.conversion_rate == 0.25 and (f.conversions, f.conversion_windows) == (1, 4)
    assert f.last_categories == ["f", "e", "d", "c", "a"]  # distinct, most recent first, at most 5
    assert UserFeatures().conversion_rate is None


def test_published_json_is_the_snapshot_and_handles_odd_ids():
    f = build_features([("cat\"é", BUY, T0 + 0.5)], labels=[1])
    snap = f.snapshot('u"\\1')
    assert json.loads(f.to_json('u"\\1')) == snap
    assert snap["counts_1h"] == {"click": 0, "fav": 0, "cart": 0, "buy": 1} and snap["ts"] == T0 + 0.5
    empty = UserFeatures()
    assert json.loads(empty.to_json("u")) == empty.snapshot("u") and empty.snapshot("u")["ts"] is None


events_st = st.lists(st.tuples(st.sampled_from("abcdefg"), st.integers(0, 3), st.integers(0, 4 * 86400)),
                     max_size=80)


@settings(max_examples=150, deadline=None)
@given(events_st, st.lists(st.sampled_from([0.0, 1.0]), max_size=5), st.integers(0, 80))
def test_incremental_with_encoding_equals_from_scratch(rows, labels, split):
    events = [(c, b, T0 + t) for c, b, t in rows]
    f = build_features(events[:split], labels)
    f = UserFeatures.from_bytes(f.to_bytes())
    for c, b, t in events[split:]:
        f.observe(c, b, t)
    scratch = build_features(events, labels)
    assert f.to_bytes() == scratch.to_bytes()
    assert f.snapshot("u") == scratch.snapshot("u")
