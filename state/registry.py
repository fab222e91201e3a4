"""The model registry: every checkpoint is a model version with a parent, metrics and a status.

A JSON manifest (``registry.json``) beside the checkpoints, rewritten atomically
(:func:`state.checkpoint.write_atomic`), so the trainer, ``tgastream models`` / ``rollback`` and
the API read one consistent file. Why a manifest and not fields inside the checkpoints: statuses
change after a checkpoint is written (a candidate becomes good once it held up over a window, or
bad when the guard trips), and checkpoint files are immutable.

- ``version``: the learner's version (optimizer steps) when the checkpoint was written; unique and
  increasing, also across rollbacks (the learner's counter never goes back).
- ``parent``: the version this one descends from: the previous checkpoint, or the good version a
  rollback restored.
- ``status``: ``candidate`` (new), ``good`` (held up over the guard's window), ``bad`` (the guard
  tripped while it was live) or ``pinned`` (chosen by hand with ``tgastream rollback --to``).
- ``serving``: what the trainer publishes from now: ``{"state": "live" | "pinned" |
  "rolled_back", "version": N}``; the API shows it as ``model_state``.

Writers (the trainer, ``tgastream rollback``) change it only inside :func:`editing`: load, change
and save under an exclusive lock on ``registry.lock``, so neither overwrites a change the other
made between its read and its write (a pin by hand lost to the trainer's next save). Readers need
no lock: every save replaces the file atomically.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from tgastream.state.checkpoint import write_atomic

MANIFEST = "registry.json"
LOCK = "registry.lock"
LOCK_TIMEOUT_S = 30.0
STATUSES = ("candidate", "good", "bad", "pinned")
SERVING_STATES = ("live", "pinned", "rolled_back")
MAX_ENTRIES = 200  # versions whose checkpoint file is gone are forgotten beyond this many entries


class RegistryError(ValueError):
    """A registry operation that cannot be done (unknown version, version going backwards); one line."""


@dataclass
class ModelVersion:
    """One checkpoint as a model version."""

    version: int
    parent: int | None
    step: int
    file: str  # checkpoint file name in the directory
    created: float
    status: str = "candidate"
    metrics: dict = field(default_factory=dict)  # online metrics at save time


@dataclass
class Registry:
    """The manifest of one checkpoint directory; :meth:`load`, change, :meth:`save`."""

    directory: Path
    versions: list[ModelVersion] = field(default_factory=list)  # oldest first
    serving: dict = field(default_factory=lambda: {"state": "live", "version": None})

    @classmethod
    def load(cls, directory: Path) -> "Registry":
        """The registry of ``directory`` (empty when it has none yet)."""
        directory = Path(directory)
        path = directory / MANIFEST
        if not path.exists():
            return cls(directory)
        try:
            data = json.loads(path.read_text())
            versions = [ModelVersion(**v) for v in data.get("versions", [])]
        except (ValueError, TypeError) as exc:
            raise RegistryError(f"{path} is not a readable model registry ({exc})") from None
        return cls(directory, versions, data.get("serving") or {"state": "live", "version": None})

    def to_json(self) -> str:
        return json.dumps({"versions": [asdict(v) for v in self.versions], "serving": self.serving}, indent=1) + "\n"

    def save(self) -> None:
        write_atomic(self.directory / MANIFEST, self.to_json().encode())

    # -- queries ---------------------------------------------------------------------------

    def get(self, version: int) -> ModelVersion:
        for v in self.versions:
            if v.version == version:
                return v
        raise RegistryError(f"no model version {version} in {self.directory / MANIFEST}")

    def exists(self, v: ModelVersion) -> bool:
        return (self.directory / v.file).exists()

    def last_good(self) -> ModelVersion | None:
        """The newest version marked good or pinned whose checkpoint still exists."""
        for v in reversed(self.versions):
            if v.status in ("good", "pinned") and self.exists(v):
                return v
        return None

    def pinned(self) -> ModelVersion | None:
        return next((v for v in reversed(self.versions) if v.status == "pinned" and self.exists(v)), None)

    def newest(self) -> ModelVersion | None:
        return self.versions[-1] if self.versions else None

    def protected_files(self) -> set[str]:
        """Checkpoint files retention must keep: the last good one and a pinned one."""
        keep = {v.file for v in (self.last_good(), self.pinned()) if v is not None}
        if self.serving.get("version") is not None:
            keep |= {v.file for v in self.versions if v.version == self.serving["version"]}
        return keep

    # -- changes ---------------------------------------------------------------------------

    def add(self, version: int, parent: int | None, step: int, file: str, metrics: dict) -> ModelVersion:
        """Record a new checkpoint as a candidate. The same version again (a checkpoint written
        twice without a step between) updates its entry; an older one is refused."""
        newest = self.newest()
        if newest is not None and version == newest.version and file == newest.file:
            newest.metrics, newest.created = metrics, time.time()
            return newest
        if newest is not None and version <= newest.version:
            raise RegistryError(f"model version {version} is not newer than {newest.version}")
        entry = ModelVersion(version, parent, step, file, time.time(), "candidate", metrics)
        self.versions.append(entry)
        self._forget_deleted()
        return entry

    def mark(self, version: int, status: str) -> ModelVersion:
        if status not in STATUSES:
            raise RegistryError(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
        v = self.get(version)
        v.status = status
        return v

    def pin(self, version: int) -> ModelVersion:
        """Pin ``version`` by hand (the trainer rolls back to it at its next step); a version
        pinned before goes back to good."""
        v = self.get(version)
        if not self.exists(v):
            raise RegistryError(f"model version {version}: its checkpoint {v.file} was deleted")
        for other in self.versions:
            if other.status == "pinned" and other is not v:
                other.status = "good"
        v.status = "pinned"
        return v

    def set_serving(self, state: str, version: int | None) -> None:
        if state not in SERVING_STATES:
            raise RegistryError(f"serving state must be one of {', '.join(SERVING_STATES)}, got {state!r}")
        self.serving = {"state": state, "version": version, "since": time.time()}

    def _forget_deleted(self) -> None:
        """Keep the manifest bounded: drop the oldest entries whose checkpoint is gone."""
        extra = len(self.versions) - MAX_ENTRIES
        if extra <= 0:
            return
        gone = [v for v in self.versions if not self.exists(v)][:extra]
        self.versions = [v for v in self.versions if v not in gone]


@contextmanager
def locked(directory: Path, timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold the registry's exclusive lock (an advisory ``flock`` on ``registry.lock``; released
    when the holder exits, also when it dies). Not re-entrant: one holder per process at a time."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise RegistryError(f"{directory / MANIFEST} stayed locked by another process for "
                                        f"{timeout_s:.0f} s") from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


@contextmanager
def editing(directory: Path, timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[Registry]:
    """The registry of ``directory``, loaded under its lock; saved (if changed) when the block
    ends without an exception. Every writer changes the registry this way."""
    with locked(directory, timeout_s):
        reg = Registry.load(directory)
        before = reg.to_json()
        yield reg
        if reg.to_json() != before:
            reg.save()


def serving_state(directory: Path) -> dict:
    """What the API shows: ``{"state", "version"}`` from the registry (``live`` without one)."""
    try:
        return dict(Registry.load(directory).serving)
    except RegistryError:
        return {"state": "live", "version": None}
