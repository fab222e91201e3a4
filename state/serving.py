"""Published embeddings: the record format of the ``embeddings`` topic and the serving RocksDB.

Two ways to fill one: the trainer writes its own (API processes beside it open that as a RocksDB
*secondary* instance and catch up with the writer's log), and an API replica anywhere materializes
the compacted ``embeddings`` topic into a store of its own (stream/materialize.py), which records
the topic offsets it holds in the same batches.

Keys (the same on the ``embeddings`` topic): ``user:<id>`` / ``item:<id>`` (vectors),
``bought:<user id>`` (items the user bought, newline-separated, for excluding them from
recommendations), ``context:<user id>`` (the user's latest context graph, for conversion scoring),
``itemcat:<item id>`` (the item's category, for the category filter of recommendations);
in the store only: ``meta:model_version``, and for a materialized store ``meta:offset:<partition>``
and ``meta:topic_id``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from rocksdict import AccessType, Options, Rdict, WriteBatch

VECTOR_VERSION = 1
_VECTOR_HEADER = struct.Struct("<BQddH")  # version, model version, newest event ts, publish ts, dim


@dataclass(frozen=True)
class VectorRecord:
    """A published embedding: model version, event time of the newest event used, publish time."""

    model_version: int
    event_ts: float
    publish_ts: float
    vector: np.ndarray  # [d] float32

    def to_bytes(self) -> bytes:
        vec = np.ascontiguousarray(self.vector, dtype="<f4")
        return _VECTOR_HEADER.pack(VECTOR_VERSION, self.model_version, self.event_ts, self.publish_ts,
                                   vec.shape[0]) + vec.tobytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> "VectorRecord":
        version, model_version, event_ts, publish_ts, dim = _VECTOR_HEADER.unpack_from(data, 0)
        if version != VECTOR_VERSION:
            raise ValueError(f"vector record version {version} is not supported")
        vec = np.frombuffer(data, "<f4", dim, _VECTOR_HEADER.size).copy()
        return cls(model_version, event_ts, publish_ts, vec)


def user_key(user_id: str) -> bytes:
    return b"user:" + user_id.encode()


def item_key(item_id: str) -> bytes:
    return b"item:" + item_id.encode()


def bought_key(user_id: str) -> bytes:
    return b"bought:" + user_id.encode()


def context_key(user_id: str) -> bytes:
    return b"context:" + user_id.encode()


def item_category_key(item_id: str) -> bytes:
    return b"itemcat:" + item_id.encode()


def bought_value(items: Iterable[str]) -> bytes:
    return "\n".join(sorted(set(items))).encode()


def _options() -> Options:
    opts = Options(raw_mode=True)
    opts.create_if_missing(True)
    opts.set_max_background_jobs(2)
    opts.set_write_buffer_size(32 * 1024 * 1024)
    return opts


class ServingStore:
    """The serving RocksDB. ``ServingStore(path)`` writes; ``ServingStore.reader(path)`` reads."""

    def __init__(self, path: Path, secondary: Path | None = None) -> None:
        path = Path(path)
        self.path = path
        self.read_only = secondary is not None
        if secondary is None:
            path.mkdir(parents=True, exist_ok=True)
            self._db = Rdict(str(path), options=_options())
        else:
            secondary.mkdir(parents=True, exist_ok=True)
            self._db = Rdict(str(path), options=_options(), access_type=AccessType.secondary(str(secondary)))

    @classmethod
    def reader(cls, path: Path, secondary: Path) -> "ServingStore":
        return cls(path, secondary)

    def catch_up(self) -> None:
        """Readers: see what the writer has written since (cheap; call per request or on a timer)."""
        if self.read_only:
            self._db.try_catch_up_with_primary()

    def write(self, users: dict[str, VectorRecord], items: dict[str, VectorRecord],
              bought: dict[str, Iterable[str]] | None = None, contexts: dict[str, bytes] | None = None,
              model_version: int | None = None, categories: dict[str, str] | None = None) -> None:
        """One atomic batch of vectors (and optionally bought items, contexts, model version,
        item categories)."""
        wb = WriteBatch(raw_mode=True)
        for uid, rec in users.items():
            wb.put(user_key(uid), rec.to_bytes())
        for iid, rec in items.items():
            wb.put(item_key(iid), rec.to_bytes())
        for uid, its in (bought or {}).items():
            wb.put(bought_key(uid), bought_value(its))
        for uid, ctx in (contexts or {}).items():
            wb.put(context_key(uid), ctx)
        for iid, cat in (categories or {}).items():
            wb.put(item_category_key(iid), cat.encode())
        if model_version is not None:
            wb.put(b"meta:model_version", str(model_version).encode())
        self._db.write(wb)

    def delete_items(self, item_ids: Iterable[str]) -> None:
        """Remove items' vectors and categories (evicted by the trainer), in one atomic batch."""
        wb = WriteBatch(raw_mode=True)
        for iid in item_ids:
            wb.delete(item_key(iid))
            wb.delete(item_category_key(iid))
        self._db.write(wb)

    def write_raw(self, puts: list[tuple[bytes, bytes | None]], offsets: dict[int, int]) -> None:
        """Records of the embeddings topic as they are (None deletes), with the next offset of
        each partition they cover, in one atomic batch."""
        wb = WriteBatch(raw_mode=True)
        for key, value in puts:
            if value is None:
                wb.delete(key)
            else:
                wb.put(key, value)
        for partition, offset in offsets.items():
            wb.put(b"meta:offset:%d" % partition, str(offset).encode())
        self._db.write(wb)

    def offsets(self) -> dict[int, int]:
        """Next offset to read of each topic partition this store holds (materialized stores)."""
        return {int(k[len(b"meta:offset:"):]): int(v) for k, v in self._scan(b"meta:offset:")}

    def source_id(self) -> str | None:
        raw = self._db.get(b"meta:topic_id")
        return raw.decode() if raw else None

    def set_source(self, topic_id: str) -> None:
        """A new generation of the topic: remember its id and forget the old one's offsets."""
        wb = WriteBatch(raw_mode=True)
        for key, _ in list(self._scan(b"meta:offset:")):
            wb.delete(key)
        wb.put(b"meta:topic_id", topic_id.encode())
        self._db.write(wb)

    def note_model_version(self, version: int) -> None:
        if version > self.model_version():
            self._db.put(b"meta:model_version", str(version).encode())

    def user(self, user_id: str) -> VectorRecord | None:
        raw = self._db.get(user_key(user_id))
        return None if raw is None else VectorRecord.from_bytes(raw)

    def item(self, item_id: str) -> VectorRecord | None:
        raw = self._db.get(item_key(item_id))
        return None if raw is None else VectorRecord.from_bytes(raw)

    def bought(self, user_id: str) -> set[str]:
        raw = self._db.get(bought_key(user_id))
        return set(raw.decode().split("\n")) if raw else set()

    def context(self, user_id: str) -> bytes | None:
        return self._db.get(context_key(user_id))

    def model_version(self) -> int:
        raw = self._db.get(b"meta:model_version")
        return int(raw) if raw else 0

    def _scan(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        it = self._db.iter()
        it.seek(prefix)
        while it.valid():
            key = it.key()
            if not key.startswith(prefix):
                break
            yield key, it.value()
            it.next()

    def item_matrix(self) -> tuple[list[str], np.ndarray]:
        """Every item id and its vector as one matrix [I, d] (for top-k by dot product)."""
        ids: list[str] = []
        vecs: list[np.ndarray] = []
        for key, raw in self._scan(b"item:"):
            ids.append(key[5:].decode())
            vecs.append(VectorRecord.from_bytes(raw).vector)
        if not vecs:
            return [], np.zeros((0, 0), dtype=np.float32)
        return ids, np.stack(vecs)  # [I, d]

    def item_categories(self) -> dict[str, str]:
        """Item id → category of every item the trainer published one for."""
        return {key[8:].decode(): raw.decode() for key, raw in self._scan(b"itemcat:")}

    def records(self, kind: str) -> Iterator[tuple[str, VectorRecord]]:
        """Every stored ``"user"`` or ``"item"`` vector with its id (model version included), for
        readers that look at more than the vector (e.g. how old the served vectors are)."""
        prefix = kind.encode() + b":"
        for key, raw in self._scan(prefix):
            yield key[len(prefix):].decode(), VectorRecord.from_bytes(raw)

    def count(self, prefix: bytes) -> int:
        return sum(1 for _ in self._scan(prefix))

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "ServingStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
