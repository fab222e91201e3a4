"""The SIGUSR1 task dump names where a stuck task waits, not only where it started."""

from __future__ import annotations

import asyncio
import time

from tgastream.stream.worker import await_chain
from tests.worker_util import start_worker


async def _innermost(event: asyncio.Event) -> None:
    await event.wait()


async def _middle(event: asyncio.Event) -> None:
    await _innermost(event)


def test_await_chain_reaches_the_innermost_coroutine_a_task_waits_in():
    async def main() -> list[str]:
        event = asyncio.Event()
        task = asyncio.create_task(_middle(event))
        await asyncio.sleep(0)  # let it suspend
        chain = await_chain(task)
        event.set()
        await task
        return chain

    chain = asyncio.run(main())
    names = [line.rsplit(" in ", 1)[1] for line in chain]
    assert names[:2] == ["_middle", "_innermost"]
    assert "wait" in names[2:]  # asyncio.Event.wait, below our own frames


def test_a_worker_without_an_assignment_joins_again_and_still_stops_on_sigterm(topic_settings, tmp_path):
    """A join timeout shorter than any real join: every start-up times out, logs what its tasks
    waited on and joins again (counted); SIGTERM during start-up still ends the worker cleanly."""
    # a stop deadline well above a graceful stop on a busy machine (parallel tests): exit 0 means graceful
    worker = start_worker(topic_settings, tmp_path / "worker.log", "--join-timeout-s", "1", "--stop-timeout-s", "25")
    try:
        worker.wait_up()
        worker.wait_total("tgastream_worker_join_retries_total", 2, timeout_s=60)
        assert worker.total("tgastream_events_applied_total") == 0
    finally:
        t0 = time.monotonic()
        code = worker.stop(30)
    assert code == 0, worker.log()
    assert time.monotonic() - t0 < 25.0
    log = worker.log_path.read_text(errors="replace")  # whole (log() is its tail)
    assert "joining again" in log
    assert "stream/app.py" in log and "in start" in log  # the task dump names where start-up waited
