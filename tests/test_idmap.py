"""The id map: rows without collisions, growth in chunks, eviction and reuse, persistence."""

from __future__ import annotations

import numpy as np

from tgastream.state.idmap import IdMap, read_mirror


def test_new_ids_get_distinct_rows_and_unknown_lookups_give_zero():
    m = IdMap(chunk=4)
    rows = m.lookup(["a", "b", "a", "c"], now=0)
    assert rows.tolist() == [1, 2, 1, 3]
    assert m.peek(["b", "zzz"]).tolist() == [2, 0]
    assert m.lookup(["zzz"], now=0, grow=False).tolist() == [0]
    assert len(m) == 3


def test_row_space_grows_in_chunks():
    m = IdMap(chunk=4)
    m.lookup([f"i{k}" for k in range(3)], now=0)
    assert m.capacity == 4
    m.lookup(["i3"], now=0)
    assert m.capacity == 8 and m.last_used.shape == (8,)
    rows = m.lookup([f"i{k}" for k in range(20)], now=0)
    assert len(set(rows.tolist())) == 20 and rows.max() < m.capacity


def test_rows_unused_for_ttl_are_evicted_and_reused():
    m = IdMap(chunk=8)
    m.lookup(["old1", "old2"], now=0)
    m.lookup(["fresh"], now=100)
    gone: list[str] = []
    freed = m.evict(now=150, ttl_s=100, evicted_ids=gone)
    assert freed.tolist() == [1, 2] and "old1" not in m and "fresh" in m and m.evictions == 2
    assert sorted(gone) == ["old1", "old2"]  # (the trainer deletes their vectors from serving)
    assert m.lookup(["new"], now=160).tolist() == [1]  # lowest freed row reused
    assert m.peek(["old1"]).tolist() == [0]


def test_snapshot_round_trip_and_rocksdb_mirror(tmp_path):
    m = IdMap(chunk=4)
    m.lookup([f"i{k}" for k in range(10)], now=5)
    m.evict(now=100, ttl_s=10)
    m.lookup(["x", "y"], now=200)
    back = IdMap.from_bytes(m.to_bytes())
    assert back.items() == m.items() and back.capacity == m.capacity and back.evictions == m.evictions
    assert np.array_equal(back.last_used, m.last_used)
    assert back.lookup(["z"], now=300).tolist() == m.lookup(["z"], now=300).tolist()
    m.sync_to(tmp_path / "idmap", step=7)
    assert read_mirror(tmp_path / "idmap") == dict(m.items())
    m.lookup(["w"], now=400)
    m.sync_to(tmp_path / "idmap", step=8)
    assert read_mirror(tmp_path / "idmap") == dict(m.items())


def test_a_deep_copy_is_independent_of_the_map_it_came_from():
    import copy

    m = IdMap(chunk=4)
    m.lookup(["a", "b", "c"], now=1.0)
    m.evict(now=100.0, ttl_s=10.0)  # (a free list to copy too)
    m.lookup(["d"], now=200.0)
    twin = copy.deepcopy(m)
    assert twin.to_bytes() == m.to_bytes()
    m.lookup(["e", "f", "g", "h", "i"], now=300.0)  # reuses freed rows and grows the original
    m.evict(now=1000.0, ttl_s=10.0)
    assert twin.peek(["d", "e"]).tolist() == [1, 0] and twin.capacity == 4 and len(twin.last_used) == 4
    assert twin.to_bytes() != m.to_bytes()
