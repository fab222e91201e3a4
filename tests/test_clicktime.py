"""Conversion judged at the click: the pending-prediction store, its join and restart, and the
delayed-feedback (FNW) training samples and weights."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from tgastream.core.events import Event
from tgastream.model.clicktime import ClickTimeStore
from tgastream.model.config import ModelConfig, OnlineConfig
from tgastream.model.feedback import conversion_loss, fnw_weights, training_samples
from tgastream.model.online import OnlineLearner
from tgastream.model.shadow import Shadow, ShadowConfig
from tgastream.state.graph import UserGraph
from tgastream.state.samples import CLICK, CONVERSION, RETRIEVAL, RedeliveryGuard, Sample, UserState
from tgastream.stream.processor import _identify

DAY = 86400.0


def learner(**over) -> OnlineLearner:
    shape = ModelConfig(n_items=1, n_categories=1, dim=16, heads=2, layers=1, dropout=0.0)
    return OnlineLearner(shape, OnlineConfig(**{"device": "cpu", "sample_len": 20, "chunk": 64, "reservoir": 200,
                                                "replay_share": 0.0, **over}))


class Stream:
    """Per-user worker state applied in order, each event's samples stamped with its offset."""

    def __init__(self) -> None:
        self.users: dict[str, UserState] = {}
        self.offset = 0

    def events(self, *evs: tuple) -> list:
        out = []
        for user, item, beh, ts in evs:
            st = self.users.setdefault(user, UserState.new(user, 100))
            out += _identify(st.apply(Event(user, item, "c" + item[:1], beh, ts), self.offset, DAY, 20), 0, 0, self.offset)
            self.offset += 1
        return out

    def watermark(self, ts: float) -> list:
        out = []
        for st in self.users.values():
            out += _identify(st.expire(ts, DAY, 20), 0, 0, self.offset)
            self.offset += 1
        return out


def filler(k: int, t0: float) -> list[tuple]:
    """Browsing of other users (retrieval samples only): something to train on in between."""
    return [(f"f{j % 7}", f"x{j % 13}", "fav", t0 + j) for j in range(k)]


def test_a_positive_and_a_negative_of_the_same_era_are_judged_on_the_same_model_versions_prediction():
    L = learner()
    s = Stream()
    L.step(s.events(*filler(60, 0.0)))
    # two users click at the same time: one buys ten minutes later, the other's window ends a day later
    clicks = s.events(("a", "h1", "fav", 100.0), ("b", "h2", "fav", 100.0), ("a", "i1", "click", 200.0),
                      ("b", "i2", "click", 201.0))
    L.step(clicks)
    pending = dict(L.clicktime.pending)
    (va, pa), (vb, pb) = pending[("a", "i1", 200.0)], pending[("b", "i2", 201.0)]
    assert va == vb == L.version - 1  # predicted before that step's update, by one model version
    buy = s.events(("a", "i1", "buy", 800.0))
    for k in range(5):  # the model moves on between the buy and the window end
        L.step(s.events(*filler(40, 1000.0 + 100 * k)) + (buy if k == 0 else []))
    assert list(L.metrics.conv_labels) == [1.0] and list(L.metrics.conv_scores) == pytest.approx([pa[0]])
    L.step(s.watermark(201.0 + DAY))
    assert list(L.metrics.conv_labels) == [1.0, 0.0]
    assert list(L.metrics.conv_scores) == pytest.approx([pa[0], pb[0]])  # the click-time scores, not today's
    now = L.conversion_proba(clicks[-1].graph, [("i2", "ci")])[0]
    assert now != pytest.approx(pb[0], abs=1e-6)  # (the model of the window end would have said something else)
    assert L.clicktime.counts() == {"pending": 0, "predicted": 2, "joined": 2, "evicted": 0, "unmatched": 0}


