"""The per-user transition graph: edge kinds, types, window sliding, encoding, incremental = scratch."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tgastream.state.graph import (
    N_EDGE_TYPES, UserGraph, build_graph, edge_type, gap_bucket, reference_neighbors,
)
from tgastream.core.events import Event

CLICK, FAV, CART, BUY = 0, 1, 2, 3


def ev(item, cat, beh="click", ts=0.0):
    return Event("u", item, cat, beh, ts)


def test_item_category_and_neighbor_edges_on_a_hand_made_sequence():
    # 0:A/c1 click, 1:B/c1 click, 2:A/c1 cart, 3:C/c2 click, 4:A/c1 buy
    g = build_graph([ev("A", "c1", "click", 0), ev("B", "c1", "click", 10), ev("A", "c1", "cart", 20),
                     ev("C", "c2", "click", 30), ev("A", "c1", "buy", 40)])
    a = g.to_arrays()
    assert a.neighbors.tolist() == [[-1, -1, -1], [-1, 0, 0], [0, 1, 1], [-1, -1, 2], [2, 1, 3]]
    assert a.edge_types[4].tolist() == [edge_type(0, CART, BUY), edge_type(1, CLICK, BUY), edge_type(2, CLICK, BUY)]
    assert a.edge_types[0].tolist() == [-1, -1, -1]
    assert a.behaviors.tolist() == [CLICK, CLICK, CART, CLICK, BUY]


def test_category_edge_skips_events_of_the_same_item():
    # the latest same-category event is the same item (A), so the category edge goes to B
    g = build_graph([ev("B", "c", ts=0), ev("A", "c", ts=1), ev("A", "c", ts=2), ev("A", "c", ts=3)])
    assert g.to_arrays().neighbors[:, 1].tolist() == [-1, 0, 0, 0]


def test_edge_types_cover_48_distinct_values():
    types = {edge_type(v, s, d) for v in range(3) for s in range(4) for d in range(4)}
    assert types == set(range(N_EDGE_TYPES))


def test_window_slides_and_drops_edges_that_leave_it():
    g = build_graph([ev("A", "c", ts=0), ev("X", "d", ts=1), ev("Y", "e", ts=2), ev("A", "c", ts=3)], max_len=3)
    a = g.to_arrays()
    assert len(g) == 3 and g.total == 4 and a.items == ["X", "Y", "A"]
    assert a.neighbors.tolist() == [[-1, -1, -1], [-1, -1, 0], [-1, -1, 1]]  # A's item edge left the window


def test_gap_buckets_are_log_spaced():
    g = build_graph([ev("A", "c", ts=t) for t in (0, 0.5, 3, 1000, 10**9)])
    b = g.to_arrays().gap_buckets.tolist()
    assert b[0] == 0 and b[1] == 1 and b[2] == 2 and b[3] == 10 and b[4] == 23
    assert gap_bucket(np.array([np.nan]))[0] == 0


def test_encoding_round_trip_and_version_check():
    g = build_graph([ev(f"i{k % 7}", f"c{k % 3}", ("click", "cart", "buy")[k % 3], 100.0 + k) for k in range(50)], 30)
    data = g.to_bytes()
    back = UserGraph.from_bytes(data)
    assert back.to_bytes() == data and back == g
    back.append_event(ev("i1", "c1", "fav", 999))
    g.append_event(ev("i1", "c1", "fav", 999))
    assert back == g  # maps rebuilt after decoding give the same next append
    with pytest.raises(ValueError, match="version"):
        UserGraph.from_bytes(bytes([9]) + data[1:])
    with pytest.raises(ValueError):
        UserGraph.from_bytes(data[:-3] + b"\n\n\n\n")
    assert UserGraph.from_bytes(UserGraph(5).to_bytes()) == UserGraph(5)


def test_tail_keeps_last_nodes_and_drops_edges_leaving_them():
    g = build_graph([ev("A", "c", ts=0), ev("B", "c", ts=1), ev("A", "c", ts=2)])
    t = g.tail(2).to_arrays()
    assert t.items == ["B", "A"] and t.neighbors.tolist() == [[-1, -1, -1], [-1, 0, 0]]


events_st = st.lists(
    st.tuples(st.integers(0, 6), st.integers(0, 3), st.sampled_from(["click", "fav", "cart", "buy"])),
    min_size=0, max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(events_st, st.integers(1, 20), st.integers(0, 60))
def test_incremental_equals_from_scratch_on_the_window(rows, max_len, split):
    events = [ev(f"i{i}", f"c{c}", b, float(k)) for k, (i, c, b) in enumerate(rows)]
    # incremental, with an encode/decode in the middle (as the store does between batches)
    g = build_graph(events[:split], max_len)
    g = UserGraph.from_bytes(g.to_bytes())
    for e in events[split:]:
        g.append_event(e)
    window = events[-max_len:] if events else []
    scratch = build_graph(window, max_len)
    a, b = g.to_arrays(), scratch.to_arrays()
    assert a.items == b.items and np.array_equal(a.neighbors, b.neighbors)
    assert np.array_equal(a.edge_types, b.edge_types)
    ref = reference_neighbors([e.item_id for e in window], [e.category_id for e in window])
    assert a.neighbors.tolist() == [list(r) for r in ref]


def _numpy_layout(g: UserGraph) -> bytes:
    """The documented encoding (header, behaviors u8, ts f64, distances u16 [N,3], ids) via numpy,
    as version 1 was first written: the struct-based encoder must produce the same bytes."""
    import struct as _struct

    n = len(g)
    a = g.to_arrays()
    return b"".join((
        _struct.pack("<BIQ", 1, n, g.total), _struct.pack("<H", g.max_len),
        a.behaviors.astype(np.uint8).tobytes(), a.ts.astype("<f8").tobytes(),
        np.asarray(g._dist, dtype="<u2").reshape(n * 3).tobytes(),  # raw distances, as stored
        "\n".join(a.items + a.categories).encode(),
    ))


@settings(max_examples=100, deadline=None)
@given(events_st, st.integers(1, 20))
def test_encoding_is_the_documented_byte_layout(rows, max_len):
    g = build_graph([ev(f"i{i}", f"c{c}", b, 1000.0 + 0.5 * k) for k, (i, c, b) in enumerate(rows)], max_len)
    assert g.to_bytes() == _numpy_layout(g)


def _random_graphs(n: int, seed: int) -> list[UserGraph]:
    """``n`` graphs of random lengths and windows (slid, one-node and empty ones among them)."""
    rng = np.random.default_rng(seed)
    graphs = []
    for _ in range(n):
        g = UserGraph(max_len=int(rng.integers(1, 12)))
        for t in range(int(rng.integers(0, 25))):
            g.append(str(rng.integers(8)), str(rng.integers(3)), int(rng.integers(4)), 1000.0 + t * float(rng.integers(1, 5000)))
        graphs.append(g)
    return graphs


def test_arrays_of_many_graphs_equal_each_graphs_own_arrays():
    """The batched computation (one set of numpy operations over all graphs) gives every graph
    exactly what its own ``to_arrays`` gives: windows that slid, one-node and empty graphs too."""
    from tgastream.state.graph import arrays_of

    graphs = _random_graphs(60, seed=3)
    expected = [UserGraph.from_bytes(g.to_bytes()).to_arrays() for g in graphs]  # computed one by one
    got = arrays_of(graphs + graphs[:5])  # (a graph twice: computed once)
    assert len(got) == len(graphs) + 5
    for e, a in zip(expected + expected[:5], got):
        assert a.items == e.items and a.categories == e.categories
        for field in ("behaviors", "ts", "gap_buckets", "neighbors", "edge_types"):
            np.testing.assert_array_equal(getattr(a, field), getattr(e, field), err_msg=field)
            assert getattr(a, field).dtype == getattr(e, field).dtype


def test_arrays_of_a_mix_of_built_and_decoded_graphs_leaves_the_decoded_ones_packed():
    """The publishing forward batches users' graphs (built by appending) with clicks' contexts
    (decoded): each gets its own arrays, and a decoded graph is read from its encoding, never
    unpacked into lists."""
    from tgastream.state.graph import arrays_of

    graphs = _random_graphs(40, seed=7)
    expected = [UserGraph.from_bytes(g.to_bytes()).to_arrays() for g in graphs]
    mixed = [g if k % 2 else UserGraph.from_bytes(g.to_bytes()) for k, g in enumerate(graphs)]
    got = arrays_of(mixed)
    assert all(m._raw is not None for k, m in enumerate(mixed) if k % 2 == 0 and len(m))  # still packed
    for e, a in zip(expected, got):
        assert a.items == e.items and a.categories == e.categories
        for field in ("behaviors", "ts", "gap_buckets", "neighbors", "edge_types"):
            np.testing.assert_array_equal(getattr(a, field), getattr(e, field), err_msg=field)
            assert getattr(a, field).dtype == getattr(e, field).dtype


def test_a_decoded_graph_reads_its_columns_from_the_encoding_and_behaves_as_the_original():
    """Decoding leaves behaviors, times and distances packed until first use: the batched arrays
    read straight from the encodings, and every other use (tail, append, re-encoding) sees the
    same graph as the original."""
    from tgastream.state.graph import arrays_of

    graphs = _random_graphs(40, seed=5)
    decoded = [UserGraph.from_bytes(g.to_bytes()) for g in graphs]
    assert all(d._raw is not None for d in decoded if len(d))  # nothing unpacked yet
    for e, a in zip(arrays_of(graphs), arrays_of(decoded)):  # all packed: the encoding path
        for field in ("behaviors", "ts", "gap_buckets", "neighbors", "edge_types"):
            np.testing.assert_array_equal(getattr(a, field), getattr(e, field), err_msg=field)
            assert getattr(a, field).dtype == getattr(e, field).dtype
    for g, d in zip(graphs, [UserGraph.from_bytes(g.to_bytes()) for g in graphs]):
        assert d.to_bytes() == g.to_bytes() and d.tail(3) == g.tail(3) and d.head(2) == g.head(2)
        d.append("new", "0", 1, 1e9)
        g.append("new", "0", 1, 1e9)
        assert d == g
