"""Which samples reached an optimizer step, by identity: an append-only file beside the checkpoints.

Each trained sample appends its identity (generation, source partition, offset, seq). A checkpoint
records the file's length; a restart truncates it back to that length, because the model that
learned the samples after it was lost and learns them again. So the file lists exactly the samples
the current model lineage was trained on, once each if nothing was trained twice: what a
verifier reads to prove it (and what `tgastream_trainer_samples_trained` counts).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Iterable

from tgastream.state.samples import Sample

_RECORD = struct.Struct("<IiqI")  # generation, source partition, source offset, seq

Identity = tuple[int, int, int, int]


class TrainedLog:
    """Append-only identities of trained samples (samples without an identity are not logged)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "ab")

    def append(self, samples: Iterable[Sample]) -> None:
        data = b"".join(_RECORD.pack(s.generation, s.partition, s.offset, s.seq) for s in samples if s.offset >= 0)
        if data:
            self._fh.write(data)

    def size(self) -> int:
        """Bytes written so far (flushed): what a checkpoint records."""
        self._fh.flush()
        return self._fh.tell()

    def truncate(self, size: int) -> None:
        """Forget what was appended after ``size`` bytes (a restart from the checkpoint that recorded it)."""
        self._fh.flush()
        os.truncate(self.path, min(size, self.path.stat().st_size))
        self._fh.seek(0, os.SEEK_END)

    def close(self) -> None:
        self._fh.close()


def read_trained(path: Path) -> list[Identity]:
    """Every identity in a trained log, in training order."""
    data = Path(path).read_bytes() if Path(path).exists() else b""
    usable = len(data) - len(data) % _RECORD.size  # a crash can cut the last record short
    return [_RECORD.unpack_from(data, off) for off in range(0, usable, _RECORD.size)]
