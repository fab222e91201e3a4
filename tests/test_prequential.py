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
