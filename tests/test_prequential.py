"""Rolling prequential metrics: window eviction, the metrics module's figures, save and restore."""

from __future__ import annotations

import numpy as np
import pytest

from tgastream.model.metrics import auc, ece, gauc, logloss, ranking_metrics
from tgastream.model.prequential import RollingMetrics


def test_rolling_window_keeps_only_the_latest_outcomes():
    m = RollingMetrics(window=4, k=1)
    m.add_ranks(np.array([6.0, 6.0, 6.0, 6.0]))
    m.add_ranks(np.array([1.0, 1.0]))
    assert m.snapshot()["hr@1"] == 0.5 and m.retrievals_seen == 6
    m.add_conversion(np.array([1, 0, 1, 0, 1]), np.array([0.9, 0.1, 0.8, 0.2, 0.7]))
    assert len(m.conv_scores) == 4 and m.snapshot()["auc"] == 1.0 and m.conversions_seen == 5


def test_snapshot_is_the_metrics_modules_figures_over_the_window():
    rng = np.random.default_rng(1)
    ranks, labels, probs = rng.integers(1, 30, 50).astype(float), rng.random(50) < 0.4, rng.random(50)
    m = RollingMetrics(window=100, k=10)
    m.add_ranks(ranks)
    m.add_conversion(labels, probs)
    snap = m.snapshot()
    assert snap["hr@10"] == pytest.approx(ranking_metrics(ranks, 10)["hr"])
    assert snap["ndcg@10"] == pytest.approx(ranking_metrics(ranks, 10)["ndcg"])
    assert snap["auc"] == pytest.approx(auc(labels, probs))
    assert snap["logloss"] == pytest.approx(logloss(labels, probs))
    assert snap["ece"] == pytest.approx(ece(labels, probs))
    assert snap["gauc"] is None  # no users given
    assert (snap["auc_clicks"], snap["auc_buys"]) == (50, int(labels.sum()))
    assert RollingMetrics().snapshot() == {"auc": None, "gauc": None, "logloss": None, "ece": None, "auc_clicks": 0,
                                           "auc_buys": 0, "auc_click_from": None, "auc_click_to": None,
                                           "auc_maturing": 0, "hr@10": None, "ndcg@10": None}


def test_gauc_over_the_window_is_the_metrics_modules_over_the_users_with_both_labels():
    rng = np.random.default_rng(2)
    users = [f"u{k}" for k in rng.integers(0, 8, 200)]
    labels, probs = rng.random(200) < 0.3, rng.random(200)
    m = RollingMetrics(window=500)
    m.add_conversion(labels, probs, users)
    codes = np.unique(users, return_inverse=True)[1]
    assert m.snapshot()["gauc"] == pytest.approx(gauc(labels, probs, codes))


def test_state_dict_round_trip_restores_windows_and_counters():
    m = RollingMetrics(window=3)
    m.add_ranks(np.array([1.0, 2.5, 40.0, 3.0]))
    m.add_conversion(np.array([1, 0]), np.array([0.7, 0.4]))
    restored = RollingMetrics(window=3)
    restored.add_ranks(np.array([99.0]))  # replaced, not appended to
    restored.load_state_dict(m.state_dict())
    assert restored.snapshot() == m.snapshot()
    assert list(restored.ranks) == [2.5, 40.0, 3.0]
    assert (restored.retrievals_seen, restored.conversions_seen) == (4, 2)
    smaller = RollingMetrics(window=2)
    smaller.load_state_dict(m.state_dict())
    assert list(smaller.ranks) == [40.0, 3.0]


def test_the_window_holds_mature_cases_in_click_time_order_and_keeps_the_latest_clicks():
    m = RollingMetrics(window=3)
    # labels arrive out of click order (a buy minutes after its click, a negative a day after)
    m.add_conversion(np.array([1, 1]), np.array([0.9, 0.8]), ["a", "b"], click_ts=np.array([500.0, 300.0]))
    assert m.mature(horizon=100.0) == 0 and not m.conv_labels  # a click at 100 still awaits its label
    m.add_conversion(np.array([0, 0]), np.array([0.2, 0.1]), ["c", "d"], click_ts=np.array([100.0, 400.0]))
    assert m.mature(horizon=450.0) == 3  # 500 stays: a click at 450 is still open
    assert list(m.conv_ts) == [100.0, 300.0, 400.0] and list(m.conv_labels) == [0, 1, 0]
    m.add_conversion(np.array([0]), np.array([0.3]), ["e"], click_ts=np.array([200.0]))  # late, older than the window's newest
    m.mature(horizon=float("inf"))
    assert list(m.conv_ts) == [300.0, 400.0, 500.0]  # the latest three clicks, in click order
    snap = m.snapshot()
    assert (snap["auc_click_from"], snap["auc_click_to"], snap["auc_maturing"]) == (300.0, 500.0, 0)
    assert snap["auc"] == pytest.approx(auc(np.array([1, 0, 1]), np.array([0.8, 0.1, 0.9])))
    assert m.conversions_seen == 5


def test_a_full_maturing_buffer_lets_its_oldest_clicks_in_and_counts_them():
    m = RollingMetrics(window=10, maturing_limit=2)
    m.add_conversion(np.array([1, 0, 1]), np.array([0.9, 0.1, 0.8]), click_ts=np.array([30.0, 10.0, 20.0]))
    assert list(m.conv_ts) == [10.0] and m.forced == 1 and len(m.maturing) == 2


def test_maturing_cases_survive_a_round_trip_and_an_old_checkpoint_still_loads():
    m = RollingMetrics(window=5)
    m.add_conversion(np.array([0, 1, 1]), np.array([0.2, 0.7, 0.6]), ["u", "v", "w"], click_ts=np.array([1.0, 5.0, 9.0]))
    m.mature(horizon=6.0)
    back = RollingMetrics(window=5)
    back.load_state_dict(m.state_dict())
    assert list(back.conv_ts) == [1.0, 5.0] and back.snapshot() == m.snapshot()
    back.mature(float("inf"))
    assert list(back.conv_ts) == [1.0, 5.0, 9.0] and list(back.conv_users) == ["u", "v", "w"]
    old = {"conv_scores": [0.4, 0.6], "conv_labels": [0, 1], "ranks": [2.0], "conversions_seen": 2,
           "retrievals_seen": 1}  # saved before click-time order: no click times, nothing maturing
    legacy = RollingMetrics(window=5)
    legacy.load_state_dict(old)
    assert legacy.snapshot()["auc"] == 1.0 and legacy.snapshot()["auc_click_from"] is None
    legacy.add_conversion(np.array([0]), np.array([0.5]), click_ts=np.array([7.0]))
    legacy.mature(float("inf"))
    assert list(legacy.conv_scores) == [0.4, 0.6, 0.5] and legacy.snapshot()["auc_click_to"] == 7.0
