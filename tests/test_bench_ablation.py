"""``bench/ablation.py``: one row per lever, figures taken from each eval result as they are."""

from __future__ import annotations

import json

import pytest

from tgastream.bench.ablation import main
from tgastream.core.events import load_events
from tgastream.model.config import TrainConfig
from tgastream.model.evaluation import EvalConfig, run
from tgastream.stream.synth import SynthConfig, write_file

pytestmark = pytest.mark.usefixtures("one_thread")


def test_ablation_rows_carry_each_runs_tga_figures_and_paired_comparisons(tmp_path, capsys):
    log = tmp_path / "synth.csv"
    write_file(SynthConfig(users=20, events=1500, seed=4, days=4), log)
    events = load_events(log)
    paths = []
    for prior in (0, 8):
        cfg = EvalConfig(dim=16, layers=1, train=TrainConfig(epochs=1, batch_size=128), models=("tga", "din", "repeat", "covisit"),
                         bootstrap=20, on_validation=True, transition_prior=prior, window_s=6 * 3600.0)
        result = run(events, cfg, progress=False)
        paths.append(tmp_path / f"p{prior}.json")
        paths[-1].write_text(json.dumps(result))
    out = tmp_path / "ablation.json"
    assert main([f"no prior={paths[0]}", f"prior 8={paths[1]}", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["lever"] for r in rows] == ["no prior", "prior 8"]
    for r, p in zip(rows, paths):
        res = json.loads(p.read_text())
        assert r["tga_hr@10"] == res["models"]["tga"]["hr@10"] and r["repeat_hr@10"] == res["models"]["repeat"]["hr@10"]
        assert r["hr@10: tga / repeat"]["value"] == res["comparisons"]["hr@10: tga / repeat"]["value"]
        assert r["gauc: tga - din"]["value"] == res["comparisons"]["gauc: tga - din"]["value"]
        assert r["scored"].startswith("validation")
    assert [r["config"]["transition_prior"] for r in rows] == [0, 8]
    md = out.with_suffix(".md").read_text()
    assert "| prior 8 |" in md and "GAUC TGA − DIN" in md


def test_ablation_says_which_file_it_cannot_read(tmp_path, capsys):
    assert main([f"x={tmp_path / 'missing.json'}", "--json", str(tmp_path / "a.json")]) == 2
    assert "missing.json" in capsys.readouterr().err
