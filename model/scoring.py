"""Conversion scoring for the HTTP API from the trainer's newest checkpoint.

The API process loads the latest checkpoint read-only and reloads it when a newer one appears
(checked at most every ``reload_s``), so ``POST /v1/score`` follows the trainer.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from tgastream.model.online import IncompatibleCheckpoint, OnlineLearner
from tgastream.state.checkpoint import list_checkpoints, load_latest
from tgastream.state.graph import UserGraph
from tgastream.core.settings import Settings

log = logging.getLogger("tgastream.scoring")


class CheckpointScorer:
    """``scorer(context_bytes, [(item, category)]) -> [P(buy)]`` backed by the newest checkpoint."""

    def __init__(self, settings: Settings, reload_s: float = 10.0) -> None:
        self.settings = settings.replace(device="cpu") if settings.device == "auto" else settings
        self.dir = Path(settings.data_dir) / "checkpoints"
        self.reload_s = reload_s
        self.loaded: Path | None = None
        self.learner: OnlineLearner | None = None
        self._checked = 0.0
        self._maybe_reload()

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if self.learner is not None and now - self._checked < self.reload_s:
            return
        self._checked = now
        newest = (list_checkpoints(self.dir) or [None])[-1]
        if newest is None or newest == self.loaded:
            return
        ck = load_latest(self.dir)
        if ck is None:
            return
        shape = ck.get("settings", {})
        learner = OnlineLearner(self.settings.replace(**{k: v for k, v in shape.items() if k in ("dim", "layers", "heads")}))
        try:
            learner.load_state_dict(ck["learner"])
        except IncompatibleCheckpoint as exc:
            if self.learner is None:
                raise IncompatibleCheckpoint(f"checkpoint in {self.dir} {exc}") from None
            log.warning("keeping the loaded model: checkpoint %s %s", newest, exc)  # a running API stays up
            self.loaded = newest
            return
        self.learner, self.loaded = learner, newest

    @property
    def ready(self) -> bool:
        self._maybe_reload()
        return self.learner is not None

    def __call__(self, context: bytes | None, candidates: list[tuple[str, str]]) -> list[float]:
        self._maybe_reload()
        if self.learner is None:
            raise RuntimeError("no checkpoint loaded")
        graph = UserGraph.from_bytes(context) if context else UserGraph(self.settings.sample_len)
        return self.learner.conversion_proba(graph, candidates)


def load_scorer(settings: Settings) -> CheckpointScorer:
    return CheckpointScorer(settings)
