"""A worker stuck after a rebalance (the chaos test once saw one hold two partitions for two
minutes and fetch nothing, no other worker taking them over):

- whatever leaves its assigned partitions unfetched while records wait on them, the worker says
  what its consumer waits on, leaves the group, joins again and consumes the rest (the stall is
  made the way faust can leave one: source partitions paused in faust and never resumed);
- a recovery of the previous assignment that completes during a rebalance cannot reopen the
  consumer's flow before the next assignment has been recovered (one way to get there)."""

from __future__ import annotations

import asyncio
import logging
import signal
import time

from tgastream.stream.app import StreamWorker
from tgastream.stream.replay import ReplayConfig, make_producer, replay_file, send_watermarks
from tgastream.stream.synth import SynthConfig, write_file
from tgastream.stream.worker import WorkerConfig, run_worker
from tests.worker_util import committed_offsets, start_worker

STALL_S = 3.0


def _ends(settings) -> dict[int, int]:
    """Next offset after the last record of each partition of the events topic."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=settings.bootstrap, enable_auto_commit=False)
    try:
        tps = [TopicPartition(settings.events_topic, p) for p in range(settings.partitions)]
        return {tp.partition: end for tp, end in consumer.end_offsets(tps).items()}
    finally:
        consumer.close()


def _all_committed(settings, ends: dict[int, int]) -> bool:
    # Tansu's end offset can be short by a batch (DESIGN.md §7): one record per send below keeps it exact
    done = committed_offsets(settings)
    return all((done.get(p) or 0) >= end for p, end in ends.items())


def test_a_worker_whose_partitions_stall_joins_again_and_consumes_the_rest(topic_settings, tmp_path, caplog):
    settings = topic_settings
    path = tmp_path / "log.csv"
    write_file(SynthConfig(users=30, events=400, seed=3, days=1.0), path)
    replay_file(settings.bootstrap, settings, ReplayConfig(path=path), progress=False)
    started: list[StreamWorker] = []

    def on_started(worker: StreamWorker) -> None:
        started.append(worker)
        if len(started) == 1:  # the first incarnation stops fetching its source partitions for good
            consumer = worker.consumer
            consumer.pause_partitions({tp for tp in consumer.assignment() if tp.topic == settings.events_topic})

    async def main() -> None:
        options = WorkerConfig(data_dir=tmp_path / "w", progress_s=0.0, serve_metrics=False,
                               generation_check_s=0.0, stall_timeout_s=STALL_S, stop_timeout_s=30.0)
        worker = asyncio.ensure_future(run_worker(settings, options, on_started=on_started))
        deadline = time.monotonic() + 120
        while not started:
            assert not worker.done(), worker.result()
            assert time.monotonic() < deadline, "the worker did not start"
            await asyncio.sleep(0.2)
        # records arrive after the pause: whatever the first incarnation read before it, these wait
        producer = make_producer(settings.bootstrap, linger_ms=0)
        send_watermarks(producer, settings.events_topic, 0.0)
        producer.flush()
        producer.close()
        ends = await asyncio.to_thread(_ends, settings)
        while not await asyncio.to_thread(_all_committed, settings, ends):
            assert not worker.done(), worker.result()
            assert time.monotonic() < deadline, (f"records not committed: {committed_offsets(settings)} of {ends} "
                                                 f"({len(started)} incarnation(s) started)")
            await asyncio.sleep(0.5)
        signal.raise_signal(signal.SIGTERM)  # run_worker's own handler: a graceful stop
        await asyncio.wait_for(worker, 60)

    with caplog.at_level(logging.WARNING, logger="tgastream.worker"):
        asyncio.run(main())
    assert len(started) == 2  # the stalled incarnation left, a second one joined and consumed the rest
    stalls = [r.getMessage() for r in caplog.records if r.getMessage().startswith("worker stalled")]
    assert len(stalls) == 1, stalls
    assert f"nothing fetched for" in stalls[0] and settings.events_topic in stalls[0]
    assert "faust paused partitions" in stalls[0]  # the consumer's state names what holds it


def test_a_recovery_completing_during_a_rebalance_cannot_reopen_the_flow(topic_settings, tmp_path):
    """Between a revocation and the next assignment the flow stays stopped, whoever resumes it
    (faust's recovery of the revoked assignment does, when it outlives the revocation); the next
    assignment's recovery opens it, and the worker consumes on."""
    settings = topic_settings
    path = tmp_path / "log.csv"
    write_file(SynthConfig(users=30, events=200, seed=4, days=1.0), path)
    replay_file(settings.bootstrap, settings, ReplayConfig(path=path), progress=False)
    started: list[StreamWorker] = []
    seen: dict[str, bool] = {}

    async def main() -> None:
        options = WorkerConfig(data_dir=tmp_path / "w", progress_s=0.0, serve_metrics=False,
                               generation_check_s=0.0, stop_timeout_s=30.0)
        worker = asyncio.ensure_future(run_worker(settings, options, on_started=started.append))
        deadline = time.monotonic() + 150
        while not started or not started[0].consumer.flow_active:
            assert not worker.done(), worker.result()
            assert time.monotonic() < deadline, "the worker did not start"
            await asyncio.sleep(0.2)
        consumer = started[0].consumer
        revoked, assigned = consumer.revocations, consumer.assignments
        other = start_worker(settings, tmp_path / "other.log")  # joining makes the group rebalance
        try:
            while consumer.revocations == revoked:
                assert time.monotonic() < deadline, "no rebalance"
                await asyncio.sleep(0.02)
            # revoked, not yet assigned again (Tansu's join takes seconds): what a late recovery does
            assert consumer.assignments == assigned and not consumer.flow_active
            consumer.resume_flow()
            seen["open during the rebalance"] = consumer.flow_active
            while consumer.assignments == assigned or not consumer.flow_active:
                assert time.monotonic() < deadline, "the next assignment's recovery did not resume the flow"
                await asyncio.sleep(0.1)
            seen["open after the next assignment"] = consumer.flow_active
        finally:
            assert other.stop(60) == 0, other.log()
        signal.raise_signal(signal.SIGTERM)
        await asyncio.wait_for(worker, 60)

    asyncio.run(main())
    assert seen == {"open during the rebalance": False, "open after the next assignment": True}
