"""Atomic checkpoints: the newest loadable one wins, a corrupt file falls back to the previous."""

from __future__ import annotations

import torch

from tgastream.state.checkpoint import list_checkpoints, load_latest, save_checkpoint, write_atomic


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
