"""What of the CUDA paths can be checked without a GPU: asking for a device this machine lacks is
one readable line, bench/gpu.sh says so and measures nothing, and a trainer step makes no host
round trip per sample (the same number of tensor-to-Python conversions for 32 and 128 samples:
on a GPU each one is a synchronisation)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tgastream.core.events import BEHAVIORS, Event
from tgastream.model.config import ModelConfig, OnlineConfig
from tgastream.model.online import OnlineLearner
from tgastream.state.samples import samples_from_events
from tgastream.stream.synth import SynthConfig, generate

REPO = Path(__file__).resolve().parents[1]
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")


@no_cuda
def test_asking_for_cuda_without_one_is_a_one_line_error():
    res = subprocess.run([sys.executable, "-m", "tgastream.stream.cli", "bench", "trainer", "--device", "cuda",
                          "--samples", "300"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert "torch sees no CUDA device" in res.stderr and "Traceback" not in res.stderr


@no_cuda
def test_the_gpu_script_measures_nothing_without_a_gpu_and_says_why(tmp_path):
    res = subprocess.run(["bash", str(REPO / "bench" / "gpu.sh"), str(tmp_path / "out")], cwd=REPO,
                         capture_output=True, text=True, timeout=120, env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"})
    assert res.returncode == 2 and "no CUDA device" in res.stderr
    assert not list((tmp_path / "out").glob("*.json"))


def _conversions_in_a_step(n: int, monkeypatch) -> int:
    rows = generate(SynthConfig(users=40, events=1500, items=200, seed=4))
    events = [Event(str(u + 1), str(i + 1), str(c + 1), BEHAVIORS[b], float(ts)) for ts, u, i, c, b in rows]
    samples = samples_from_events(events, sample_len=20, final_watermark=events[-1].ts + 2 * 86400)
    L = OnlineLearner(ModelConfig(n_items=1, n_categories=1, dim=16, heads=2, layers=1, dropout=0.0),
                      OnlineConfig(device="cpu", threads=1, sample_len=20, chunk=64, reservoir=0, replay_share=0.0))
    L.step(samples[:n])  # warm: rows, tables
    batch = samples[n:2 * n]
    L.vectors(batch)
    calls = [0]
    for name in ("item", "__float__", "__int__", "__bool__", "tolist", "__index__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, **kw):
            if str(REPO) in sys._getframe(1).f_code.co_filename and ".venv" not in sys._getframe(1).f_code.co_filename:
                calls[0] += 1  # ours (torch's optimizer converts a CPU step counter per parameter, not per sample)
            return _original(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, counted)
    assert {s.kind for s in batch} == {0, 1, 2}  # both heads and clicks in the step: the same code paths for any n
    L.learn(batch, score_limit=n)
    monkeypatch.undo()
    return calls[0]


def test_a_training_step_converts_no_tensor_to_python_per_sample(monkeypatch):
    small, large = _conversions_in_a_step(64, monkeypatch), _conversions_in_a_step(256, monkeypatch)
    assert small == large, (small, large)
