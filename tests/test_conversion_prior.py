"""The repeat-interest prior of the conversion head (``conversion_prior``): the untrained head ranks
clicks exactly as repeat-recent's conversion score does, training moves it, and checkpoints of
either kind are told apart."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tgastream.core.events import BEHAVIORS, Event
from tgastream.core.settings import load_settings
from tgastream.model.batching import collate
from tgastream.model.config import ModelConfig, OnlineConfig
from tgastream.model.inference import IncompatibleCheckpoint, saved_model_config
from tgastream.model.online import OnlineLearner
from tgastream.model.shadow import repeat_interest, score_outcomes
from tgastream.model.vocab import UNKNOWN_KEY_BASE, InMemoryVocab, RowKeys
from tgastream.state.samples import CONVERSION, samples_from_events
from tgastream.stream.configs import online_model_config
from tgastream.stream.synth import SynthConfig, generate

pytestmark = pytest.mark.usefixtures("one_thread")

BATCH = 64


@pytest.fixture(scope="module")
def samples():
    rows = generate(SynthConfig(users=60, events=3000, items=300, seed=5))
    events = [Event(str(u + 1), str(i + 1), str(c + 1), BEHAVIORS[b], float(ts)) for ts, u, i, c, b in rows]
    return samples_from_events(events, sample_len=20, final_watermark=events[-1].ts + 2 * 86400)


def _learner(prior: bool) -> OnlineLearner:
    model = ModelConfig(n_items=1, n_categories=1, dim=16, heads=2, layers=1, dropout=0.0, conversion_prior=prior)
    return OnlineLearner(model, OnlineConfig(device="cpu", threads=1, sample_len=20, chunk=64, seed=2))


def _proba(learner: OnlineLearner, conv: list) -> np.ndarray:
    learner.assign_rows(conv)
    vocabs = learner.rows.vocabs()
    batch = collate(conv, vocabs, learner.device, keys=vocabs.items)
    learner.model.eval()
    with torch.no_grad():
        return learner.model.conversion_proba(batch).double().numpy()  # [B]


def test_the_untrained_head_scores_each_click_as_a_function_of_repeat_interest_alone(samples):
    conv = [s for s in samples if s.kind == CONVERSION][:200]
    interest = np.array([repeat_interest(s) for s in conv])  # the baseline's own score, one sample at a time
    assert len(set(interest.tolist())) >= 4  # (clicks with 0, 1, 2, ... touches: a ranking to agree with)
    p = _proba(_learner(True), conv)
    np.testing.assert_allclose(p, 1 / (1 + 1 / (1 + interest)), rtol=1e-5)  # sigmoid(log(1 + r)) = (1+r)/(2+r)
    order = np.argsort(-interest, kind="stable")
    assert (np.diff(p[order]) <= 1e-7).all()  # the same order as repeat-interest, ties tied
    plain = _proba(_learner(False), conv)
    assert not np.allclose(plain, p)  # (the plain head's random MLP does not)


def test_training_moves_the_head_away_from_the_prior(samples):
    learner = _learner(True)
    head = learner.model.conversion_head
    for k in range(0, 6 * BATCH, BATCH):
        learner.learn(samples[k:k + BATCH])
    assert float(head.prior_scale.detach()) != 1.0
    assert head.mlp[-1].weight.abs().sum() > 0  # the MLP now adds to the prior


def test_a_checkpoint_with_the_other_head_is_refused_and_an_old_one_is_served_as_it_was(samples):
    plain = _learner(False)
    plain.learn(samples[:BATCH])
    state = plain.state_dict()
    with pytest.raises(IncompatibleCheckpoint, match="prior_scale"):
        _learner(True).load_state_dict(state)
    old = dict(state, model_config={k: v for k, v in state["model_config"].items() if k != "conversion_prior"})
    assert saved_model_config(old).conversion_prior is False  # (from before the setting: the plain head)


def test_the_trainer_uses_the_prior_by_default_and_the_setting_turns_it_off():
    assert online_model_config(load_settings()).conversion_prior is True
    assert online_model_config(load_settings(overrides={"conversion_prior": False})).conversion_prior is False


def test_a_model_without_rows_for_the_items_still_counts_only_the_candidates_own_touches(samples):
    """A frozen copy assigns no rows: every item of these clicks is unknown to it. Their identity
    keys must still tell the items apart (model/vocab.py ``RowKeys``), or every unknown item in a
    click's context would count as a touch of the candidate."""
    frozen = _learner(True).frozen_copy()  # untrained, no rows at all
    conv = [s for s in samples if s.kind == CONVERSION][:200]
    ret = [s for s in samples if s.kind != CONVERSION][:50]
    interest = np.array([repeat_interest(s) for s in conv])
    out = score_outcomes(frozen.model, frozen.rows, frozen.device, conv, ret)
    np.testing.assert_allclose(out.probs, 1 / (1 + 1 / (1 + interest)), rtol=1e-5)
    assert len(frozen.rows.items) == 0 and len(out.ranks) == len(ret)  # (still nothing assigned; every target a miss, no error)


def test_row_keys_are_rows_where_there_are_rows_and_distinct_above_them_elsewhere():
    vocab = InMemoryVocab(["a", "b"])
    keys = RowKeys(vocab)
    first = keys.lookup(["a", "x", "b", "y", "x"])
    assert first[[0, 2]].tolist() == vocab.lookup(["a", "b"]).tolist()
    assert first[1] == first[4] != first[3] and min(first[1], first[3]) >= UNKNOWN_KEY_BASE
    assert keys.lookup(["y", "x"]).tolist() == [first[3], first[1]]  # the same within the object (nodes, then targets)


def test_a_base_rate_starts_the_head_at_that_rate_and_keeps_the_priors_order(samples):
    conv = [s for s in samples if s.kind == CONVERSION][:200]
    interest = np.array([repeat_interest(s) for s in conv])
    model = ModelConfig(n_items=1, n_categories=1, dim=16, heads=2, layers=1, dropout=0.0, conversion_prior=True,
                        conversion_base_rate=0.02)
    learner = OnlineLearner(model, OnlineConfig(device="cpu", threads=1, sample_len=20, chunk=64, seed=2))
    p = _proba(learner, conv)
    z = np.log(0.02 / 0.98) + np.log1p(interest)  # logit(rate) + log(1 + r)
    np.testing.assert_allclose(p, 1 / (1 + np.exp(-z)), rtol=1e-5)
    assert np.allclose(p[interest == 0], 0.02, rtol=1e-5)  # an untouched item: the base rate


def test_a_base_rate_outside_0_1_is_refused():
    with pytest.raises(ValueError, match="conversion_base_rate"):
        ModelConfig(n_items=1, n_categories=1, conversion_base_rate=1.0).validate()
