"""``tgastream bench era``: the label-arrival and the click-time window judged on the same cases."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tgastream.bench.era import by_click_day
from tgastream.model.metrics import auc
from tgastream.stream.cli import main


@pytest.mark.usefixtures("one_thread")
def test_bench_era_ends_with_every_click_mature_and_the_latest_clicks_in_the_click_time_window(tmp_path):
    out, png = tmp_path / "era.json", tmp_path / "era.png"
    rc = main(["bench", "era", "--users", "20", "--events", "1500", "--seed", "3", "--window", "300",
               "--seeds", "2", "--batch-size", "128", "--points", "3", "--json", str(out), "--png", str(png)])
    assert rc == 0 and png.stat().st_size > 0
    r = json.loads(out.read_text())
    assert r["cases"] > r["window"] and r["buys"] > 0
    assert len(r["table"]) == 3 and r["pooled_auc"]["n"] == 2
    end = r["table"][-1]  # the final watermark labelled every click: the whole window is mature
    assert end["click_clicks"]["mean"] == end["arrival_clicks"]["mean"] == r["window"]
    for row in r["table"]:
        assert row["click_clicks"]["max"] <= r["window"]
    assert sum(d["clicks"] for d in r["by_click_day"]) <= r["cases"]


@pytest.mark.usefixtures("one_thread")
def test_the_click_time_window_ends_holding_the_latest_clicks_and_never_a_click_newer_than_an_open_one():
    from tgastream.bench.era import replay
    from tgastream.bench.online import _synthetic, stream_samples
    from tgastream.core.settings import Settings

    settings = Settings()
    events, _ = _synthetic(20, 1500, 3, 0.0)
    samples = stream_samples(events, settings)
    run = replay(samples, settings.replace(threads=1), window=300, batch_size=128, seed=0)
    clicks = np.sort(run["cases"][:, 0])
    last = run["points"][-1]
    assert (last["click_from"], last["click_to"], last["maturing"]) == (clicks[-300], clicks[-1], 0)
    # while labels were still open the window stayed behind them: its newest click is older than
    # the stream by about a conversion window most of the time, never newer than the stream
    lags = [p["stream_ts"] - p["click_to"] for p in run["points"][:-1] if p["click_to"] is not None]
    assert lags and min(lags) >= 0 and np.median(lags) > 0.5 * settings.conversion_window_s


def test_by_click_day_groups_cases_by_the_day_of_their_click():
    day = 86400.0
    cases = np.array([[0.0, 1, 0.9, 1], [10.0, 0, 0.1, 0], [day + 5, 1, 0.2, 3], [day + 6, 0, 0.8, 0],
                      [2 * day, 0, 0.5, 0]])  # day 2: negatives only, no AUC
    rows, pooled = by_click_day(cases)
    assert [(d["day"], d["auc"], d["repeat_auc"], d["clicks"]) for d in rows] == [(0, 1.0, 1.0, 2), (1, 0.0, 1.0, 2)]
    assert pooled == pytest.approx(auc(cases[:, 1], cases[:, 2]))
