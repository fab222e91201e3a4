"""The guard's decision (model/guard.py) on synthetic paired streams: a healthy stream never trips
by chance (several seeds, checked after every batch), a clear drop trips within the window, and a
deficit smaller than the margin never trips however many cases there are."""

from __future__ import annotations

import numpy as np
import pytest

from tgastream.model.guard import GuardConfig, PairedWindow, decide

CFG = GuardConfig(margin=0.03, window=2000, min_retrievals=500, min_positives=30, z=3.0)
BATCH = 40  # retrieval cases per step, as the shadow scores a share of a 256-sample step


def _retrieval_batch(rng: np.random.Generator, hr_online: float, hr_base: float) -> tuple[np.ndarray, np.ndarray]:
    """Hits of both models on the same cases: a per-case difficulty both see, independent luck."""
    easy = rng.random(BATCH)  # [B]
    online = (rng.random(BATCH) < np.clip(easy * 2 * hr_online, 0, 1)).astype(float)
    base = (rng.random(BATCH) < np.clip(easy * 2 * hr_base, 0, 1)).astype(float)
    return online, base


def _conversion_batch(rng: np.random.Generator, n: int, sep_online: float, sep_base: float, rate: float = 0.015):
    """Labels (``rate`` positives: conversions are 1-2% of clicks) and scores whose separation
    of the classes is ``sep`` (0 = noise)."""
    y = (rng.random(n) < rate).astype(float)  # [n]
    online = rng.normal(size=n) + sep_online * y
    base = rng.normal(size=n) + sep_base * y
    return y, online, base


def _feed(w: PairedWindow, rng, hr_online, hr_base, sep_online, sep_base) -> None:
    on, ba = _retrieval_batch(rng, hr_online, hr_base)
    y, so, sb = _conversion_batch(rng, 60, sep_online, sep_base)
    w.add(on, ba, y, so, sb)


@pytest.mark.parametrize("seed", range(8))
def test_a_healthy_stream_never_trips_by_chance(seed):
    rng = np.random.default_rng(seed)
    w = PairedWindow(window=CFG.window, keep_positives=2 * CFG.min_positives)
    evaluable = 0
    for _ in range(300):  # 12,000 retrieval cases, 18,000 clicks (~270 bought), decided after every step
        _feed(w, rng, 0.4, 0.4, 1.0, 1.0)
        v = decide(w, CFG)
        assert not v.trip, v
        evaluable += v.evaluable
    assert evaluable > 250  # the legs had their minimum counts most of the time: the test could have tripped


@pytest.mark.parametrize("seed", range(3))
def test_a_clear_hr_drop_trips_within_the_window(seed):
    rng = np.random.default_rng(seed)
    w = PairedWindow(window=CFG.window)
    for _ in range(100):
        _feed(w, rng, 0.4, 0.4, 1.0, 1.0)
        assert not decide(w, CFG).trip
    for step in range(CFG.window // BATCH):
        _feed(w, rng, 0.25, 0.4, 1.0, 1.0)
        v = decide(w, CFG)
        if v.trip:
            assert v.leg == "hr@10" and v.deficit["hr@10"] > CFG.margin
            break
    else:
        pytest.fail("a drop of 0.15 in HR@10 did not trip within the window")
    assert (step + 1) * BATCH <= CFG.window


@pytest.mark.parametrize("seed", range(3))
def test_a_clear_auc_drop_trips_once_enough_positives_arrive(seed):
    rng = np.random.default_rng(seed)
    w = PairedWindow(window=CFG.window, keep_positives=2 * CFG.min_positives)
    for step in range(200):
        y, so, sb = _conversion_batch(rng, 60, 0.0, 1.5)  # online scores are noise now
        w.add(np.zeros(0), np.zeros(0), y, so, sb)
        v = decide(w, CFG)
        positives = int(sum(c[0] for c in w.conversions))
        if positives < CFG.min_positives:
            assert not v.trip and v.deficit["auc"] is None  # too few bought clicks: no verdict at all
        if v.trip:
            assert v.leg == "auc"
            break
    else:
        pytest.fail("online AUC at chance against a good baseline did not trip")
    assert (step + 1) * 60 <= 2 * CFG.min_positives / 0.015  # within the clicks that carry twice the minimum


def test_a_deficit_below_the_margin_never_trips():
    rng = np.random.default_rng(0)
    w = PairedWindow(window=100_000)
    cfg = GuardConfig(margin=0.03, window=100_000, min_retrievals=500, min_positives=30)
    for _ in range(1500):  # 60,000 cases: a 0.01 deficit is statistically certain, but within the margin
        on, ba = _retrieval_batch(rng, 0.39, 0.40)
        w.add(on, ba, np.zeros(0), np.zeros(0), np.zeros(0))
    v = decide(w, cfg)
    assert 0.0 < v.deficit["hr@10"] < cfg.margin and not v.trip


def test_no_verdict_below_the_minimum_counts():
    rng = np.random.default_rng(1)
    w = PairedWindow(window=CFG.window)
    for _ in range(CFG.min_retrievals // BATCH - 1):
        on, ba = _retrieval_batch(rng, 0.0, 0.9)  # awful, but too few cases to say so
        w.add(on, ba, np.zeros(0), np.zeros(0), np.zeros(0))
    v = decide(w, CFG)
    assert not v.trip and not v.evaluable


@pytest.mark.parametrize("seed", range(5))
def test_a_broken_stream_is_told_apart_from_a_healthy_one_by_repeat_recent(seed):
    from tgastream.model.guard import stream_shifted

    rng = np.random.default_rng(seed)
    anchor_hits = rng.random(CFG.window) < 0.45  # repeat-recent's hits when the baseline was judged
    anchor = float(anchor_hits.mean())
    for _ in range(200):  # healthy: the same level, fresh luck: never called shifted
        assert not stream_shifted(rng.random(CFG.min_retrievals) < 0.45, anchor, CFG.window, CFG)
    assert stream_shifted(rng.random(CFG.min_retrievals) < 0.10, anchor, CFG.window, CFG)  # targets broken
    assert not stream_shifted(rng.random(CFG.min_retrievals // 2) < 0.0, anchor, CFG.window, CFG)  # too few cases
