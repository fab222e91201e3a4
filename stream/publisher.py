"""Publishing apart from training: the newest weights, handed from the training thread to the
publishing thread (stream/trainer.py).

A training step takes a few hundred milliseconds on a CPU; if publishing waited for it, every
vector behind a step would wait too (measured: freshness p99 15.5 s at 2,000 events/s). So the
trainer publishes from a thread of its own, with an inference copy of the serving model that the
training thread replaces after every optimizer step (as serving parameter servers are
synchronised in Monolith and Ekko): a vector is never behind a step in progress, and at most one
step behind the newest weights. Each vector is stamped with the version of the copy it came from.
"""

from __future__ import annotations

import threading
from typing import Callable

from tgastream.model.online import OnlineLearner


class LatestModel:
    """The newest inference copy of the serving model and its version (thread-safe hand-over)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._model: OnlineLearner | None = None
        self.swaps = 0  # copies put so far

    def put(self, model: OnlineLearner) -> None:
        """Training thread, after a step: the copy to publish with from now on."""
        with self._lock:
            self._model = model
            self.swaps += 1

    def get(self) -> OnlineLearner:
        """Publishing thread, at the start of a batch: the newest copy (kept for the batch)."""
        with self._lock:
            if self._model is None:
                raise RuntimeError("no model to publish with yet")
            return self._model


class PublishingThread(threading.Thread):
    """Runs ``body`` (the publishing loop) once; an exception it raises is kept for the training
    thread to raise again (:meth:`check`), so a publishing failure stops the trainer."""

    def __init__(self, body: Callable[[], None]) -> None:
        super().__init__(name="tgastream-publisher", daemon=True)
        self._body = body
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._body()
        except BaseException as exc:  # re-raised in the training thread
            self.error = exc

    def check(self) -> None:
        if self.error is not None:
            raise RuntimeError("the publishing thread failed") from self.error
