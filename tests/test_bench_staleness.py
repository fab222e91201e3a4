"""``tgastream bench staleness``: the online learner, its snapshots, the frozen copy and the
learner with a frozen conversion head, judged on the same click-time cases."""

from __future__ import annotations

import json

import pytest
import torch

from tgastream.bench.staleness import freeze_conversion_head, snapshot_due
from tgastream.stream.cli import main


def test_a_snapshot_is_taken_at_the_cut_and_every_k_batches_after_it():
    assert [b for b in range(12) if snapshot_due(b, 3, 4)] == [3, 7, 11]
    assert [b for b in range(5) if snapshot_due(b, 2, 1)] == [2, 3, 4]


@pytest.mark.usefixtures("one_thread")
def test_a_frozen_conversion_head_stays_put_while_the_rest_of_the_model_learns():
    from tgastream.bench.online import _synthetic, stream_samples
    from tgastream.core.settings import Settings
    from tgastream.model.online import OnlineLearner
    from tgastream.stream.configs import online_config, online_model_config

    settings = Settings().replace(threads=1)
    events, _ = _synthetic(20, 1200, 3, 0.0)
    samples = stream_samples(events, settings)
    learner = OnlineLearner(online_model_config(settings), online_config(settings))
    learner.step(samples[:128])
    assert freeze_conversion_head(learner) > 0
    head = {n: p.detach().clone() for n, p in learner.model.named_parameters() if n.startswith("conversion_head.")}
    layer = learner.model.layers[0].qkv.weight.detach().clone()
    learner.step(samples[128:256])
    assert all(torch.equal(p, head[n]) for n, p in learner.model.named_parameters() if n in head)
    assert not torch.equal(learner.model.layers[0].qkv.weight, layer)


@pytest.mark.usefixtures("one_thread")
def test_bench_staleness_judges_every_model_on_the_same_clicks(tmp_path):
    out, png = tmp_path / "staleness.json", tmp_path / "staleness.png"
    rc = main(["bench", "staleness", "--users", "20", "--events", "1500", "--seed", "3", "--seeds", "2",
               "--snapshots", "5,2", "--batch-size", "64", "--json", str(out), "--png", str(png)])
    assert rc == 0 and png.stat().st_size > 0
    r = json.loads(out.read_text())
    assert list(r["models"]) == ["online_wait", "snapshot_2", "snapshot_5", "frozen", "online_head_frozen"]
    assert r["clicks"] > 0 and r["buys"] > 0 and r["snapshots_every_batches"] == [2, 5]
    for name, m in r["models"].items():
        assert m["clicks"] == r["clicks"] and m["seeds"] == 2 and m["auc"] is not None
        assert (name == "online_wait") == ("ci" not in m)
        assert m["hr@10"] is not None  # every model ranked every retrieval case: snapshots' ranks joined
    assert r["models"]["snapshot_2"]["retrieval_cases"] == r["models"]["online_wait"]["retrieval_cases"]


def test_bench_staleness_refuses_a_bad_snapshot_list(capsys):
    assert main(["bench", "staleness", "--snapshots", "5,x"]) != 0
    assert "--snapshots" in capsys.readouterr().err
