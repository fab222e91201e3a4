"""A deadline on a graceful stop: a process asked to stop ends within it, broker or no broker.

A worker's or trainer's graceful stop talks to the broker (persist to the changelog, commit
offsets, flush vectors, leave the group). When the broker is gone or paused, that can hang for
minutes. Past the deadline the process exits at once: safe, because an offset is committed only
after what it covers is durable (DESIGN.md §7), so the next owner re-reads whatever was not, and
the per-user offset guard keeps the re-read from being applied twice.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Callable

log = logging.getLogger("tgastream.deadline")

EXIT_DEADLINE = 3
"""Exit status of a process whose graceful stop outlasted its deadline."""


class StopDeadline:
    """``with StopDeadline(8.0, "worker"): await graceful_stop()`` — exit the process if it hangs."""

    def __init__(self, seconds: float, what: str, exit_code: int = EXIT_DEADLINE,
                 on_expire: Callable[[], None] | None = None, why: str = "") -> None:
        self.seconds = seconds
        self.what = what
        self.exit_code = exit_code
        self.on_expire = on_expire  # a last diagnostic (where the stop hung), run before the exit
        self.why = why or ("Nothing past the last durable state was committed: its next owner re-reads the rest.")
        self._timer: threading.Timer | None = None

    def __enter__(self) -> "StopDeadline":
        if self.seconds > 0:
            self._timer = threading.Timer(self.seconds, self._expire)
            self._timer.daemon = True
            self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer.join(1.0)  # a cancelled timer's thread ends at once

    def _expire(self) -> None:
        log.error("%s: graceful stop outlasted its %.1f s deadline (broker not answering?); exiting now (status %d). %s",
                  self.what, self.seconds, self.exit_code, self.why)
        if self.on_expire is not None:
            try:
                self.on_expire()
            except Exception:  # a diagnostic must never keep the process from exiting
                log.exception("%s: diagnostic at the deadline failed", self.what)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # a closed pipe must not keep the process alive
                pass
        os._exit(self.exit_code)
