"""Checkpoints of trainer ranks: complete only as a model file with every rank's part beside it;
the launcher's flags; a checkpoint of W ranks refused by a trainer with another count."""

from __future__ import annotations

import argparse

import pytest

from tgastream.core.settings import Settings
from tgastream.model.config import ModelConfig, OnlineConfig
from tgastream.model.inference import IncompatibleCheckpoint
from tgastream.model.online import OnlineLearner
from tgastream.state.checkpoint import save_checkpoint
from tgastream.state.rank_checkpoint import load_step, newest_loadable, part_path, prune_parts, save_part
from tgastream.stream.commands.train import launcher_env, strip_rank_flags, torchrun_command
from tgastream.stream.trainer import Trainer


def test_a_step_counts_for_a_rank_only_with_its_part_and_the_model_file(tmp_path):
    for step in (5, 10):
        for rank in (0, 1):
            save_part(tmp_path, step, rank, 2, {"offsets": {rank: step}})
        save_checkpoint(tmp_path, step, {"learner": {}, "world": 2})
    save_part(tmp_path, 15, 0, 2, {"offsets": {0: 15}})  # rank 0's part of a checkpoint that never completed
    assert newest_loadable(tmp_path, 0, 2) == 10 == newest_loadable(tmp_path, 1, 2)
    part_path(tmp_path, 10, 1, 2).write_bytes(b"truncated")  # rank 1's newest part is unreadable
    assert newest_loadable(tmp_path, 1, 2) == 5
    model, part = load_step(tmp_path, 5, 1, 2)
    assert model["world"] == 2 and part["offsets"] == {1: 5} and part["rank"] == 1
    assert newest_loadable(tmp_path, 0, 3) == -1  # another world size: no checkpoint of its own


def test_parts_whose_model_file_was_pruned_go_and_a_protected_model_keeps_its_parts(tmp_path):
    for step in (1, 2, 3, 4, 5):
        save_part(tmp_path, step, 0, 2, {})
        if step < 5:  # step 5: this rank's part written, rank 0's model file not yet
            save_checkpoint(tmp_path, step, {"world": 2}, keep=2, protect={"ckpt-000000000001.pt"})
    prune_parts(tmp_path, 0, current=5)
    assert sorted(p.name for p in tmp_path.glob("*.rank-0-of-2.pt")) == [
        "ckpt-000000000001.rank-0-of-2.pt", "ckpt-000000000003.rank-0-of-2.pt", "ckpt-000000000004.rank-0-of-2.pt",
        "ckpt-000000000005.rank-0-of-2.pt"]


def test_a_single_trainer_refuses_a_checkpoint_of_two_ranks(tmp_path):
    learner = OnlineLearner(ModelConfig(n_items=1, n_categories=1, dim=16, heads=2, layers=1, dropout=0.0),
                            OnlineConfig(device="cpu", threads=1, chunk=64))
    settings = Settings(data_dir=tmp_path)
    save_checkpoint(settings.checkpoints, 7, {"learner": learner.state_dict(), "world": 2})
    with pytest.raises(IncompatibleCheckpoint, match="2 ranks"):
        Trainer(settings, "127.0.0.1:1", learner).restore()


def test_nproc_wraps_torchrun_and_passes_every_other_flag_to_the_ranks():
    argv = ["train", "--nproc", "2", "--batch-size", "64", "--max-restarts=1", "--data-dir", "/d"]
    args = argparse.Namespace(nproc=2, max_restarts=1, nnodes="1", rdzv_endpoint="", rdzv_id="x", node_rank=None)
    cmd = torchrun_command(args, argv[1:])
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and "--standalone" in cmd
    assert cmd[cmd.index("--nproc-per-node") + 1] == "2" and cmd[cmd.index("--max-restarts") + 1] == "1"
    assert cmd[cmd.index("--module"):] == ["--module", "tgastream.stream.cli", "train", "--batch-size", "64",
                                           "--data-dir", "/d"]
    several = argparse.Namespace(**{**vars(args), "nnodes": "2", "rdzv_endpoint": "h:29400"})
    cmd = torchrun_command(several, [])
    assert "--standalone" not in cmd and cmd[cmd.index("--rdzv-endpoint") + 1] == "h:29400"
    assert strip_rank_flags(["--nnodes", "2", "--lr", "0.1", "--rdzv-id=a"]) == ["--lr", "0.1"]


def test_a_rendezvous_launcher_publishes_the_master_address_every_round_unless_the_user_chose():
    assert launcher_env({"PATH": "/bin"}, rendezvous=True)["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE" not in launcher_env({"PATH": "/bin"}, rendezvous=False)
    chosen = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "0"}
    assert launcher_env(chosen, rendezvous=True)["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "0"


def test_ranks_meet_under_one_store_prefix_whatever_their_restart_counts_when_no_agent_hosts_the_store():
    from tgastream.model.distributed import attempt_prefix

    survivor = {"TORCHELASTIC_USE_AGENT_STORE": "False", "TORCHELASTIC_RESTART_COUNT": "1"}
    restarted_node = {"TORCHELASTIC_USE_AGENT_STORE": "False", "TORCHELASTIC_RESTART_COUNT": "0"}
    assert attempt_prefix(survivor) == attempt_prefix(restarted_node)
    # the agent's store outlives a restart: each attempt reads its own keys
    agent = {"TORCHELASTIC_USE_AGENT_STORE": "True"}
    assert attempt_prefix({**agent, "TORCHELASTIC_RESTART_COUNT": "0"}) != \
        attempt_prefix({**agent, "TORCHELASTIC_RESTART_COUNT": "1"})