def test_pending_predictions_survive_a_restart_through_a_saved_state():
    L = learner()
    s = Stream()
    L.step(s.events(*filler(40, 0.0), ("a", "h1", "fav", 50.0), ("a", "i1", "click", 60.0)))
    before = dict(L.clicktime.pending)
    assert len(before) == 1
    buf = io.BytesIO()
    torch.save(L.state_dict(), buf)  # as a checkpoint is written (plain data: loadable with weights_only)
    buf.seek(0)
    twin = learner()
    twin.load_state_dict(torch.load(buf, weights_only=True))
    assert dict(twin.clicktime.pending) == before
    twin.step(s.events(("a", "i1", "buy", 90.0)))
    assert list(twin.metrics.conv_scores) == pytest.approx([before[("a", "i1", 60.0)][1][0]])
    assert twin.clicktime.unmatched == 0


def test_the_store_is_bounded_and_a_lost_prediction_is_counted_not_scored():
    s = Stream()
    samples = s.events(("u", "h", "fav", 0.0), ("u", "i1", "click", 1.0), ("u", "i2", "click", 2.0),
                       ("u", "i3", "click", 3.0))
    clicks = [x for x in samples if x.kind == CLICK]
    store = ClickTimeStore(capacity=2)
    store.predict(clicks, np.array([0.1, 0.2, 0.3]), version=4)
    assert store.evicted == 1 and list(store.pending) == [("u", "i2", 2.0), ("u", "i3", 3.0)]
    labels = [x for x in s.watermark(10 * DAY) if x.kind == CONVERSION]
    joined = store.join(labels)
    assert joined.probs[:, 0].tolist() == [0.2, 0.3] and joined.versions.tolist() == [4, 4]
    assert store.unmatched == 1 and store.joined == 2
    back = ClickTimeStore(capacity=2)
    back.load_state_dict(store.state_dict())
    assert back.counts() == store.counts()


def test_fnw_trains_each_click_at_once_and_its_buy_again_each_under_its_own_identity_once():
    s = Stream()
    out = s.events(("u", "h", "fav", 0.0), ("u", "i1", "click", 10.0), ("u", "i2", "click", 20.0),
                   ("u", "i1", "buy", 30.0))
    out += s.watermark(20.0 + DAY)  # i2's window ends unbought
    fnw = training_samples(out, "fnw")
    conv = [(x.item_id, x.label, x.offset, x.seq) for x in fnw if x.kind == CONVERSION]
    # i1: a fake negative at its click, the positive at its buy; i2: the fake negative only (no window-end row)
    assert sorted(conv) == [("i1", 0.0, 1, 1), ("i1", 1.0, 3, 1), ("i2", 0.0, 2, 1)]
    ids = [(x.generation, x.partition, x.offset, x.seq) for x in out]
    assert len(set(ids)) == len(ids)  # every sample, the click's and the buy's, its own identity
    assert sorted(x.item_id for x in training_samples(out, "wait") if x.kind == CONVERSION) == ["i1", "i2"]
    assert not any(x.kind == CLICK for x in training_samples(out, "wait"))
    guard = RedeliveryGuard()
    assert [guard.admit(x) for x in out] == [True] * len(out)
    assert [guard.admit(x) for x in out] == [False] * len(out)  # a re-delivered copy is never trained again


def test_fnw_weights_on_a_worked_example():
    f = torch.tensor([0.2, 0.2, 0.5])
    y = torch.tensor([1.0, 0.0, 0.0])
    assert fnw_weights(f, y).tolist() == pytest.approx([1.2, 0.8 * 1.2, 0.5 * 1.5])
    logits = torch.logit(f).requires_grad_()
    loss = conversion_loss(logits, y, "fnw")
    expect = -(1.2 * np.log(0.2) + 0.96 * np.log(0.8) + 0.75 * np.log(0.5))
    assert float(loss.detach()) == pytest.approx(expect, rel=1e-5)
    loss.backward()  # the weights are constants: d/dz = w · (f − y)
    assert logits.grad.tolist() == pytest.approx([1.2 * (0.2 - 1), 0.96 * 0.2, 0.75 * 0.5], rel=1e-5)
    assert float(conversion_loss(torch.logit(f), y, "wait")) == pytest.approx(
        -(np.log(0.2) + np.log(0.8) + np.log(0.5)), rel=1e-5)


