"""Atomic checkpoint files: write a temp file, fsync it, rename over, fsync the directory.

A reader never sees a half-written checkpoint: ``latest`` returns the newest file that loads,
skipping (and reporting) any that do not. Files are ``ckpt-<step:012d>.pt``; the newest ``keep``
are kept, plus any file the caller protects (the model registry's last good and pinned
checkpoints, state/registry.py).

Checkpoints hold plain data only (tensors, numbers, strings, bytes, lists, tuples, dicts) and are
loaded with ``torch.load(weights_only=True)``: a file that would need arbitrary unpickling (which
can run code) is refused, so write access to the checkpoint directory is not code execution in
the trainer or the API that read it.
"""

from __future__ import annotations

import io
import os
import pickle
import re
from pathlib import Path
from typing import Any, Callable

import torch

_NAME = re.compile(r"^ckpt-(\d{12})\.pt$")


class CheckpointRefused(ValueError):
    """A checkpoint file holds more than plain data (loading it could run code); it is not loaded."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves either the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def save_checkpoint(directory: Path, step: int, state: dict[str, Any], keep: int = 3,
                    protect: frozenset[str] | set[str] = frozenset()) -> Path:
    """Write ``state`` (torch-serialisable) as checkpoint ``step`` and prune older ones, except
    the file names in ``protect`` (the last good model must survive retention)."""
    buf = io.BytesIO()
    torch.save({"step": step, **state}, buf)
    path = Path(directory) / f"ckpt-{step:012d}.pt"
    write_atomic(path, buf.getvalue())
    for old in list_checkpoints(directory)[:-keep]:
        if old.name not in protect:
            old.unlink(missing_ok=True)
    return path


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoint files, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _NAME.match(p.name))


def load_latest(directory: Path, map_location: str | torch.device = "cpu",
                on_bad: Callable[[Path, Exception], None] | None = None) -> dict[str, Any] | None:
    """The newest checkpoint that loads, or None when there is none."""
    for path in reversed(list_checkpoints(directory)):
        try:
            return load_checkpoint(path, map_location)
        except Exception as exc:  # truncated, corrupt or refused: fall back to an older one
            if on_bad:
                on_bad(path, exc)
    return None


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """One checkpoint file, plain data only; :class:`CheckpointRefused` for anything else."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointRefused(f"{path} refused: it holds more than plain tensors and containers, "
                                f"and loading it could run code ({first[:200]})") from None
