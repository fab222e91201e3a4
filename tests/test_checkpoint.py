"""Atomic checkpoints: the newest loadable one wins, a corrupt file falls back to the previous."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from tgastream.state.checkpoint import (
    CheckpointRefused, list_checkpoints, load_checkpoint, load_latest, save_checkpoint, write_atomic,
)


def test_latest_checkpoint_is_loaded_and_old_ones_pruned(tmp_path):
    for step in (10, 20, 30, 40):
        save_checkpoint(tmp_path, step, {"w": torch.full((2,), float(step)), "offsets": {0: step}}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-000000000030.pt", "ckpt-000000000040.pt"]
    ck = load_latest(tmp_path)
    assert ck["step"] == 40 and ck["offsets"] == {0: 40} and ck["w"].tolist() == [40.0, 40.0]


def test_corrupt_newest_falls_back_to_previous(tmp_path):
    save_checkpoint(tmp_path, 1, {"x": 1})
    path = save_checkpoint(tmp_path, 2, {"x": 2})
    path.write_bytes(path.read_bytes()[:20])
    bad = []
    assert load_latest(tmp_path, on_bad=lambda p, e: bad.append(p.name))["x"] == 1
    assert bad == [path.name]


def test_write_atomic_leaves_no_temp_files(tmp_path):
    write_atomic(tmp_path / "f", b"abc")
    write_atomic(tmp_path / "f", b"def")
    assert (tmp_path / "f").read_bytes() == b"def" and [p.name for p in tmp_path.iterdir()] == ["f"]


def test_no_checkpoint_gives_none(tmp_path):
    assert load_latest(tmp_path / "missing") is None


class _Payload:
    """Unpickling this runs ``os.system``: what a crafted checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_pickle_checkpoint_is_refused_and_runs_nothing(tmp_path):
    save_checkpoint(tmp_path, 1, {"x": 1})
    marker = tmp_path / "pwned"
    crafted = tmp_path / "ckpt-000000000002.pt"
    with open(crafted, "wb") as fh:
        torch.save({"step": 2, "learner": _Payload(marker)}, fh, pickle_module=pickle)
    with pytest.raises(CheckpointRefused, match="refused: it holds more than plain tensors"):
        load_checkpoint(crafted)
    refused = []
    assert load_latest(tmp_path, on_bad=lambda p, e: refused.append((p.name, type(e))))["x"] == 1
    assert refused == [(crafted.name, CheckpointRefused)]
    assert not marker.exists()
