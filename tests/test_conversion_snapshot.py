"""``conversion_snapshot_steps``: clicks' click-time P(buy) from a copy of the learner refreshed
every N steps, not from the newest weights (model/online.py ``_snapshot_predictions``)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tgastream.core.events import BEHAVIORS, Event
from tgastream.core.settings import SettingsError, load_settings
from tgastream.model.clicktime import Predictions
from tgastream.model.config import ModelConfig, OnlineConfig
from tgastream.model.online import OnlineLearner
from tgastream.state.samples import CLICK, samples_from_events
from tgastream.stream.synth import SynthConfig, generate

BATCH = 64


@pytest.fixture(scope="module")
def samples():
    rows = generate(SynthConfig(users=60, events=3000, items=300, seed=5))
    events = [Event(str(u + 1), str(i + 1), str(c + 1), BEHAVIORS[b], float(ts)) for ts, u, i, c, b in rows]
    return samples_from_events(events, sample_len=20, final_watermark=events[-1].ts + 2 * 86400)[:BATCH * 10]


def _learner(every: int, feedback: str = "wait") -> OnlineLearner:
    model = ModelConfig(n_items=1, n_categories=1, dim=16, heads=2, layers=1, dropout=0.0)
    learner = OnlineLearner(model, OnlineConfig(device="cpu", threads=1, sample_len=20, chunk=64, seed=2,
                                                conversion_feedback=feedback, conversion_snapshot_steps=every))
    learner.clicktime.history = []
    return learner


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("feedback", ["wait", "fnw"])
def test_every_click_is_predicted_by_a_copy_at_most_n_steps_old_and_stamped_with_its_version(samples, feedback):
    learner = _learner(3, feedback)
    stamped = []  # (version of the learner when the batch came, versions its clicks were predicted with)
    for k in range(0, len(samples), BATCH):
        before, n = learner.version, len(learner.clicktime.history)
        out = learner.step(samples[k:k + BATCH])
        assert out.clicks is None and not out.later_clicks  # (no forward spent on predictions it would ignore)
        stamped.append((before, {v for _key, v, _row in learner.clicktime.history[n:]}))
    assert sum(len(v) for _b, v in stamped) > 0
    for before, versions in stamped:
        for v in versions:  # refreshed every 3 steps: taken at 0, 3, 6, ...; never newer than the learner
            assert v % 3 == 0 and before - 3 < v <= before
    assert {v for _b, vs in stamped for v in vs} >= {0, 3, 6}
    assert learner.clicks_in_step == 0  # (none left to the training forward)
    assert learner.online_metrics()["clicktime_snapshot"] == len(learner.clicktime.history)
    # every click once, a repeat of a pending click included (Tmall's day-level times make many)
    assert len(learner.clicktime.history) == sum(s.kind == CLICK for s in samples)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.usefixtures("one_thread")
def test_a_click_repeated_while_its_prediction_is_pending_is_predicted_again(samples):
    from tgastream.state.samples import Sample

    learner = _learner(4)
    click = next(s for s in samples[:BATCH] if s.kind == CLICK)
    learner.step(samples[:BATCH])
    again = Sample.from_bytes(click.to_bytes())  # the same click key, a sample of its own
    learner.step([again])
    assert [k for k, _v, _r in learner.clicktime.history].count(click.click_key) == 2


@pytest.mark.usefixtures("one_thread")
def test_the_snapshot_ignores_predictions_made_with_the_newest_weights_and_n_zero_keeps_them(samples):
    clicks = [s for s in samples if s.kind == CLICK][:4]
    newest = Predictions(clicks, np.full(len(clicks), 0.5), version=7)
    with_snapshot, without = _learner(5), _learner(0)
    for learner in (with_snapshot, without):
        learner.note_predictions(newest)
        learner.step(samples[:BATCH])
    assert not any(v == 7 for _k, v, _r in with_snapshot.clicktime.history)
    assert sum(v == 7 for _k, v, _r in without.clicktime.history) == len(clicks)


@pytest.mark.usefixtures("one_thread")
def test_the_snapshot_predicts_what_a_frozen_copy_taken_then_predicts(samples):
    learner = _learner(4)
    for k in range(0, 4 * BATCH, BATCH):  # 4 steps: the snapshot taken at step 0 is due again now
        learner.step(samples[k:k + BATCH])
    batch = samples[4 * BATCH:5 * BATCH]
    learner.assign_rows(batch)  # (as the step does before its clicks are predicted: the batch's new ids get rows)
    frozen = learner.frozen_copy()
    clicks = [s for s in batch if s.kind == CLICK]
    expected = frozen.click_predictions(clicks)
    n = len(learner.clicktime.history)
    learner.step(batch)
    got = learner.clicktime.history[n:n + len(clicks)]
    assert [v for _k, v, _r in got] == [4] * len(clicks)
    np.testing.assert_allclose([r[0] for _k, _v, r in got], expected.probs, rtol=1e-5, atol=1e-7)


@pytest.mark.usefixtures("one_thread")
def test_weights_replaced_by_a_restore_or_a_rollback_are_judged_by_a_fresh_snapshot(samples):
    from tgastream.model.rollback import rollback_learner

    learner = _learner(100)
    for k in range(0, 3 * BATCH, BATCH):
        learner.step(samples[k:k + BATCH])
    good = learner.state_dict()
    for b, replace in ((3, lambda: learner.load_state_dict(good)), (5, lambda: rollback_learner(learner, good))):
        learner.step(samples[b * BATCH:(b + 1) * BATCH])  # (still the copy of step 0)
        replace()
        learner.clicktime.history = []
        learner.step(samples[(b + 1) * BATCH:(b + 2) * BATCH])
        assert {v for _k, v, _r in learner.clicktime.history} == {learner.version - 1}


def test_a_negative_snapshot_interval_is_refused_in_one_line():
    with pytest.raises(SettingsError, match="conversion_snapshot_steps must be >= 0"):
        load_settings(overrides={"conversion_snapshot_steps": -1})


def test_the_setting_reaches_the_online_config():
    from tgastream.stream.configs import online_config

    settings = load_settings(overrides={"conversion_snapshot_steps": 100})
    assert online_config(settings).conversion_snapshot_steps == 100
    assert dataclasses.replace(online_config(settings)).conversion_snapshot_steps == 100
