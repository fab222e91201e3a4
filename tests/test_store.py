"""The RocksDB state store: atomic batched writes, multi-get, hidden internal keys, reopen."""

from __future__ import annotations

from tgastream.state.store import OFFSET_KEY, StateStore, StoreConfig


def test_batched_write_puts_and_deletes_and_multi_get_keeps_order(tmp_path):
    store = StateStore(tmp_path, "t")
    db = store.partition(0)
    db.write({b"a": b"1", b"b": b"2", b"c": b"3"})
    db.write({b"b": None, b"d": b"4"})
    assert db.get_many([b"d", b"b", b"a", b"zz"]) == [b"4", None, b"1", None]
    assert db.get_many([]) == []
    assert list(db.items()) == [(b"a", b"1"), (b"c", b"3"), (b"d", b"4")]
    store.close()


def test_internal_keys_are_hidden_and_the_changelog_offset_survives_reopen(tmp_path):
    store = StateStore(tmp_path, "t", StoreConfig(block_cache_mb=8))
    db = store.partition(3)
    db.write({b"user": b"x"})
    db.set_changelog_offset(41)
    assert [k for k, _ in db.items()] == [b"user"] and db.get(OFFSET_KEY) == b"41"
    store.close()
    again = StateStore(tmp_path, "t")
    assert again.partition(3).changelog_offset() == 41 and again.partition(3).get(b"user") == b"x"
    assert again.partition(4).changelog_offset() is None
    assert again.open_partitions == [3, 4]
    again.close()


def test_partitions_are_separate_databases_and_stats_count_them(tmp_path):
    store = StateStore(tmp_path, "t")
    store.partition(0).write({b"k%d" % i: b"v" * 100 for i in range(50)})
    store.partition(1).write({b"k0": b"other"})
    assert store.partition(1).get(b"k0") == b"other" and store.partition(0).get(b"k0") == b"v" * 100
    stats = store.stats()
    assert stats[0].keys == 50 and stats[1].keys == 1 and stats[0].bytes > 0
    assert store.path(0).is_dir()
    store.close_partition(1)
    assert not store.is_open(1)
    store.destroy()
    assert not tmp_path.exists() or not any(tmp_path.iterdir())
