"""What a data-parallel trainer rank needs besides the learner's collectives (model/distributed.py):
which partitions it owns, where its files go, and how all ranks agree once per loop.

Ranks step together: every rank runs every loop iteration, with or without samples, and the
iteration ends with one all-reduce (:func:`agree`) of each rank's votes, so stopping, going idle,
checkpointing and ``max_samples`` are decided identically on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tgastream.model.distributed import Group


def owned(partitions: list[int], group: Group) -> list[int]:
    """The samples partitions rank r consumes: p with p % world == r (a user's samples stay on
    one partition, so on one rank)."""
    return [p for p in partitions if p % group.world == group.rank]


def rank_dir(data_dir: Path, group: Group) -> Path:
    """A rank's own data dir (serving store, trained log, history, stats): ``data_dir`` for one
    process (as before), ``data_dir/rank-<r>`` with ranks."""
    return Path(data_dir) / f"rank-{group.rank}" if group.distributed else Path(data_dir)


@dataclass
class Votes:
    """One rank's view at the end of a loop iteration."""

    stop: bool  # SIGTERM/SIGINT here
    data: bool  # read or trained something this iteration, or has a backlog
    checkpoint: bool  # a checkpoint is due by this rank's clock
    idle: bool  # (rank 0 only) idle for idle_exit_s by rank 0's clock
    samples: int  # consumed so far
    backlog: int  # consumed, not yet trained


@dataclass
class Agreed:
    """The same on every rank: the sums of the votes."""

    stop: bool
    data: bool
    checkpoint: bool
    idle: bool
    samples: int
    backlog: int


def agree(group: Group, v: Votes) -> Agreed:
    """One all-reduce (sum) of every rank's votes."""
    t = torch.tensor([v.stop, v.data, v.checkpoint, v.idle, v.samples, v.backlog], dtype=torch.float64)
    s = group.all_sum(t)
    return Agreed(s[0] > 0, s[1] > 0, s[2] > 0, s[3] > 0, int(s[4]), int(s[5]))
