"""Conversion scoring for the HTTP API from the trainer's newest checkpoint.

The API process loads the model part of the latest checkpoint read-only (an
:class:`InferenceModel`: no optimizer, reservoir or metrics) and reloads it when a newer one
appears (checked at most every ``reload_s``), so ``POST /v1/score`` follows the trainer.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from tgastream.model.device import resolve_device
from tgastream.model.inference import IncompatibleCheckpoint, InferenceModel
from tgastream.state.checkpoint import list_checkpoints, load_latest
from tgastream.state.graph import UserGraph

log = logging.getLogger("tgastream.scoring")


class CheckpointScorer:
    """``scorer(context_bytes, [(item, category)]) -> [P(buy)]`` backed by the newest checkpoint
    in ``checkpoint_dir``; an empty context is a graph of ``sample_len`` nodes with none yet."""

    def __init__(self, checkpoint_dir: Path, device: str, sample_len: int, reload_s: float = 10.0) -> None:
        self.dir = Path(checkpoint_dir)
        self.device = resolve_device(device)
        self.sample_len = sample_len
        self.reload_s = reload_s
        self.loaded: Path | None = None
        self.model: InferenceModel | None = None
        self._checked = 0.0
        self._maybe_reload()

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if self.model is not None and now - self._checked < self.reload_s:
            return
        self._checked = now
        newest = (list_checkpoints(self.dir) or [None])[-1]
        if newest is None or newest == self.loaded:
            return
        ck = load_latest(self.dir)
        if ck is None:
            return
        try:
            model = InferenceModel.from_state(ck["learner"], self.device)
        except IncompatibleCheckpoint as exc:
            if self.model is None:
                raise IncompatibleCheckpoint(f"checkpoint in {self.dir} {exc}") from None
            log.warning("keeping the loaded model: checkpoint %s %s", newest, exc)  # a running API stays up
            self.loaded = newest
            return
        self.model, self.loaded = model, newest

    @property
    def ready(self) -> bool:
        self._maybe_reload()
        return self.model is not None

    def __call__(self, context: bytes | None, candidates: list[tuple[str, str]]) -> list[float]:
        self._maybe_reload()
        if self.model is None:
            raise RuntimeError("no checkpoint loaded")
        graph = UserGraph.from_bytes(context) if context else UserGraph(self.sample_len)
        return self.model.conversion_proba(graph, candidates)
