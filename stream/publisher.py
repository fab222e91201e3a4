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

import logging
import os
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from tgastream.model.online import OnlineLearner
from tgastream.state.serving import bought_key, bought_value, context_key, item_category_key, item_key, user_key

log = logging.getLogger("tgastream.trainer")


def send_record(producer, topic: str, key: bytes, value: bytes | None, attempts: int = 60,
                backoff_s: float = 0.5) -> None:
    """``producer.send``, again while the topic's metadata is in flux (a broker restart: Tansu
    re-creates topics empty, and kafka-python's partitioner then fails on the partitions its
    metadata listed a moment before). Any other error, or one lasting ``attempts``, stands."""
    for attempt in range(attempts):
        try:
            producer.send(topic, key=key, value=value)
            return
        except (TypeError, ValueError, ZeroDivisionError) as exc:
            if not _metadata_race(exc) or attempt == attempts - 1:
                raise
            if attempt == 0:
                log.warning("topic %s has no partitions right now (%s; broker restarting?); sending again",
                            topic, exc)
            time.sleep(backoff_s)


def _metadata_race(exc: BaseException) -> bool:
    """Whether ``exc`` is kafka-python losing a topic's partitions mid-send: raised inside its
    partitioner (partitions None or none at all), or its ``send`` finding no partition assigned
    (the topic gone between its metadata check and the partitioner)."""
    if isinstance(exc, ValueError) and str(exc).startswith("Partitioner did not assign a partition"):
        return True
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and f"kafka{os.sep}partitioner" in tb.tb_frame.f_code.co_filename


def send_vectors(producer, topic: str, users: dict, items: dict, bought: dict | None = None,
                 contexts: dict[str, bytes] | None = None, categories: dict[str, str] | None = None) -> None:
    """A batch's records on the embeddings topic (the changelog of every API replica's serving
    table): user and item vectors (:class:`state.serving.VectorRecord`), bought lists, contexts
    and item categories, each under its key."""
    for u, rec in users.items():
        send_record(producer, topic, user_key(u), rec.to_bytes())
    for i, rec in items.items():
        send_record(producer, topic, item_key(i), rec.to_bytes())
    for u, b in (bought or {}).items():
        send_record(producer, topic, bought_key(u), bought_value(b))
    for u, c in (contexts or {}).items():
        send_record(producer, topic, context_key(u), c)
    for i, cat in (categories or {}).items():
        send_record(producer, topic, item_category_key(i), cat.encode())


def send_tombstones(producer, topic: str, item_ids: list[str]) -> None:
    """Deletions on the embeddings topic: each item's vector and category record with no value
    (every API replica removes the item; compaction drops the keys)."""
    for i in item_ids:
        send_record(producer, topic, item_key(i), None)
        send_record(producer, topic, item_category_key(i), None)


class LatestModel:
    """The newest inference copy of the serving model and its version (thread-safe hand-over).

    Two copies take turns: the training thread refreshes the one not published from (its
    tensors copied in place: ~1 ms, where building a copy costs ~30 ms of Python a step) and
    swaps it in; a copy the publishing thread still holds (:meth:`use`) is never written, a new
    one is built instead, as when the tables' shapes changed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._current: OnlineLearner | None = None
        self._spare: OnlineLearner | None = None
        self._in_use: dict[int, int] = {}  # id(copy) → holders
        self._origin: dict[int, int] = {}  # id(copy) → id(the learner its weights were copied from)
        self.swaps = 0  # copies put so far
        self.rebuilt = 0  # of them built anew (not refreshed in place)

    def put(self, source: OnlineLearner, version: int) -> None:
        """Training thread, after a step: publish from ``source``'s weights now (as ``version``)."""
        with self._lock:
            spare = self._spare if self._spare is not None and not self._in_use.get(id(self._spare)) else None
            self._spare = None
        twin = _refreshed(spare, source, version)  # (``spare`` is visible to no one meanwhile)
        if twin is not spare:
            self.rebuilt += 1
        with self._lock:
            self._spare, self._current = self._current, twin
            self._origin[id(twin)] = id(source)
            self._prune()
            self.swaps += 1

    def _prune(self) -> None:
        """Forget the origins of copies that are neither current, spare nor held (under the lock)."""
        keep = {id(c) for c in (self._current, self._spare) if c is not None}
        keep |= {k for k, n in self._in_use.items() if n}
        self._origin = {k: v for k, v in self._origin.items() if k in keep}

    @contextmanager
    def use(self) -> Iterator[OnlineLearner]:
        """Publishing thread: the newest copy, held (never refreshed under it) for a batch."""
        with self._lock:
            if self._current is None:
                raise RuntimeError("no model to publish with yet")
            twin = self._current
            self._in_use[id(twin)] = self._in_use.get(id(twin), 0) + 1
        try:
            yield twin
        finally:
            with self._lock:
                self._in_use[id(twin)] -= 1
                if not self._in_use[id(twin)]:
                    del self._in_use[id(twin)]
                    self._prune()

    def copied_from(self, twin: OnlineLearner, source: OnlineLearner) -> bool:
        """Whether ``twin`` (a copy from :meth:`use`) holds ``source``'s weights (not, say, the
        guard's good model's while rolled back)."""
        with self._lock:
            return self._origin.get(id(twin)) == id(source)

    def get(self) -> OnlineLearner:
        """The newest copy, not held (for reading its version)."""
        with self._lock:
            if self._current is None:
                raise RuntimeError("no model to publish with yet")
            return self._current


def _refreshed(spare: OnlineLearner | None, source: OnlineLearner, version: int) -> OnlineLearner:
    """``spare`` with ``source``'s weights copied in (same shapes), else a new inference copy."""
    if spare is not None and spare.rows is source.rows:
        mine, theirs = spare.model.state_dict(), source.model.state_dict()
        if mine.keys() == theirs.keys() and all(mine[k].shape == theirs[k].shape for k in mine):
            with torch.no_grad():
                for k, t in theirs.items():
                    mine[k].copy_(t)
            spare.model.cfg = source.model.cfg
            spare.version = version
            return spare
    return source.inference_copy(version)


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
