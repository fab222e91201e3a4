"""A faust table whose storage is our :class:`~state.store.StateStore` (rocksdict, tuned, batched).

faust owns the table's lifecycle: it assigns the changelog partitions that go with the source
partitions a worker owns, recovers them from the changelog topic on start and after a rebalance
(:meth:`TableStore.apply_changelog_batch`, also used for standby replicas), and closes them when
they are revoked. The stream worker writes users through the same :class:`StateStore` in batches
and writes the changelog itself (:mod:`stream.pipeline`), so the per-key faust path
(``table[key] = value`` → one changelog send per key) is never used on the hot path.

The offset of the last changelog record a partition database holds is stored in it (internal key,
:data:`state.store.OFFSET_KEY`): a restart on the same disk replays the changelog only after it.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Optional, Set, Tuple

import faust
from faust.stores.base import SerializedStore
from faust.streams import current_event
from faust.types import TP, EventT

from tgastream.state.record import supersedes
from tgastream.state.store import INTERNAL_PREFIX, StateStore

PartitionsCallback = Callable[[Set[int]], None]


class TableStore(SerializedStore):
    """faust ``StoreT`` over a :class:`StateStore` (raw bytes keys and values)."""

    def __init__(self, url: Any, app: Any, table: Any, *, state: StateStore,
                 on_partitions_changed: PartitionsCallback, generation: int | None = None, **kwargs: Any) -> None:
        super().__init__(url, app, table, **kwargs)
        self.state_store = state
        self._on_partitions_changed = on_partitions_changed
        self.generation = generation  # of the source: a user's state of it is never replaced

    # -- recovery and rebalancing -----------------------------------------------------------

    def persisted_offset(self, tp: TP) -> Optional[int]:
        return self.state_store.partition(tp.partition).changelog_offset()

    def set_persisted_offset(self, tp: TP, offset: int) -> None:
        self.state_store.partition(tp.partition).set_changelog_offset(offset)

    async def need_active_standby_for(self, tp: TP) -> bool:
        return True

    def apply_changelog_batch(self, batch: Iterable[EventT], to_key: Callable[[Any], Any],
                              to_value: Callable[[Any], Any]) -> None:
        """Write changelog records (recovery, standby) per partition in one batch each; a user's
        record never replaces a newer one (:func:`state.record.supersedes`)."""
        puts: dict[int, dict[bytes, Optional[bytes]]] = {}
        last: dict[TP, int] = {}
        for event in batch:
            msg = event.message
            if msg.key is None:
                continue
            last[msg.tp] = max(msg.offset, last.get(msg.tp, -1))
            p_puts = puts.setdefault(msg.partition, {})
            if not msg.key.startswith(INTERNAL_PREFIX):
                current = p_puts[msg.key] if msg.key in p_puts else self.state_store.partition(msg.partition).get(msg.key)
                if not supersedes(msg.value, current, self.generation):
                    continue
            p_puts[msg.key] = msg.value
        for partition, p_puts in puts.items():
            self.state_store.partition(partition).write(p_puts)
        for tp, offset in last.items():
            self.set_persisted_offset(tp, offset)

    async def on_rebalance(self, assigned: Set[TP], revoked: Set[TP], newly_assigned: Set[TP],
                           generation_id: int = 0) -> None:
        topics = self.table.changelog_topic.topics
        gone = {tp.partition for tp in revoked if tp.topic in topics}
        new = {tp.partition for tp in newly_assigned if tp.topic in topics}
        for partition in gone - new:
            self.state_store.close_partition(partition)
        for partition in new:
            self.state_store.partition(partition)
        # any change of a partition number (source or changelog, active or standby) invalidates
        # what the worker holds in memory about it: its state may change elsewhere meanwhile
        changed = {tp.partition for tp in revoked | newly_assigned}
        if changed:
            self._on_partitions_changed(changed)

    async def on_recovery_completed(self, active_tps: Set[TP], standby_tps: Set[TP]) -> None:
        return None

    async def backup_partition(self, tp: Any, flush: bool = True, purge: bool = False, keep: int = 1) -> None:
        raise NotImplementedError("backups: the changelog topic is the backup")

    def restore_backup(self, tp: Any, latest: bool = True, backup_id: int = 0) -> None:
        raise NotImplementedError("backups: the changelog topic is the backup")

    def reset_state(self) -> None:
        self.state_store.destroy()

    async def on_stop(self) -> None:
        self.state_store.close()

    # -- per-key access (faust API; the worker itself uses StateStore in batches) -----------

    def _partition_of_current_event(self) -> Optional[int]:
        event = current_event()
        return event.message.partition if event is not None else None

    def _get(self, key: bytes) -> Optional[bytes]:
        partition = self._partition_of_current_event()
        partitions = [partition] if partition is not None else self.state_store.open_partitions
        for p in partitions:
            value = self.state_store.partition(p).get(key)
            if value is not None:
                return value
        return None

    def _set(self, key: bytes, value: Optional[bytes]) -> None:
        partition = self._partition_of_current_event()
        if partition is None:
            raise RuntimeError("table keys are written from a stream (or in batches by the worker)")
        self.state_store.partition(partition).write({key: value})

    def _del(self, key: bytes) -> None:
        for p in self.state_store.open_partitions:
            self.state_store.partition(p).write({key: None})

    def _iteritems(self) -> Iterator[Tuple[bytes, bytes]]:
        for p in self.state_store.open_partitions:
            yield from self.state_store.partition(p).items()

    def _iterkeys(self) -> Iterator[bytes]:
        for key, _ in self._iteritems():
            yield key

    def _itervalues(self) -> Iterator[bytes]:
        for _, value in self._iteritems():
            yield value

    def _size(self) -> int:
        return sum(1 for _ in self._iterkeys())

    def _contains(self, key: bytes) -> bool:
        return self._get(key) is not None

    def _clear(self) -> None:
        raise NotImplementedError("clearing the state table is not supported")


class StateTable(faust.Table):
    """A faust Table stored in a :class:`StateStore` (keys and values are raw bytes)."""

    def __init__(self, app: Any, *, state: StateStore, on_partitions_changed: PartitionsCallback,
                 generation: int | None = None, **kwargs: Any) -> None:
        self._state = state
        self._on_partitions_changed = on_partitions_changed
        self._generation = generation
        super().__init__(app, key_type=bytes, value_type=bytes, **kwargs)

    def _new_store(self) -> TableStore:
        return TableStore("tgastream://", self.app, self, state=self._state,
                          on_partitions_changed=self._on_partitions_changed, generation=self._generation,
                          table_name=self.name,
                          key_type=bytes, value_type=bytes, key_serializer="raw",
                          value_serializer="raw", options=self.options)
