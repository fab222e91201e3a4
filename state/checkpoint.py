"""Atomic checkpoint files: write a temp file, fsync it, rename over, fsync the directory.

A reader never sees a half-written checkpoint: ``latest`` returns the newest file that loads,
skipping (and reporting) any that do not. Files are ``ckpt-<step:012d>.pt``; the newest ``keep``
are kept.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path
from typing import Any, Callable

import torch

_NAME = re.compile(r"^ckpt-(\d{12})\.pt$")


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


def save_checkpoint(directory: Path, step: int, state: dict[str, Any], keep: int = 3) -> Path:
    """Write ``state`` (torch-serialisable) as checkpoint ``step`` and prune older ones."""
    buf = io.BytesIO()
    torch.save({"step": step, **state}, buf)
    path = Path(directory) / f"ckpt-{step:012d}.pt"
    write_atomic(path, buf.getvalue())
    for old in list_checkpoints(directory)[:-keep]:
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
            return torch.load(path, map_location=map_location, weights_only=False)
        except Exception as exc:  # a truncated or corrupt file: fall back to an older one
            if on_bad:
                on_bad(path, exc)
    return None
