"""The synthetic log generator: deterministic, Taobao-like funnel, drift."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from tgastream.core.events import load_events
from tgastream.stream.synth import SynthConfig, generate, write_file


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path):
    cfg = SynthConfig(users=200, events=20_000, seed=7)
    a, b, c = tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "c.csv"
    write_file(cfg, a)
    write_file(cfg, b)
    write_file(SynthConfig(users=200, events=20_000, seed=8), c)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_output_is_valid_time_sorted_and_exact_size(tmp_path: Path):
    path = tmp_path / "x.csv"
    n = write_file(SynthConfig(users=300, events=30_000, seed=1), path)
    events = load_events(path)
    assert n == len(events) == 30_000
    assert all(a.ts <= b.ts for a, b in zip(events, events[1:]))
    assert len({e.user_id for e in events}) == 300


def test_funnel_rates_are_taobao_like():
    rows = generate(SynthConfig(users=1000, events=100_000, seed=3))
    share = {b: n / len(rows) for b, n in Counter(r[4] for r in rows).items()}
    assert 0.85 < share[0] < 0.93  # click
    assert 0.04 < share[2] < 0.08  # cart
    assert 0.015 < share[1] < 0.045  # fav
    assert 0.01 < share[3] < 0.03  # buy


def test_buys_follow_views_of_the_same_item():
    rows = generate(SynthConfig(users=500, events=50_000, seed=2))
    seen: dict[int, set[int]] = {}
    bought_seen = bought = 0
    for _ts, user, item, _cat, beh in rows:
        if beh == 3:
            bought += 1
            bought_seen += item in seen.get(user, set())
        seen.setdefault(user, set()).add(item)
    assert bought_seen / bought > 0.9  # the item-level edge predicts purchases


def test_drift_changes_category_preferences_at_the_given_point():
    cfg = SynthConfig(users=300, events=60_000, seed=3, drift_at=0.5)
    rows = generate(cfg)
    mid = cfg.start_ts + 0.5 * cfg.days * 86400
    overlap = []
    by_user: dict[int, tuple[Counter, Counter]] = {}
    for ts, user, _item, cat, _b in rows:
        before, after = by_user.setdefault(user, (Counter(), Counter()))
        (before if ts < mid else after)[cat] += 1
    for before, after in by_user.values():
        if sum(before.values()) > 30 and sum(after.values()) > 30:
            top = {c for c, _ in before.most_common(2)}
            overlap.append(sum(after[c] for c in top) / sum(after.values()))
    assert overlap and sum(overlap) / len(overlap) < 0.3


def test_invalid_config_raises():
    with pytest.raises(ValueError):
        SynthConfig(users=10, events=5).validate()
    with pytest.raises(ValueError):
        SynthConfig(drift_at=1.5).validate()
