"""Drift detection on the training loss: a shift is found soon after it starts, a stationary
loss of the same length is not flagged (several seeds)."""

from __future__ import annotations

import random

import pytest

from tgastream.model.drift import LossDrift


def _losses(seed: int, n: int, shift_at: int | None) -> list[float]:
    rng = random.Random(seed)
    return [rng.gauss(4.0 if shift_at is None or i < shift_at else 5.0, 0.4) for i in range(n)]


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_a_shift_in_the_loss_is_detected_within_a_hundred_steps(seed):
    detector = LossDrift()
    flagged = [i for i, x in enumerate(_losses(seed, 2000, shift_at=1000)) if detector.update(x)]
    assert flagged and 1000 <= flagged[0] < 1100


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_a_stationary_loss_is_not_flagged(seed):
    detector = LossDrift()
    assert not any(detector.update(x) for x in _losses(seed, 2000, shift_at=None))
    assert detector.detections == 0 and detector.mean == pytest.approx(4.0, abs=0.1)


def test_undefined_losses_are_ignored():
    detector = LossDrift()
    assert not detector.update(float("nan")) and detector.detections == 0
