"""Faust plumbing that hands whole fetched batches of chosen topics to a handler.

faust delivers every record through ``Consumer._drain_messages`` → ``Conductor.on_message`` →
a channel queue → the stream iterator: several tasks, futures and awaits per record, which is
faust's ceiling (the bare ``stream.take`` agent of ``tgastream bench stream``). This module keeps
everything else of faust — app, group membership, partition assignment, table recovery from
changelogs, standbys, commits — and changes only the last step for the topics that have a batch
handler: the records aiokafka fetched for them are taken out of the fetch result and given, per
partition and as raw aiokafka records, to the handler. Other topics (changelogs, other agents)
still flow through faust as usual. Handlers are declared on the app (``app.batch_handlers``,
topic → handler) before it starts, so no record can slip past them.

The faust contracts a batch handler must keep, and how:

- offsets are committed only when acknowledged: the handler acknowledges ranges with
  :meth:`BatchConsumer.ack_through` once their effects are durable;
- a rebalance must not revoke a partition while its work is unfinished: :meth:`hold` registers an
  in-flight marker in the consumer's unacked set, so faust's revocation (``wait_empty``) waits
  until :meth:`release`;
- acknowledgements do not outlive a revocation: faust forgets every revoked partition's acked
  and committed offsets and, when it gets the partition back, re-delivers from the group's
  committed offset; :attr:`BatchConsumer.revocations` counts revocations so the handler can drop
  what it remembered about acknowledging them (else it would resume acking past a gap that faust
  never commits over, and the group's offset would stay behind for good);
- flow control: batches are only handed over while the consumer's flow is active and the
  generation has not changed since the fetch (during a rebalance they are dropped, then
  re-fetched from the committed offsets, as faust does).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from time import monotonic
from typing import Any, Awaitable, Callable, Mapping, Optional, Sequence, Set, Tuple

from aiokafka.client import ConnectionGroup
from aiokafka.conn import CloseReason
from faust.transport.drivers import aiokafka as aiokafka_driver
from faust.types import TP
from mode.utils.futures import notify

log = logging.getLogger("tgastream.worker")

BatchHandler = Callable[[Mapping[TP, Sequence[Any]]], Awaitable[None]]
"""Receives {topic partition: [aiokafka ConsumerRecord, ...]} in offset order."""


@dataclass(eq=False)
class InFlight:
    """Stands for unfinished batch work in faust's set of unacked messages (weakly referenced)."""

    label: str
    acked: bool = False
    refcount: int = 1

    def __repr__(self) -> str:
        return f"<in-flight batch work: {self.label}>"