@pytest.mark.parametrize("mode,fixed_point", [("fnw", 0.3), ("wait", 0.3 / 1.3)])
def test_on_a_fake_negative_stream_fnw_learns_the_true_rate_and_plain_logloss_does_not(mode, fixed_point):
    """Every click once as a negative, 30% of them again as positives: the stream FNW trains on.
    The weighted loss's minimiser is the true P(buy) = 0.3; unweighted, p / (1 + p)."""
    n, p = 1000, 0.3
    y = torch.cat([torch.zeros(n), torch.ones(int(p * n))])
    z = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([z], lr=2.0)
    for _ in range(400):
        opt.zero_grad()
        (conversion_loss(z.expand(len(y)), y, mode) / len(y)).backward()
        opt.step()
    assert float(torch.sigmoid(z)) == pytest.approx(fixed_point, abs=2e-3)


def test_wait_and_fnw_learners_train_the_same_retrievals_and_only_fnw_the_clicks_at_once():
    s = Stream()
    batch = s.events(*filler(30, 0.0), ("a", "h", "fav", 40.0), ("a", "i1", "click", 50.0))
    for mode, trained_convs in (("wait", 0), ("fnw", 1)):
        L = learner(conversion_feedback=mode)
        L.step(batch)
        rows = training_samples(batch, mode)
        assert sum(x.kind == CONVERSION for x in rows) == trained_convs
        assert sum(x.kind == RETRIEVAL for x in rows) == sum(x.kind == RETRIEVAL for x in batch)
        assert L.version == 1


def test_the_demo_report_carries_the_click_time_auc_with_its_cases_and_plots_calibration(tmp_path):
    from tgastream.model.metrics import reliability
    from tgastream.stream.demo import online_metrics_plot, online_report

    rng = np.random.default_rng(0)
    p = rng.random(400) * 0.2
    y = (rng.random(400) < p).astype(float)
    stats = {"online": {"auc": 0.61, "auc_clicks": 400, "auc_buys": int(y.sum()), "logloss": 0.3, "ece": 0.01,
                        "hr@10": 0.2, "clicktime_unmatched": 0, "clicktime_pending": 7},
             "reliability": reliability(y, p, 10)}
    on = online_report(stats)
    assert (on["auc"], on["auc_clicks"], on["auc_buys"], on["clicks_pending"]) == (0.61, 400, int(y.sum()), 7)
    assert len(on["reliability"]) == 10
    history = [{"time": 100.0 + k, "hr@10": 0.1, "auc": 0.6, "logloss": 0.3, "ece": 0.02} for k in range(5)]
    online_metrics_plot(history, on, tmp_path / "online_metrics.png")
    assert (tmp_path / "online_metrics.png").stat().st_size > 1000


def test_a_positive_that_arrives_before_an_older_clicks_negative_waits_for_that_negative():
    L = learner()
    s = Stream()
    L.step(s.events(*filler(60, 0.0)))
    # b clicks first and never buys; a clicks later and buys ten minutes after
    L.step(s.events(("a", "h1", "fav", 50.0), ("b", "h2", "fav", 50.0), ("b", "i2", "click", 100.0),
                    ("a", "i1", "click", 200.0)))
    pb, pa = L.clicktime.pending[("b", "i2", 100.0)][1][0], L.clicktime.pending[("a", "i1", 200.0)][1][0]
    L.step(s.events(("a", "i1", "buy", 800.0)) + s.events(*filler(30, 900.0)))
    assert L.clicktime.joined == 1 and L.clicktime.horizon() == 100.0  # a's label is in, b's click still open
    assert list(L.metrics.conv_labels) == [] and L.online_metrics()["auc_maturing"] == 1  # a waits for b's era
    L.step(s.watermark(100.0 + DAY + 1))  # b's window ends: its negative, then both enter, b's click first
    assert L.clicktime.horizon() == float("inf")
    assert list(L.metrics.conv_labels) == [0.0, 1.0]
    assert list(L.metrics.conv_scores) == pytest.approx([pb, pa])
    snap = L.online_metrics()
    assert (snap["auc_click_from"], snap["auc_click_to"], snap["auc_maturing"]) == (100.0, 200.0, 0)


