"""One forward per step: the prequential scores that ``learn`` takes from its own training
forward equal those of the separate eval pass (``score`` before ``learn``) on a model without
dropout, replay rows mixed in, under both conversion feedback modes (``wait``: the clicks ride in
the batch untrained, unless the publishing forward predicted them; ``fnw``: they train as
negatives); with dropout the learner scores in a pass of its own."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tgastream.core.events import BEHAVIORS, Event
from tgastream.model.config import ModelConfig, OnlineConfig
from tgastream.model.online import OnlineLearner
from tgastream.model.shadow import score_outcomes
from tgastream.state.samples import CLICK, CONVERSION, RETRIEVAL, samples_from_events
from tgastream.stream.synth import SynthConfig, generate

BATCH = 64
STEPS = 12


@pytest.fixture(scope="module")
def samples():
    rows = generate(SynthConfig(users=60, events=3000, items=300, seed=5))
    events = [Event(str(u + 1), str(i + 1), str(c + 1), BEHAVIORS[b], float(ts)) for ts, u, i, c, b in rows]
    return samples_from_events(events, sample_len=20, final_watermark=events[-1].ts + 2 * 86400)[:BATCH * STEPS]


@pytest.fixture
def float64():
    """Both passes in float64: the equality is of the computation, not of float32 rounding
    (the two passes batch the rows with different widths and neighbours)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def _learner(dropout: float = 0.0, feedback: str = "wait") -> OnlineLearner:
    model = ModelConfig(n_items=1, n_categories=1, dim=16, heads=2, layers=1, dropout=dropout)
    return OnlineLearner(model, OnlineConfig(device="cpu", threads=1, sample_len=20, chunk=64, reservoir=300,
                                             replay_share=0.3, seed=2, conversion_feedback=feedback))


@pytest.mark.parametrize("handed", [False, True, "later"],
                         ids=["clicks-in-the-step", "clicks-from-the-publishing-forward", "clicks-after-the-vectors"])
@pytest.mark.parametrize("feedback", ["wait", "fnw"])
def test_scores_from_the_training_forward_equal_the_separate_eval_pass(samples, float64, feedback, handed):
    """``handed``: the clicks' P(buy) come from the publishing forward (``vectors``, handed over
    as the trainer does; ``later``: only the clicks sharing a user's row there, the others in a
    forward of their own after it, as the trainer's publishing thread does) and the step has no
    row for them under ``wait``: the same predictions, each made once, and the same parameters."""
    separate, one_pass = _learner(feedback=feedback), _learner(feedback=feedback)
    assert one_pass.scores_from_training(0, BATCH)
    n_cases = n_picked = n_later = n_shared = 0
    for k in range(STEPS):
        batch = samples[k * BATCH:(k + 1) * BATCH]
        # shadow cases (model/shadow.py): every third sample, clicks and retrievals apart
        cases = ([s for s in batch[::3] if s.kind == CLICK], [s for s in batch[::3] if s.kind == RETRIEVAL])
        separate.vectors(batch)
        separate.score(batch)
        expected = score_outcomes(separate.model, separate.rows, separate.device, *cases)
        separate.learn(batch)
        out = one_pass.vectors(batch, clicks_later=handed == "later")
        if handed:
            one_pass.note_predictions(out.clicks)
            one_pass.note_predictions(one_pass.click_predictions(out.later_clicks))
        if handed == "later":
            n_later += len(out.later_clicks)
            n_shared += 0 if out.clicks is None else len(out.clicks.clicks)
        one_pass.learn(batch, score_limit=0, cases=cases)
        got = one_pass.last_cases
        np.testing.assert_allclose(got.probs, expected.probs, rtol=1e-9, atol=1e-12)
        np.testing.assert_array_equal(got.ranks, expected.ranks)
        n_cases += len(got.probs) + len(got.ranks)
        n_picked += sum(s.kind != CONVERSION for s in batch[::3])
    assert n_cases == n_picked > 0
    if handed == "later":  # both kinds of click were there
        assert n_later > 0 and n_shared > 0
    a, b = separate.metrics.state_dict(), one_pass.metrics.state_dict()
    # every click predicted once (at its step, or by the publishing forward), every label joined to its prediction
    assert one_pass.clicktime.predicted == separate.clicktime.predicted == sum(s.kind == CLICK for s in samples) > 0
    assert one_pass.clicktime.unmatched == separate.clicktime.unmatched == 0
    assert one_pass.clicks_in_step == (0 if handed else one_pass.clicktime.predicted)  # (none left to the step)
    assert a["conversions_seen"] == b["conversions_seen"] == one_pass.clicktime.joined > 0
    assert a["retrievals_seen"] == b["retrievals_seen"] == sum(s.kind == RETRIEVAL for s in samples)
    assert a["conv_labels"] == b["conv_labels"]
    np.testing.assert_allclose(b["conv_scores"], a["conv_scores"], rtol=1e-9, atol=1e-12)
    assert b["ranks"] == a["ranks"]  # mid-ranks over the full catalogue, every retrieval row
    assert one_pass.last_replayed > 0  # replay rows were in the training batch beside the scored ones
    for (name, p), q in zip(separate.model.state_dict().items(), one_pass.model.state_dict().values()):
        # the same steps were taken; atol: a parameter whose exact gradient is 0 (conversion_head.same_cat
        # on this stream) gets float64 rounding noise (~1e-17) that Adam scales by lr / eps to ~1e-12
        torch.testing.assert_close(q, p, rtol=1e-9, atol=1e-9, msg=name)


def test_with_dropout_the_scores_come_from_an_eval_pass_of_their_own(samples):
    L = _learner(dropout=0.2)
    assert not L.scores_from_training(0, BATCH)
    batch = samples[:BATCH]
    out = L.step(batch)
    assert np.isfinite(out.loss) and L.version == 1
    assert L.metrics.retrievals_seen == sum(s.kind == RETRIEVAL for s in batch) > 0  # every retrieval ranked
    assert L.clicktime.predicted == sum(s.kind == CLICK for s in batch) > 0  # every click predicted
