"""The one metrics module of offline and online scoring: mid-ranks, HR/NDCG/MRR, AUC, logloss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tgastream.model.metrics import (auc, bootstrap_interval, bootstrap_user_weights, gauc, group_aucs, hit_rate,
                                     logloss, ranking_metrics, ranks_of_targets, weighted_auc)


def test_ranks_are_mid_ranks_and_respect_candidates():
    scores = torch.tensor([[3.0, 1.0, 1.0, 1.0, 0.0]])
    assert ranks_of_targets(scores, torch.tensor([1])).item() == 3.0  # tied with two others: 2, 3, 4
    cand = torch.tensor([[True, True, False, False, True]])
    assert ranks_of_targets(scores, torch.tensor([1]), cand).item() == 2.0
    assert ranks_of_targets(scores, torch.tensor([2]), cand).item() == 4.0  # not a candidate: a miss


def test_a_target_without_a_column_ranks_last_plus_one():
    scores = torch.tensor([[3.0, 1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    assert ranks_of_targets(scores, torch.tensor([-1, 2])).tolist() == [6.0, 3.0]  # all tied: the middle
    cand = torch.tensor([[True, True, False, False, True]]).expand(2, 5)
    assert ranks_of_targets(scores, torch.tensor([-1, 0]), cand).tolist() == [4.0, 2.0]


def test_ranking_metrics_of_mid_ranks():
    m = ranking_metrics(np.array([1.0, 2.0, 11.0]), k=10)
    assert m["hr"] == pytest.approx(2 / 3) and m["mrr"] == pytest.approx((1 + 0.5 + 1 / 11) / 3)
    assert m["ndcg"] == pytest.approx((1.0 + 1 / np.log2(3)) / 3)
    assert ranking_metrics(np.array([10.0, 10.5]), k=10)["hr"] == 0.5  # a tie across the cut-off is half a hit
    assert ranking_metrics(np.array([]), k=10) == {"hr": None, "ndcg": None, "mrr": None}


def test_auc_matches_pairwise_definition_with_ties():
    rng = np.random.default_rng(0)
    s = rng.integers(0, 5, 200).astype(float)
    y = rng.random(200) < 0.3
    pos, neg = s[y], s[~y]
    pairwise = ((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean()
    assert auc(y, s) == pytest.approx(pairwise)
    assert auc(y.astype(np.float32), s.astype(np.float32)) == pytest.approx(pairwise)


def test_auc_counts_ties_half():
    assert auc(np.array([0, 1, 0, 1]), np.array([0.1, 0.9, 0.2, 0.8])) == 1.0
    assert auc(np.array([1, 0]), np.array([0.9, 0.1])) == 1.0
    assert auc(np.array([0, 1]), np.array([0.5, 0.5])) == 0.5
    assert auc(np.array([1, 1]), np.array([0.5, 0.6])) is None


def test_logloss_takes_labels_first():
    assert logloss(np.array([1]), np.array([0.5])) == pytest.approx(np.log(2))
    assert logloss(np.array([1, 0]), np.array([0.9, 0.2])) == pytest.approx(-(np.log(0.9) + np.log(0.8)) / 2)
    assert logloss(np.array([]), np.array([])) is None


def test_weighted_auc_equals_auc_of_the_repeated_cases():
    rng = np.random.default_rng(1)
    y, s = rng.random(60) < 0.3, rng.integers(0, 6, 60).astype(float)
    w = rng.integers(0, 4, 60)
    assert weighted_auc(y, s) == pytest.approx(auc(y, s))
    assert weighted_auc(y, s, w) == pytest.approx(auc(np.repeat(y, w), np.repeat(s, w)))
    assert weighted_auc(np.array([1, 0]), np.array([0.2, 0.1]), np.array([1, 0])) is None  # no negative weight


def test_gauc_averages_per_user_auc_weighted_by_clicks_and_skips_one_class_users():
    y = np.array([1, 0, 0, 0, 1, 0, 1, 1])
    s = np.array([0.9, 0.1, 0.2, 0.3, 0.1, 0.5, 0.7, 0.8])
    g = np.array([0, 0, 0, 0, 1, 1, 2, 2])  # user 0: AUC 1 over 4 clicks, user 1: AUC 0 over 2, user 2: one class
    assert gauc(y, s, g) == pytest.approx((4 * 1.0 + 2 * 0.0) / 6)
    aucs, counts = group_aucs(y, s, g)
    assert np.isnan(aucs[2]) and counts.tolist() == [4, 2, 2]
    assert gauc(y, s, g, weights=np.array([0.0, 2.0, 5.0])) == pytest.approx(0.0)  # only user 1 drawn
    assert gauc(np.array([1, 1]), np.array([0.1, 0.2]), np.array([0, 1])) is None


def test_hit_rate_with_multiplicities():
    assert hit_rate(np.array([1.0, 20.0, 10.0])) == pytest.approx(2 / 3)
    assert hit_rate(np.array([1.0, 20.0]), weights=np.array([1.0, 3.0])) == pytest.approx(0.25)


def test_bootstrap_resamples_whole_users_and_is_seeded():
    w = bootstrap_user_weights(np.array([0, 0, 1, 2, 2, 2]), resamples=200, seed=7)
    assert w.shape == (200, 3) and (w.sum(1) == 3).all()  # 3 users drawn per resample
    assert np.array_equal(w, bootstrap_user_weights(np.array([0, 0, 1, 2, 2, 2]), resamples=200, seed=7))


def test_bootstrap_interval_covers_the_estimate_and_pairing_cancels_shared_noise():
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(100), 20)  # 100 users × 20 cases
    base = rng.random(100)[users] < 0.5  # a user-level effect both models share
    a = np.where(base, 1.0, 50.0)  # model a's ranks
    b = np.where(base & (rng.random(len(users)) < 0.9), 1.0, 50.0)  # model b: a's hits, 10% lost
    uw = bootstrap_user_weights(users, 500, seed=1)
    ci_a = bootstrap_interval(lambda w: hit_rate(a, 10, w[users]), uw)
    assert ci_a[0] < hit_rate(a) < ci_a[1]
    diff = bootstrap_interval(lambda w: hit_rate(a, 10, w[users]) - hit_rate(b, 10, w[users]), uw)
    ci_b = bootstrap_interval(lambda w: hit_rate(b, 10, w[users]), uw)
    assert diff[0] > 0  # paired: the difference is clearly positive ...
    assert ci_a[0] < ci_b[1]  # ... though the unpaired intervals overlap
    assert bootstrap_interval(lambda w: None, uw) is None


def test_ece_over_equal_mass_bins_on_a_worked_example():
    from tgastream.model.metrics import ece, reliability
    # 20 cases, 10 bins of 2 (sorted by p): bin k holds p = k/10 twice, one of each bin k >= 5 bought
    probs = np.repeat(np.arange(10) / 10.0, 2)
    labels = np.array([0, 0] * 5 + [1, 0] * 5, dtype=float)
    rows = reliability(labels, probs, 10)
    assert [r["count"] for r in rows] == [2.0] * 10
    assert [r["rate"] for r in rows] == [0.0] * 5 + [0.5] * 5
    # |p - rate| per bin: 0, .1, .2, .3, .4, 0, .1, .2, .3, .4 → mean 0.2
    assert ece(labels, probs, 10) == pytest.approx(0.2)
    assert ece(np.array([1.0, 0.0]), np.array([0.5, 0.5]), 1) == pytest.approx(0.0)  # one bin: calibrated on average
    assert ece(np.array([1.0, 0.0]), np.array([0.5, 0.5]), 10) == pytest.approx(0.5)  # fewer cases than bins: a bin each
    assert ece(np.zeros(0), np.zeros(0)) is None
