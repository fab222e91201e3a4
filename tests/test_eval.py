"""``tgastream eval``: the time-ordered split leaks nothing and the JSON has the agreed keys."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tgastream.model.config import TrainConfig
from tgastream.model.covisit import Covisitation, CovisitConfig, rank_from_scores, repeat_covisit_scores
from tgastream.model.evaluation import (METRIC_KEYS, EvalConfig, build_data, build_model, covisit_ranks, covisitation_of,
                                        repeat_ranks, run, seeds_of, uncensored_clicks)
from tgastream.model.vocab import InMemoryVocab
from tgastream.state.samples import CONVERSION, RETRIEVAL
from tgastream.stream.cli import main
from tgastream.core.events import load_events
from tgastream.stream.synth import SynthConfig, write_file

from tests.conftest import shared_data


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def log(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("eval") / "synth.csv"
    write_file(SynthConfig(users=30, events=3000, seed=3, days=4), path)
    return path


TINY = EvalConfig(dim=16, layers=1, train=TrainConfig(epochs=1, batch_size=128), eval_batch=256,
                  models=("tga", "sasrec", "din", "pop", "repeat", "covisit", "repeat_covisit"), bootstrap=50,
                  window_s=6 * 3600.0)  # the log spans 4 days: a 24 h window would censor every test click


def test_split_uses_only_the_past_for_training(log):
    events = load_events(log)
    data = build_data(events, TINY, progress=False)
    assert data.fit_ts <= data.split_ts
    tr, va, te = data.train, data.valid, data.test
    ret, conv = tr.kind == RETRIEVAL, tr.kind == CONVERSION
    assert (tr.event_ts[ret] < data.fit_ts).all()
    assert (tr.event_ts[conv] + TINY.window_s < data.fit_ts).all()  # label window closed before the cut
    assert (va.event_ts[va.kind == RETRIEVAL] >= data.fit_ts).all() and (va.event_ts < data.split_ts).all()
    assert (te.event_ts >= data.split_ts).all() and len(te) > 0
    seen_before = {e.item_id for e in events if e.ts < data.fit_ts}
    assert set(data.vocabs.items.ids()) == seen_before  # embedding rows only for training-period items
    assert data.info["split_ts"] == sorted(e.ts for e in events)[int(0.8 * len(events))]


def test_eval_json_has_the_agreed_keys(log):
    result = run(load_events(log), TINY, progress=False)
    assert set(result["models"]) == {"tga", "sasrec", "din", "pop", "repeat", "covisit", "repeat_covisit"}
    for name, m in result["models"].items():
        assert set(METRIC_KEYS) <= set(m), name
        assert {"ci", "sd", "seeds"} <= set(m), name
    assert {"retrieval", "buy", "conversion", "retrieval_repeat", "retrieval_novel", "users"} <= set(result["test_cases"])
    tc = result["test_cases"]
    assert tc["retrieval_repeat"] + tc["retrieval_novel"] == tc["retrieval"]
    assert result["models"]["din"]["hr@10"] is None and result["models"]["pop"]["auc"] is None
    assert result["models"]["tga"]["params"] > 0 and result["models"]["tga"]["train_samples_per_s"] > 0
    for key in ("hr@10", "hr@10_repeat", "hr@10_novel", "ndcg@10", "mrr"):
        assert 0.0 <= result["models"]["tga"][key] <= 1.0
    assert result["models"]["repeat"]["hr@10_novel"] == 0.0  # repeat-recent can't name an item the user never saw
    lo, hi = result["models"]["repeat"]["ci"]["hr@10"]
    assert lo <= result["models"]["repeat"]["hr@10"] <= hi
    assert "auc: tga - din" in result["comparisons"] and "hr@10: tga / repeat" in result["comparisons"]
    json.dumps(result)  # serialisable as is


def test_seeds_average_neural_models_and_keep_each_seed(log):
    cfg = EvalConfig(dim=16, layers=1, train=TrainConfig(epochs=1, batch_size=128, seed=5), eval_batch=256,
                     models=("tga", "repeat"), seeds=2, bootstrap=20)
    assert seeds_of(cfg) == [6, 7] and seeds_of(EvalConfig(train=TrainConfig(seed=5))) == [5]
    result = run(load_events(log), cfg, progress=False)
    tga = result["models"]["tga"]
    assert [s["seed"] for s in tga["seeds"]] == [6, 7] and len(result["models"]["repeat"]["seeds"]) == 1
    assert tga["hr@10"] == pytest.approx(np.mean([s["hr@10"] for s in tga["seeds"]]))
    assert tga["sd"]["hr@10"] == pytest.approx(np.std([s["hr@10"] for s in tga["seeds"]], ddof=1))


def test_eval_command_writes_json_and_png(log, tmp_path):
    out = tmp_path / "res.json"
    rc = main(["eval", str(log), "--epochs", "1", "--dim", "16", "--layers", "1", "--models", "tga,pop,repeat,covisit",
               "--seeds", "1", "--bootstrap", "20", "--json", str(out), "--quiet"])
    assert rc == 0
    result = json.loads(out.read_text())
    assert set(result["models"]) == {"tga", "pop", "repeat", "covisit"} and out.with_suffix(".png").stat().st_size > 0
    assert result["seeds"] == [1] and result["models"]["tga"]["ci"]["hr@10"] is not None


def test_conversion_finetune_runs_a_second_stage_chosen_by_conversion_alone(log):
    cfg = replace(TINY, models=("tga", "din"), train=replace(TINY.train, conversion_finetune_epochs=2))
    result = run(load_events(log), cfg, progress=False)
    tga = result["models"]["tga"]["seeds"][0]
    assert 0 <= tga["finetune_best_epoch"] <= 2  # 0: no epoch beat the head it started from
    assert tga["best_head_epoch"] == 1  # one epoch: the conversion head's own choice is that epoch
    assert all("valid_head" in e for e in tga["valid_history"])
    assert tga["finetune_history"][0]["epoch"] == 0 and len(tga["finetune_history"]) >= 2
    assert all("valid" in e for e in tga["finetune_history"])
    assert "finetune_history" not in result["models"]["din"]["seeds"][0]  # conversion-only: one stage
    with pytest.raises(ValueError):
        replace(TINY, train=replace(TINY.train, conversion_finetune_epochs=-1)).validate()


def test_conversion_raw_is_the_eval_default_for_models_with_both_heads_and_overrides_win(log):
    data = build_data(load_events(log), TINY, progress=False)
    assert build_model("tga", TINY, data).conversion_embed is not None
    assert build_model("sasrec_copy", TINY, data).conversion_embed is not None
    assert build_model("din", TINY, data).conversion_embed is None  # the baseline stays DIN
    assert build_model("tga", replace(TINY, conversion_raw=False), data).conversion_embed is None
    off = replace(TINY, model_overrides=(("conversion_raw", False), ("transition_prior", False)))
    model = build_model("tga", off, data)
    assert model.conversion_embed is None and model.prior_param is None


def test_eval_rejects_an_unknown_model(log, capsys):
    assert main(["eval", str(log), "--models", "tga,bogus"]) == 1
    assert "unknown model" in capsys.readouterr().err


def test_repeat_recent_reproduces_the_reference_figure():
    """On taobao-users-10k, repeat-recent reaches HR@10 0.133 (2,000 cases), 0.357 on buys (42)."""
    data = build_data(load_events(shared_data("taobao-users-10k.csv")), EvalConfig(), progress=False)
    idx = np.flatnonzero(data.test.kind == RETRIEVAL)
    ranks = repeat_ranks(data, idx)
    buy = data.test.target_behavior[idx] == 3
    assert len(idx) == 2000 and int(buy.sum()) == 42
    assert (ranks <= 10).mean() == pytest.approx(0.1325) and (ranks[buy] <= 10).mean() == pytest.approx(15 / 42)


def test_covisitation_counts_next_items_and_votes_from_recent_items():
    cv = Covisitation(CovisitConfig(window=2, recent=2, decay=0.5)).fit([[1, 2, 3], [1, 2], [2, 4], [3, 3, 5]])
    assert dict(cv.next[1]) == {2: 2.0, 3: 0.5}  # 1 → 2 twice (next), 1 → 3 once at distance 2
    assert 3 not in cv.next[3]  # no self-transition
    s = cv.scores([9, 1, 2])  # newest 2 (weight 1): 3, 4; then 1 (weight 0.5): 2, 3
    assert s[3] == pytest.approx(1.0 + 0.25) and s[4] == pytest.approx(1.0) and s[2] == pytest.approx(1.0)
    assert 5 not in s  # 9 is beyond `recent` and has no counts anyway


def test_repeat_covisit_puts_own_items_first_then_covisitation():
    cv = Covisitation(CovisitConfig(window=1)).fit([[1, 7], [1, 7], [2, 8]])
    s = repeat_covisit_scores([2, 1], cv)  # own items: 1 (newest) then 2; then 7 (from 1), 8 (from 2)
    ranked = sorted(s, key=s.get, reverse=True)
    assert ranked[:2] == [1, 2] and set(ranked[2:]) == {7, 8} and s[7] > s[8]


def test_rank_from_scores_is_a_full_catalogue_mid_rank():
    scores = {1: 3.0, 2: 1.0, 3: 1.0}
    assert rank_from_scores(scores, 1, 100, True) == 1.0
    assert rank_from_scores(scores, 2, 100, True) == 2.5  # tied with 3
    assert rank_from_scores(scores, 50, 100, True) == 1.0 + 3 + (100 - 3 - 1) / 2  # unscored: tied with 96 others
    assert rank_from_scores(scores, 50, 100, False) == 101.0  # not a candidate yet: a miss
    assert rank_from_scores(scores, 2, 100, True, is_candidate=lambda k: k != 1) == 1.5  # 1 is not a candidate


def test_covisitation_baseline_learns_only_from_the_training_period(log):
    events = load_events(log)
    data = build_data(events, TINY, progress=False)
    cv = covisitation_of(data, CovisitConfig())
    late = {int(k) for k in data.event_keys[data.event_ts >= data.split_ts]} - \
        {int(k) for k in data.event_keys[data.event_ts < data.split_ts]}
    assert late and not late & set(cv.next)  # items first seen in the test period vote for nothing
    idx = np.flatnonzero(data.test.kind == RETRIEVAL)
    ranks = covisit_ranks(data, idx, cv)
    blend = covisit_ranks(data, idx, cv, blend=True)
    assert len(ranks) == len(idx) and (ranks >= 1).all()
    repeat = repeat_ranks(data, idx)
    hit = repeat <= 10
    assert (blend[hit] == repeat[hit]).all()  # the blend keeps repeat-recent's own-item order on top


def test_on_validation_scores_the_validation_share_and_never_the_test_period(log):
    events = load_events(log)
    cfg = EvalConfig(models=("repeat", "covisit"), bootstrap=0, on_validation=True)
    data = build_data(events, cfg, progress=False)
    result = run(events, cfg, progress=False)
    assert result["data"]["scored"].startswith("validation")
    assert result["test_cases"]["retrieval"] == int((data.valid.kind == RETRIEVAL).sum())
    assert result["test_cases"]["conversion"] == int((data.valid.kind == CONVERSION).sum())


def test_clicks_of_the_logs_last_conversion_window_are_left_out_as_censored():
    end, window = 1000.0, 100.0
    clicks = np.array([0.0, 899.0, 900.0, 901.0, 999.0])
    assert uncensored_clicks(clicks, window, end).tolist() == [True, True, True, False, False]


def test_eval_scores_no_censored_click_and_counts_those_left_out(log):
    events = load_events(log)
    cfg = EvalConfig(models=("din",), dim=16, layers=1, train=TrainConfig(epochs=1, batch_size=128), bootstrap=0,
                     window_s=6 * 3600.0)
    data = build_data(events, cfg, progress=False)
    conv = data.test.kind == CONVERSION
    open_at_end = data.test.event_ts[conv] + cfg.window_s > max(e.ts for e in events)
    assert 0 < open_at_end.sum() < conv.sum()  # the log has both kinds of test click
    result = run(events, cfg, progress=False)
    assert result["test_cases"]["conversion_censored_excluded"] == int(open_at_end.sum())
    assert result["test_cases"]["conversion"] == int((~open_at_end).sum())


def test_covisitation_counted_online_equals_counting_the_whole_sequences():
    seqs = [[1, 2, 3, 2, 4, 1], [2, 3, 5], [5, 5, 1, 3]]
    batch = Covisitation(CovisitConfig(window=2)).fit(seqs)
    online = Covisitation(CovisitConfig(window=2))
    for seq in seqs:
        for j, x in enumerate(seq):
            online.add(seq[:j], x)
    assert {x: dict(r) for x, r in online.next.items() if r} == {x: dict(r) for x, r in batch.next.items() if r}
    keys, vals = batch.top([1, 2], 2)
    assert len(keys) == 2 and vals[0] >= vals[1] and set(keys) <= set(batch.scores([1, 2]))


def _events_before(events, ts: float) -> list[list[int]]:
    per_user: dict[str, list] = {}
    for e in sorted(events, key=lambda e: e.ts):
        if e.ts < ts:
            per_user.setdefault(e.user_id, []).append(e.item_id)
    return list(per_user.values())


def test_transition_prior_of_a_sample_counts_only_transitions_before_it(log):
    events = load_events(log)
    cfg = EvalConfig(bootstrap=0, transition_prior=10_000, covisit=CovisitConfig())
    data = build_data(events, cfg, progress=False)
    catalogue = InMemoryVocab(e.item_id for e in sorted(events, key=lambda e: e.ts))  # keys as build_data gives them
    key_of = {e.item_id: int(catalogue.lookup([e.item_id])[0]) for e in events}
    for enc, frozen_at in ((data.train, None), (data.valid, data.fit_ts), (data.test, data.split_ts)):
        rows = np.flatnonzero(enc.kind == RETRIEVAL)
        for i in rows[np.linspace(0, len(rows) - 1, 8).astype(int)]:
            cut = enc.event_ts[i] if frozen_at is None else frozen_at
            ref = Covisitation(cfg.covisit).fit([[key_of[x] for x in seq] for seq in _events_before(events, cut)])
            expect = ref.scores(enc.keys[i, :enc.lengths[i]].tolist())
            got = {int(k): float(v) for k, v in zip(enc.prior_keys[i], enc.prior_vals[i]) if k > 0}
            assert got.keys() == {k for k, v in expect.items() if v > 0}
            assert all(abs(got[k] - expect[k]) < 1e-4 for k in got)
    assert (data.test.prior_keys[data.test.kind == CONVERSION] == 0).all()  # conversion rows carry none