class BatchConsumer(aiokafka_driver.Consumer):
    """faust's aiokafka consumer, plus batch delivery of registered topics."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_flight: InFlight | None = None
        self._join_aborted = False  # a stop failed a pending join (logged once)
        self.revocations = 0  # times partitions were revoked (every rebalance, under eager assignment)
        self.assignments = 0  # rebalances that completed with an assignment (possibly empty) for this member
        self.fetched_at = monotonic()  # last fetch that returned records, or the last assignment
        self._revoked_unassigned = False  # partitions revoked, the next assignment not yet here

    @property
    def _batch_handlers(self) -> Mapping[str, BatchHandler]:
        """Topic → handler, declared on the app before it starts (``app.batch_handlers``)."""
        return getattr(self.app, "batch_handlers", {})

    async def _wait_next_records(self, timeout: float) -> Tuple[Optional[dict], Optional[Set[TP]]]:
        records, active = await super()._wait_next_records(timeout)
        if records:
            self.fetched_at = monotonic()
        if records and self._batch_handlers:
            mine = {tp: recs for tp, recs in records.items() if tp.topic in self._batch_handlers}
            if mine:
                records = {tp: recs for tp, recs in records.items() if tp not in mine}
                await self._deliver(mine, active)
        return records, active

    async def _deliver(self, batch: dict[TP, list], active: Optional[Set[TP]]) -> None:
        generation = self.app.consumer_generation_id
        if not self.flow_active:
            return  # rebalancing: getmany seeks back to the committed offsets, records come again
        ready = {tp: recs for tp, recs in batch.items()
                 if recs and (active is None or tp in active or tp in self._buffered_partitions)}
        if not ready:
            return
        monitor = self.app.monitor
        now = monotonic()
        for tp in ready:
            monitor.track_tp_end_offset(tp, self.highwater(tp))
            monitor.stream_inbound_time[tp] = now
        by_topic: dict[str, dict[TP, list]] = {}
        for tp, recs in ready.items():
            by_topic.setdefault(tp.topic, {})[tp] = recs
        for topic, part in by_topic.items():
            if self.app.consumer_generation_id != generation or not self.flow_active:
                return
            await self._batch_handlers[topic](part)
            for tp, recs in part.items():
                self._read_offset[tp] = recs[-1].offset

    async def on_partitions_revoked(self, revoked: Set[TP]) -> None:
        self._revoked_unassigned = True
        self.revocations += 1  # before faust drops its bookkeeping of the revoked partitions
        await super().on_partitions_revoked(revoked)

    async def on_partitions_assigned(self, assigned: Set[TP], generation_id: int = 0) -> None:
        self._revoked_unassigned = False
        self.assignments += 1
        self.fetched_at = monotonic()  # recovery may take a while before the first fetch
        log.info("assigned %d partitions (group generation %d): %s", len(assigned), generation_id,
                 ", ".join(sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned)) or "none")
        await super().on_partitions_assigned(assigned, generation_id)

    def resume_flow(self) -> None:
        """Resume fetching, unless partitions were revoked and the next assignment is not here yet.

        faust's recovery of an assignment is interrupted only when the *next assignment* arrives
        (``Recovery.signal_recovery_start``), not by the revocation before it: a recovery that was
        still running when the group began to rebalance goes on through the revocation and the join
        (seconds on Tansu) and, when it completes, resumes the flow the revocation stopped. With the
        flow open, the next assignment's partitions turn active (``Consumer.on_partitions_assigned``)
        and a fetch can hand over their records before their state is recovered, or return records
        of partitions paused meanwhile, which faust drops after aiokafka has moved past them (a
        changelog read that loses records leaves recovery waiting for them for good). So the flow
        stays stopped until the next assignment's own recovery resumes it."""
        if self._revoked_unassigned:
            log.info("flow kept stopped: a recovery of the revoked assignment completed during the rebalance")
            return
        super().resume_flow()

    # -- stall diagnosis --------------------------------------------------------------------

    def batch_positions(self) -> dict[TP, int]:
        """The next offset this consumer hands over, per assigned partition of a batch topic ({}
        while nothing is assigned): past the last record delivered, never below the commit."""
        try:
            assigned = self.assignment()
        except Exception:  # not started yet, or stopped
            return {}
        out = {}
        for tp in assigned:
            if tp.topic in self._batch_handlers:
                read, committed = self._read_offset.get(tp), self._committed_offset.get(tp)
                out[tp] = max(read + 1 if read is not None else 0, committed or 0)
        return out

    def describe_state(self) -> str:
        """What decides whether records are fetched and handed over, faust's and aiokafka's side,
        one item a line (read-only; for a worker that holds partitions and consumes nothing)."""
        lines: list[str] = []

        def item(name: str, value: Callable[[], Any]) -> None:
            try:
                lines.append(f"{name}: {value()}")
            except Exception as exc:  # a diagnosis must not fail: say what could not be read
                lines.append(f"{name}: <{exc!r}>")

        app = self.app
        item("flow active / can resume", lambda: (self.flow_active, self.can_resume_flow.is_set()))
        item("faust active partitions", lambda: sorted(self._active_partitions))
        item("faust paused partitions", lambda: sorted(self._paused_partitions))
        item("app rebalancing / in recovery / generation",
             lambda: (app.rebalancing, app.in_recovery, app.consumer_generation_id))
        item("unacked (in flight)", lambda: len(self._unacked_messages))
        item("faust fetcher task", lambda: _tasks_state(app._fetcher))
        item("faust recovery tasks", lambda: _tasks_state(app.tables.recovery))
        kafka = getattr(getattr(self, "_thread", None), "_consumer", None)
        if kafka is None:
            lines.append("aiokafka consumer: not started")
            return "\n".join(lines)
        coordinator, fetcher, subscription = kafka._coordinator, kafka._fetcher, kafka._subscription
        item("group generation / member", lambda: (coordinator.generation, coordinator.member_id))
        item("group error waiting for the consumer to read it", lambda: coordinator._pending_exception)
        for name in ("_coordination_task", "_heartbeat_task", "_commit_refresh_task"):
            item(f"aiokafka {name.strip('_')}", lambda name=name: _task_state(getattr(coordinator, name)))
        item("aiokafka fetch routine", lambda: _task_state(fetcher._fetch_task))
        item("reassignment in progress", lambda: subscription.reassignment_in_progress)
        item("fetches in flight to nodes / pending fetch tasks", lambda: (sorted(fetcher._in_flight),
                                                                       len(fetcher._pending_tasks)))
        item("fetched, not yet handed over", lambda: sorted(f"{tp.topic}[{tp.partition}]" for tp in fetcher._records))
        assignment = subscription.subscription.assignment if subscription.subscription else None
        for tp in sorted(assignment.tps if assignment is not None else ()):
            item(f"  {tp.topic}[{tp.partition}]", lambda tp=tp: _tp_state(assignment.state_value(tp)))
        return "\n".join(lines)

    # -- stopping ---------------------------------------------------------------------------

    def abort_join_if_closing(self) -> None:
        """Fail the group coordinator's pending join once it is closing (thread-safe: the check and
        the close run together on the consumer thread's loop).

        aiokafka's ``GroupCoordinator.close`` waits for its coordination task, which may be waiting
        on a JoinGroup/SyncGroup that Tansu holds until a departed member's session times out (10 s
        and more), so a stop during a join hangs past any deadline. Closing the coordinator's
        connections fails those requests and the task, seeing ``close`` was called, ends. It acts
        only while closing *and* joining (no heartbeat task: aiokafka stops it for a join), so a
        running member is never made to rejoin and a healthy stop keeps its heartbeat. The cost: a
        member stopped mid-join finds the coordinator marked dead and sends no LeaveGroup; the group
        drops it when its session times out. Call it again until the stop ends: a join may start
        on a fresh connection after a close (aiokafka does not check ``closing`` between steps).
        """
        thread = getattr(self, "_thread", None)
        loop = getattr(thread, "thread_loop", None)
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self._abort_join, thread)
        except RuntimeError:  # the loop closed meanwhile
            pass

    def _abort_join(self, thread: Any) -> None:
        """On the consumer thread's loop: see :meth:`abort_join_if_closing`."""
        kafka = getattr(thread, "_consumer", None)
        coordinator = getattr(kafka, "_coordinator", None)
        closing = getattr(coordinator, "_closing", None)
        task = getattr(coordinator, "_coordination_task", None)
        heartbeat = getattr(coordinator, "_heartbeat_task", None)
        if closing is None or not closing.done() or task is None or task.done():
            return  # not closing yet, or nothing waits
        if heartbeat is not None and not heartbeat.done():
            return  # a member in good standing, finishing its last steps
        conns = [conn for (_, group), conn in list(kafka._client._conns.items())
                 if group == ConnectionGroup.COORDINATION]
        for conn in conns:
            conn.close(reason=CloseReason.SHUTDOWN)
        if conns and not self._join_aborted:
            self._join_aborted = True
            log.info("stopping during a group join: failed its pending requests")

    # -- acknowledgements -------------------------------------------------------------------

    def committed_offset(self, tp: TP) -> int | None:
        """Next offset to read per the last commit (None when unknown or 0)."""
        return self._committed_offset.get(tp)

    def ack_through(self, tp: TP, first: int, last: int) -> None:
        """Acknowledge every offset in [first, last]: they may be committed with the next commit."""
        committed = self._committed_offset[tp]
        lo = first if committed is None else max(first, committed)
        if last < lo:
            return
        acked_index = self._acked_index[tp]
        new = [o for o in range(lo, last + 1) if o not in acked_index]
        acked_index.update(new)
        self._acked[tp].extend(new)
        self._n_acked += len(new)
        notify(self._waiting_for_ack)

    # -- in-flight guard --------------------------------------------------------------------

    def hold(self, label: str) -> None:
        """Unfinished batch work exists: a revocation must wait for :meth:`release`."""
        if self._in_flight is None:
            self._in_flight = InFlight(label)
            self._unacked_messages.add(self._in_flight)  # type: ignore[arg-type]

    def release(self) -> None:
        marker, self._in_flight = self._in_flight, None
        if marker is not None:
            marker.acked = True
            self._unacked_messages.discard(marker)  # type: ignore[arg-type]
            notify(self._waiting_for_ack)


def _task_state(task: Any) -> str:
    if task is None:
        return "none"
    if not task.done():
        return "running"
    if task.cancelled():
        return "cancelled"
    return f"ended ({task.exception()!r})" if task.exception() is not None else "ended"


def _tasks_state(service: Any) -> str:
    """A mode service's own tasks (its ``@Service.task`` coroutines), by name."""
    futures = getattr(service, "_futures", ())
    names = [getattr(getattr(f, "__wrapped__", None), "__qualname__", None) or repr(f)[:60] for f in futures]
    state = "started" if service._started.is_set() else "not started"
    return f"{state}, stopped={service._stopped.is_set()}, crashed={service._crashed.is_set()}, tasks running: " + (
        ", ".join(sorted(n.rsplit(".", 1)[-1] for f, n in zip(futures, names) if not f.done())) or "none")


def _tp_state(state: Any) -> str:
    position = state._position if state.has_valid_position else None
    return (f"position {position}, awaiting reset {state.awaiting_reset}, paused {state.paused}, "
            f"highwater {state.highwater}, committed futures {len(state._committed_futs)}")


class BatchTransport(aiokafka_driver.Transport):
    """The aiokafka transport with :class:`BatchConsumer` as its consumer."""

    Consumer = BatchConsumer
