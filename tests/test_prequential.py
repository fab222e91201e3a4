"""Rolling prequential metrics: AUC with ties, logloss, HR/NDCG, window eviction."""

from __future__ import annotations

import numpy as np
import pytest

from tgastream.model.prequential import RollingMetrics, auc, hit_and_ndcg, logloss


def test_auc_matches_pairwise_definition_with_ties():
    rng = np.random.default_rng(0)
    s = rng.integers(0, 5, 200).astype(float)
    y = rng.random(200) < 0.3
    pos, neg = s[y], s[~y]
    pairwise = ((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean()
    assert auc(s, y) == pytest.approx(pairwise)
    assert auc(np.array([0.1, 0.2]), np.array([1, 1])) is None
    assert auc(np.array([0.9, 0.1]), np.array([1, 0])) == 1.0


def test_logloss_and_ranking_metrics():
    assert logloss(np.array([0.5]), np.array([1])) == pytest.approx(np.log(2))
    hit, ndcg = hit_and_ndcg(np.array([0, 1, 9, 10]), 10)
    assert hit.tolist() == [1, 1, 1, 0]
    assert ndcg.tolist() == pytest.approx([1.0, 1 / np.log2(3), 1 / np.log2(11), 0.0])


def test_rolling_window_keeps_only_the_latest_outcomes():
    m = RollingMetrics(window=4, k=1)
    m.add_ranks(np.array([5, 5, 5, 5]))
    m.add_ranks(np.array([0, 0]))
    assert m.snapshot()["hr@1"] == 0.5 and m.retrievals_seen == 6
    m.add_conversion(np.array([0.9, 0.1, 0.8, 0.2, 0.7]), np.array([1, 0, 1, 0, 1]))
    assert len(m.conv_scores) == 4 and m.snapshot()["auc"] == 1.0
