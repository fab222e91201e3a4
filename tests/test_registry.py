"""The model registry (state/registry.py), retention that never deletes the last good checkpoint,
rollback onto the current id maps (model/rollback.py), `tgastream models` / `rollback`, and the
API saying whether the serving model is live, pinned or rolled back."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from tgastream.model.rollback import rollback_learner
from tgastream.state.checkpoint import list_checkpoints, save_checkpoint
from tgastream.state.registry import Registry, RegistryError, editing, locked
from tgastream.state.serving import ServingStore
from tgastream.stream.cli import main
from tests.test_serve import _start, rec


def _registry_with(tmp_path: Path, n: int, good: set[int] = frozenset()) -> Registry:
    reg = Registry.load(tmp_path)
    parent = None
    for k in range(1, n + 1):
        path = save_checkpoint(tmp_path, k * 10, {"x": k}, keep=3, protect=reg.protected_files())
        reg.add(k * 10, parent, k * 10, path.name, {"hr@10": 0.1 * k})
        if k * 10 in good:
            reg.mark(k * 10, "good")
        reg.save()
        parent = k * 10
    return reg


def test_versions_are_unique_increasing_and_record_their_parent(tmp_path):
    reg = _registry_with(tmp_path, 3)
    again = Registry.load(tmp_path)
    assert [(v.version, v.parent, v.status) for v in again.versions] == [(10, None, "candidate"), (20, 10, "candidate"),
                                                                        (30, 20, "candidate")]
    assert again.versions[1].metrics == {"hr@10": 0.2}
    with pytest.raises(RegistryError, match="not newer"):
        reg.add(20, 30, 40, "ckpt-000000000040.pt", {})


def test_retention_never_deletes_the_last_good_checkpoint(tmp_path):
    reg = _registry_with(tmp_path, 8, good={20})  # keep=3: without protection 20 would go at the 4th
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert "ckpt-000000000020.pt" in names and len(names) == 4
    assert reg.last_good().version == 20
    assert "ckpt-000000000010.pt" not in names  # an older candidate is pruned as before


def test_pin_marks_one_version_and_the_cli_lists_and_pins(tmp_path, capsys):
    _registry_with(tmp_path, 3, good={10, 20})
    assert main(["models", "--checkpoint-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "good" in out and "candidate" in out and "serving: live" in out
    assert main(["rollback", "--to", "20", "--checkpoint-dir", str(tmp_path)]) == 0
    reg = Registry.load(tmp_path)
    assert reg.pinned().version == 20 and reg.last_good().version == 20
    assert main(["rollback", "--to", "99", "--checkpoint-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no model version 99" in err[0]
    assert main(["rollback", "--release", "--checkpoint-dir", str(tmp_path)]) == 0
    assert Registry.load(tmp_path).pinned() is None


def test_a_pin_by_hand_is_not_lost_to_a_trainer_saving_the_registry_at_the_same_time(tmp_path):
    _registry_with(tmp_path, 3, good={10, 20})
    inside = threading.Event()

    def trainer_step() -> None:  # the trainer's read-modify-write, slow on purpose
        with editing(tmp_path) as reg:
            inside.set()
            time.sleep(0.5)
            reg.mark(30, "bad")

    t = threading.Thread(target=trainer_step)
    t.start()
    inside.wait(5)
    assert main(["rollback", "--to", "20", "--checkpoint-dir", str(tmp_path)]) == 0  # waits for the trainer's save
    t.join()
    reg = Registry.load(tmp_path)
    assert reg.get(30).status == "bad" and reg.pinned().version == 20  # both changes survive


def test_a_registry_locked_too_long_is_one_readable_error(tmp_path):
    with locked(tmp_path):
        with pytest.raises(RegistryError, match="stayed locked by another process"):
            with editing(tmp_path, timeout_s=0.2):
                pass


def test_models_json_lists_every_version(tmp_path, capsys):
    _registry_with(tmp_path, 2)
    assert main(["models", "--json", "--checkpoint-dir", str(tmp_path)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [v["version"] for v in data["versions"]] == [10, 20] and data["serving"]["state"] == "live"


def _learner(seed: int = 0):
    from tgastream.core.settings import Settings
    from tgastream.model.online import OnlineLearner
    from tgastream.stream.configs import online_config, online_model_config

    s = Settings().replace(dim=16, heads=2, layers=1, device="cpu", seed=seed)
    return OnlineLearner(online_model_config(s), online_config(s, chunk=64))


def _samples(items: list[str], user: str = "u"):
    from tgastream.core.events import Event
    from tgastream.state.samples import samples_from_events

    events = [Event(user, it, "c" + it[-1], "click", 1_500_000_000.0 + k) for k, it in enumerate(items)]
    return samples_from_events(events, sample_len=20)


def test_rollback_restores_good_weights_and_keeps_rows_added_since(tmp_path):
    L = _learner()
    first = _samples([f"i{k}" for k in range(30)])
    L.step(first)
    good = L.state_dict()
    good_item = L.model.embed.item.weight[L.rows.items.row_of("i3")].detach().clone()
    good_layer = {k: v.clone() for k, v in L.model.state_dict().items() if not k.startswith(("embed.item", "embed.category", "item_"))}
    later = _samples([f"n{k}" for k in range(100)] + ["i3", "i4"], user="v")  # new items: more rows, tables grow
    for _ in range(3):
        L.step(later)
    version, rows_before = L.version, len(L.rows.items)
    assert L.rows.items.capacity > 64  # the tables grew past the good model's
    rollback_learner(L, good)
    assert L.version == version  # the counter never goes back: the next versions get new numbers
    assert len(L.rows.items) == rows_before and "n99" in L.rows.items  # rows added since are kept
    assert torch.equal(L.model.embed.item.weight[L.rows.items.row_of("i3")], good_item)  # good row, same id
    for k, v in good_layer.items():
        assert torch.equal(L.model.state_dict()[k], v), k
    assert L.model.embed.item.weight.shape[0] == L.rows.items.capacity
    assert [s.to_bytes() for s in L.reservoir.samples] == good["reservoir"]  # the bad stretch is not replayed
    L.step(later)  # and it keeps learning
    assert L.version == version + 1


def test_api_says_whether_the_serving_model_is_rolled_back(tmp_path):
    store_path = tmp_path / "serving"
    writer = ServingStore(store_path)
    writer.write(users={"u1": rec([1, 0], version=20)}, items={}, model_version=20)
    ckpt = tmp_path / "registry-only"  # the manifest alone: the API's scorer finds no checkpoint to load
    reg = Registry(ckpt)
    for v in (10, 20, 30):
        reg.add(v, v - 10 or None, v, f"ckpt-{v:012d}.pt", {})
    reg.mark(20, "good")
    reg.set_serving("rolled_back", 20)
    reg.save()
    base, proc = _start(tmp_path, store_path, "--checkpoint-dir", str(ckpt))
    try:
        health = httpx.get(base + "/healthz").json()
        assert health["model_state"] == "rolled_back" and health["serving_version"] == 20
        emb = httpx.get(base + "/v1/users/u1/embedding").json()
        assert emb["model_state"] == "rolled_back" and emb["model_version"] == 20
        reg = Registry.load(ckpt)
        reg.set_serving("live", 30)
        reg.save()
        assert httpx.get(base + "/healthz").json()["model_state"] == "live"
    finally:
        proc.terminate()
        proc.wait(10)
        writer.close()
