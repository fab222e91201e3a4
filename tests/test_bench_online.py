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
def test_bench_online_replays_a_log_file_and_writes_curves(tmp_path):
    log = tmp_path / "log.csv"
    write_file(SynthConfig(users=20, events=800, seed=2, days=2), log)
    out = tmp_path / "res.json"
    rc = main(["bench", "online", "--data", str(log), "--warmup", "0.5", "--segments", "4", "--batch-size", "128",
               "--out", str(tmp_path / "png"), "--json", str(out)])
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["online"]["retrieval_cases"] == r["frozen"]["retrieval_cases"] == r["repeat"]["retrieval_cases"] > 0
    assert r["online"]["conversion_cases"] == r["repeat"]["conversion_cases"]
    assert len(r["curve"]["online"]) == 4 and sum(c["retrieval_cases"] for c in r["curve"]["repeat"]) == \
        r["repeat"]["retrieval_cases"]
    assert (tmp_path / "png" / "online_vs_frozen.png").stat().st_size > 0
