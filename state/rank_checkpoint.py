"""Checkpoints of data-parallel trainer ranks: each rank's own part beside the shared model file.

What every rank holds alike (model, optimizer, id maps) is written once, by rank 0, as the usual
``ckpt-<step>.pt`` (:mod:`state.checkpoint`), so the API and single-process tools read it as
before. What differs per rank (consumed offsets of its partitions, its re-delivery guard, its
trained-log length, replay reservoir, random states, counters) goes to
``ckpt-<step>.rank-<r>-of-<W>.pt``, written atomically by rank r *before* rank 0 writes the
model file, and rank 0 writes it only after every rank reported its part written. So a model
file with W parts beside it is a complete checkpoint, and a crash at any moment leaves either a
complete checkpoint or an older one (a part without its model file is ignored and pruned).
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import torch

from tgastream.state.checkpoint import list_checkpoints, load_checkpoint, write_atomic

_PART = re.compile(r"^ckpt-(\d{12})\.rank-(\d+)-of-(\d+)\.pt$")
_MODEL = re.compile(r"^ckpt-(\d{12})\.pt$")


def part_path(directory: Path, step: int, rank: int, world: int) -> Path:
    return Path(directory) / f"ckpt-{step:012d}.rank-{rank}-of-{world}.pt"


def save_part(directory: Path, step: int, rank: int, world: int, state: dict[str, Any]) -> Path:
    """Write rank ``rank``'s part of checkpoint ``step`` (atomic; plain data only)."""
    buf = io.BytesIO()
    torch.save({"step": step, "rank": rank, "world": world, **state}, buf)
    path = part_path(directory, step, rank, world)
    write_atomic(path, buf.getvalue())
    return path


def step_of(path: Path) -> int:
    m = _MODEL.match(path.name)
    if not m:
        raise ValueError(f"{path} is not a checkpoint file")
    return int(m.group(1))


def newest_loadable(directory: Path, rank: int, world: int) -> int:
    """The newest step whose model file and this rank's part both load; -1 when none does."""
    for model in reversed(list_checkpoints(directory)):
        step = step_of(model)
        part = part_path(directory, step, rank, world)
        if not part.exists():
            continue
        try:
            load_checkpoint(part)
            load_checkpoint(model)
        except Exception:  # truncated, corrupt or refused: an older one
            continue
        return step
    return -1


def load_step(directory: Path, step: int, rank: int, world: int,
              map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], dict[str, Any]]:
    """(model file, this rank's part) of checkpoint ``step``."""
    model = load_checkpoint(Path(directory) / f"ckpt-{step:012d}.pt", map_location)
    part = load_checkpoint(part_path(directory, step, rank, world), map_location)
    return model, part


def prune_parts(directory: Path, rank: int, current: int) -> None:
    """Remove this rank's parts of steps before ``current`` whose model file is gone (pruned by
    ``save_checkpoint``, which keeps the newest few and any protected one, e.g. the last good
    model, whose parts then stay too) or was never written (an incomplete checkpoint)."""
    directory = Path(directory)
    models = {step_of(m) for m in list_checkpoints(directory)}
    for p in directory.iterdir():
        m = _PART.match(p.name)
        if m and int(m.group(2)) == rank and int(m.group(1)) < current and int(m.group(1)) not in models:
            p.unlink(missing_ok=True)
