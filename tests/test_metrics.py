"""The one metrics module of offline and online scoring: mid-ranks, HR/NDCG/MRR, AUC, logloss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tgastream.model.metrics import auc, logloss, ranking_metrics, ranks_of_targets


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
