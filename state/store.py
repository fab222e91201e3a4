"""RocksDB (rocksdict) storage for per-user state: one database per partition, batched writes.

Workload (DESIGN.md §3): one value per user (its graph, open conversion windows, features and the
offset of the last event applied; ~0.1–5 KB), read-modify-written at stream rate, looked up by
exact key, scanned only when a partition is (re)assigned. The tuning follows from that:

- whole-key bloom filters (10 bits/key): a lookup of a user never seen (most events of a live
  stream are from new or rare users) is answered without touching data blocks;
- one LRU block cache shared by every partition of a process, with index and filter blocks kept
  in it, so memory is bounded by one number however many partitions a worker owns;
- 32 MB memtables, three of them: hot users are overwritten many times between flushes, and those
  overwrites die in memory instead of becoming L0 files and compaction work;
- LZ4 on upper levels (cheap at flush time), ZSTD on the bottommost level where most bytes live
  (graphs hold repeated item ids as text and compress well);
- 16 KB blocks: values are small, point lookups dominate, a smaller index fits the cache;
- WAL on, no fsync per write: a killed process loses nothing (the WAL is in the page cache), and
  a lost machine is rebuilt from the changelog topic.

Every write of a processing batch goes through one :class:`rocksdict.WriteBatch`, so a batch of
user states lands atomically. Keys starting with ``\\n`` are internal (a user id can never contain
a newline, :mod:`tgastream.core.events` rejects it) and are hidden from iteration.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

from rocksdict import BlockBasedOptions, Cache, DBCompressionType, Options, Rdict, WriteBatch

INTERNAL_PREFIX = b"\n"
"""Keys with this prefix are store metadata, never user state."""

OFFSET_KEY = INTERNAL_PREFIX + b"changelog-offset"
"""Last changelog offset whose write this database holds (recovery resumes after it)."""
CHANGELOG_ID_KEY = INTERNAL_PREFIX + b"changelog-id"
"""Topic id (generation) of the changelog that offset belongs to."""


@dataclass(frozen=True)
class StoreConfig:
    """RocksDB tuning for the per-user state workload (see the module docstring for why)."""

    write_buffer_mb: int = 32
    max_write_buffers: int = 3
    block_cache_mb: int = 256  # shared by all partitions of one process
    block_size_kb: int = 16
    bloom_bits_per_key: float = 10.0
    compression: str = "lz4"
    bottommost_compression: str = "zstd"
    background_jobs: int = 2
    max_open_files: int = 512


_COMPRESSION = {
    "none": DBCompressionType.none, "lz4": DBCompressionType.lz4, "zstd": DBCompressionType.zstd,
    "snappy": DBCompressionType.snappy, "zlib": DBCompressionType.zlib,
}


def rocksdb_options(opts: StoreConfig, cache: Cache) -> Options:
    """The rocksdict :class:`Options` for one partition database."""
    o = Options(raw_mode=True)
    o.create_if_missing(True)
    o.set_write_buffer_size(opts.write_buffer_mb << 20)
    o.set_max_write_buffer_number(opts.max_write_buffers)
    o.set_max_background_jobs(opts.background_jobs)
    o.set_max_open_files(opts.max_open_files)
    o.set_level_compaction_dynamic_level_bytes(True)
    o.set_compression_type(_COMPRESSION[opts.compression]())
    o.set_bottommost_compression_type(_COMPRESSION[opts.bottommost_compression]())
    o.set_keep_log_file_num(2)
    table = BlockBasedOptions()
    table.set_block_cache(cache)
    table.set_block_size(opts.block_size_kb << 10)
    table.set_bloom_filter(opts.bloom_bits_per_key, False)  # full (whole-key) filter
    table.set_cache_index_and_filter_blocks(True)
    table.set_pin_l0_filter_and_index_blocks_in_cache(True)
    o.set_block_based_table_factory(table)
    return o


@dataclass(frozen=True)
class StoreStats:
    """Size of one partition database: estimated live keys and bytes (SST files + memtables)."""

    keys: int
    bytes: int


class PartitionDB:
    """One partition's database: point reads, atomic batched writes, iteration over user keys."""

    def __init__(self, path: Path, options: Options, changelog_id: str | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.current_changelog_id = changelog_id  # recorded with every changelog offset set
        self._db: Rdict | None = Rdict(str(path), options=options)

    @property
    def db(self) -> Rdict:
        if self._db is None:
            raise RuntimeError(f"store {self.path} is closed")
        return self._db

    def get(self, key: bytes) -> bytes | None:
        return self.db.get(key)

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """Values of ``keys`` in order (None where missing), in one multi-get."""
        return self.db.get(list(keys)) if keys else []

    def write(self, puts: Mapping[bytes, bytes | None]) -> None:
        """Apply every put (a None value deletes the key) atomically, in one write batch."""
        if not puts:
            return
        batch = WriteBatch(raw_mode=True)
        for key, value in puts.items():
            if value is None:
                batch.delete(key)
            else:
                batch.put(key, value)
        self.db.write(batch)

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        """Every (key, value) of user state, in key order (internal keys skipped)."""
        for key, value in self.db.items():
            if not key.startswith(INTERNAL_PREFIX):
                yield key, value

    def changelog_offset(self) -> int | None:
        raw = self.db.get(OFFSET_KEY)
        return int(raw) if raw is not None else None

    def set_changelog_offset(self, offset: int) -> None:
        """Record that this database holds the changelog up to ``offset`` (of the current changelog id)."""
        puts = {OFFSET_KEY: str(offset).encode()}
        if self.current_changelog_id:
            puts[CHANGELOG_ID_KEY] = self.current_changelog_id.encode()
        self.write(puts)

    def changelog_id(self) -> str | None:
        """Id of the changelog generation this database mirrors (None: not recorded)."""
        raw = self.db.get(CHANGELOG_ID_KEY)
        return raw.decode() if raw is not None else None

    def reset_changelog_position(self, changelog_id: str) -> None:
        """Mirror ``changelog_id`` from its start: the next recovery replays all of it."""
        self.write({CHANGELOG_ID_KEY: changelog_id.encode(), OFFSET_KEY: None})

    def stats(self) -> StoreStats:
        db = self.db
        size = sum(db.property_int_value(p) or 0 for p in ("rocksdb.total-sst-files-size",
                                                              "rocksdb.cur-size-all-mem-tables"))
        return StoreStats(keys=db.property_int_value("rocksdb.estimate-num-keys") or 0, bytes=size)

    def close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            db.close()


class StateStore:
    """All partition databases of one table under ``root`` (``<root>/<name>-<partition>.db``)."""

    def __init__(self, root: Path, name: str, options: StoreConfig | None = None,
                 changelog_id: str | None = None) -> None:
        self.root = Path(root)
        self.name = name
        self.changelog_id = changelog_id  # the changelog generation this process writes
        self.options = options or StoreConfig()
        self._cache = Cache(self.options.block_cache_mb << 20)
        self._rocks_options = rocksdb_options(self.options, self._cache)
        self._dbs: dict[int, PartitionDB] = {}

    def path(self, partition: int) -> Path:
        return self.root / f"{self.name}-{partition}.db"

    def partition(self, partition: int) -> PartitionDB:
        """The database of ``partition``, opened on first use."""
        db = self._dbs.get(partition)
        if db is None:
            db = self._dbs[partition] = PartitionDB(self.path(partition), self._rocks_options, self.changelog_id)
        return db

    def local_partitions(self) -> list[int]:
        """Partitions with a database on disk, open or not."""
        prefix = f"{self.name}-"
        return sorted(int(p.name[len(prefix):-3]) for p in self.root.glob(f"{prefix}*.db"))

    def is_open(self, partition: int) -> bool:
        return partition in self._dbs

    @property
    def open_partitions(self) -> list[int]:
        return sorted(self._dbs)

    def close_partition(self, partition: int) -> None:
        db = self._dbs.pop(partition, None)
        if db is not None:
            db.close()

    def destroy(self) -> None:
        """Close everything and delete the files (local state only; the changelog is untouched)."""
        self.close()
        shutil.rmtree(self.root, ignore_errors=True)

    def stats(self) -> dict[int, StoreStats]:
        return {p: db.stats() for p, db in sorted(self._dbs.items())}

    def close(self) -> None:
        for p in list(self._dbs):
            self.close_partition(p)