def test_a_restart_keeps_the_pending_and_the_maturing_cases():
    L = learner()
    s = Stream()
    L.step(s.events(*filler(40, 0.0), ("b", "h2", "fav", 40.0), ("a", "h1", "fav", 50.0), ("b", "i2", "click", 55.0),
                    ("a", "i1", "click", 60.0)))
    L.step(s.events(("a", "i1", "buy", 90.0)))  # a is labelled, but b's older click is not: a is maturing
    assert L.online_metrics()["auc_maturing"] == 1 and not L.metrics.conv_labels
    buf = io.BytesIO()
    torch.save(L.state_dict(), buf)
    buf.seek(0)
    twin = learner()
    twin.load_state_dict(torch.load(buf, weights_only=True))
    assert dict(twin.clicktime.pending) == dict(L.clicktime.pending) and twin.clicktime.horizon() == 55.0
    assert twin.online_metrics()["auc_maturing"] == 1
    twin.step(s.watermark(55.0 + DAY + 1))  # b's negative arrives after the restart: both enter, in click order
    assert list(twin.metrics.conv_labels) == [0.0, 1.0]
    assert list(twin.metrics.conv_ts) == [55.0, 60.0]


def _click(user: str, item: str, ts: float, label: float = 0.0, kind: int = CLICK) -> Sample:
    return Sample(kind, user, UserGraph(4), item, "c", 0, label, ts)


def test_the_horizon_is_the_earliest_pending_click_under_eviction_re_prediction_and_joins():
    rng = np.random.default_rng(3)
    store = ClickTimeStore(capacity=50)
    keys = [(f"u{k % 9}", f"i{k}", float(rng.integers(0, 400))) for k in range(300)]
    for step in range(400):
        batch = [keys[j] for j in rng.integers(0, len(keys), 5)]  # some keys again: re-predicted
        store.predict([_click(*k) for k in batch], rng.random(len(batch)), version=step)
        if step % 3 == 0 and store.pending:  # labels of some pending clicks, any order
            got = list(store.pending)
            take = [got[j] for j in rng.choice(len(got), min(4, len(got)), replace=False)]
            store.join([_click(*k, kind=CONVERSION) for k in take])
        want = min((t for _, _, t in store.pending), default=float("inf"))
        assert store.horizon() == want
        assert len(store.heap) <= 2 * len(store.pending) + 64 + 5  # stale entries do not pile up
    assert store.evicted > 0 and store.joined > 0
    back = ClickTimeStore(capacity=50)
    back.load_state_dict(store.state_dict())
    assert back.horizon() == store.horizon()


def test_the_shadows_rolling_conversion_metrics_wait_for_older_clicks_too():
    L = learner()
    s = Stream()
    shadow = Shadow(ShadowConfig(share=1.0), paired_window=100)  # every click picked
    judged = []

    def step(samples):
        scored = shadow.evaluate(samples, L.model, L.rows, L.device)
        if scored is not None:
            shadow.note(scored)
            judged.extend(scored.labels.tolist())
        L.step(samples)

    step(s.events(*filler(40, 0.0), ("a", "h1", "fav", 50.0), ("b", "h2", "fav", 50.0)))
    step(s.events(("b", "i2", "click", 100.0), ("a", "i1", "click", 200.0)))
    step(s.events(("a", "i1", "buy", 800.0)))
    assert judged == [1.0]  # joined at once (the guard's paired window takes it as it arrives) ...
    assert all(not r.conv_labels for r in shadow.rolling.values())  # ... the rolling windows wait for b's label
    step(s.watermark(100.0 + DAY + 1))
    for name in ("online", "repeat"):
        assert list(shadow.rolling[name].conv_labels) == [0.0, 1.0]
        assert list(shadow.rolling[name].conv_ts) == [100.0, 200.0]
