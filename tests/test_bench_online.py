"""``tgastream bench online``: repeat-recent is scored like the models, and a real log replays end to end."""

from __future__ import annotations

import json

import pytest

from tgastream.model.shadow import repeat_interest, repeat_rank
from tgastream.core.events import BEHAVIOR_CODE
from tgastream.state.graph import UserGraph
from tgastream.state.samples import CONVERSION, RETRIEVAL, Sample
from tgastream.stream.cli import main
from tgastream.stream.synth import SynthConfig, write_file


def _sample(kind: int, items: list[str], target: str, behaviors: list[str] | None = None) -> Sample:
    g = UserGraph(50)
    for k, it in enumerate(items):
        g.append(it, "c", BEHAVIOR_CODE[(behaviors or ["click"] * len(items))[k]], 100.0 + k)
    return Sample(kind, "u", g, target, "c", 0, 0.0, 200.0)


def test_repeat_rank_orders_the_users_own_items_most_recent_first():
    s = _sample(RETRIEVAL, ["a", "b", "a", "c"], "b")  # distinct, newest first: c, a, b
    assert repeat_rank(s, 100) == 3.0
    assert repeat_rank(_sample(RETRIEVAL, ["a", "b"], "z"), 100) == 1.0 + 2 + (100 - 2 - 1) / 2  # tied behind


def test_repeat_interest_counts_touches_of_the_clicked_item_carts_double():
    s = _sample(CONVERSION, ["a", "b", "a", "a"], "a", ["click", "click", "cart", "click"])
    assert repeat_interest(s) == 4.0  # pv + cart(2) + pv
    assert repeat_interest(_sample(CONVERSION, ["b"], "a")) == 0.0


@pytest.mark.usefixtures("one_thread")
def test_bench_online_judges_every_model_on_the_same_clicks_at_click_time_and_writes_the_models(tmp_path):
    log = tmp_path / "log.csv"
    write_file(SynthConfig(users=20, events=800, seed=2, days=2), log)
    out = tmp_path / "res.json"
    rc = main(["bench", "online", "--data", str(log), "--warmup", "0.5", "--segments", "4", "--batch-size", "128",
               "--feedback", "wait,fnw", "--seeds", "2", "--threads", "1",
               "--out", str(tmp_path / "png"), "--json", str(out)])
    assert rc == 0
    r = json.loads(out.read_text())
    models = r["models"]
    assert set(models) == {"online_wait", "online_fnw", "frozen", "repeat"}
    clicks = {m["clicks"] for m in models.values()}
    assert len(clicks) == 1 and clicks.pop() > 0  # the same click cases for every model
    assert len({m["retrieval_cases"] for m in models.values()}) == 1
    for name in ("online_wait", "online_fnw", "frozen"):
        assert 0.0 <= models[name]["auc"] <= 1.0 and models[name]["logloss"] > 0 and 0.0 <= models[name]["ece"] <= 1.0
        assert models[name]["seeds"] == 2
    assert models["repeat"]["logloss"] is None  # a count, not a probability
    lo, hi = models["online_fnw"]["ci"]["logloss"]
    assert lo <= hi and "ci" not in models["online_wait"]
    assert sum(c["clicks"] for c in r["curve"]["online_wait"]) == models["online_wait"]["clicks"]
    # HR@10 per stretch: over the same next events for every model, and the stretches make up the whole
    for name in models:
        seg = r["curve"][name]
        assert sum(c["next_events"] for c in seg) == models[name]["retrieval_cases"]
        n = sum(c["next_events"] for c in seg)
        whole = sum(c["hr@10"] * c["next_events"] for c in seg if c["hr@10"] is not None) / n
        assert abs(whole - models[name]["hr@10"]) < 1e-9
    assert (tmp_path / "png" / "online_clicktime.png").stat().st_size > 0


def test_bench_online_refuses_an_unknown_feedback_mode_in_one_line(tmp_path, capsys):
    assert main(["bench", "online", "--feedback", "wait,esdfm", "--users", "5", "--events", "50"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "esdfm" in err[0] and "fnw" in err[0]


def test_stream_samples_come_in_emission_order_labels_after_their_clicks():
    from tgastream.bench.online import stream_samples
    from tgastream.core.events import Event
    from tgastream.core.settings import Settings
    from tgastream.state.samples import CLICK

    evs = [Event("u", "a", "c", "click", 0.0), Event("v", "b", "c", "click", 10.0), Event("u", "a", "c", "buy", 50.0),
           Event("v", "z", "c", "fav", 90_000.0)]
    out = stream_samples(evs, Settings(), watermark_s=3600.0)
    seen = set()
    for s in out:
        if s.kind == CLICK:
            seen.add(s.click_key)
        elif s.kind == CONVERSION:
            assert s.click_key in seen  # a label never arrives before its click
    assert [(s.item_id, s.label) for s in out if s.kind == CONVERSION] == [("a", 1.0), ("b", 0.0)]
