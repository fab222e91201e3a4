"""The per-user state machine: retrieval samples, delayed conversion labels, exactly-once apply."""

from __future__ import annotations

from tgastream.state.samples import (
    _SAMPLE_HEADER, _SOURCE, CLICK, CONVERSION, RETRIEVAL, RedeliveryGuard, Sample, UserState, samples_from_events,
)
from tgastream.core.events import Event

DAY = 86400.0


def ev(item, beh, ts, cat="c", user="u"):
    return Event(user, item, cat, beh, ts)


def test_retrieval_sample_holds_graph_before_the_event():
    st = UserState.new("u", 200)
    assert [s.kind for s in st.apply(ev("A", "click", 0), 0, DAY, 50)] == [CLICK]  # no history, no retrieval sample
    s, _click = st.apply(ev("B", "click", 10), 1, DAY, 50)
    assert s.kind == RETRIEVAL and s.item_id == "B" and s.graph.to_arrays().items == ["A"]


def test_a_click_that_opens_a_window_emits_a_click_sample_with_its_conversion_context():
    st = UserState.new("u", 200)
    st.apply(ev("A", "click", 0), 0, DAY, 50)
    (_ret, click) = st.apply(ev("B", "click", 10), 1, DAY, 50)
    assert (click.kind, click.item_id, click.event_ts, click.label) == (CLICK, "B", 10, 0.0)
    assert [s.kind for s in st.apply(ev("B", "click", 20), 2, DAY, 50)] == [RETRIEVAL]  # window open: no second click
    (conv,) = [s for s in st.apply(ev("B", "buy", 30), 3, DAY, 50) if s.kind == CONVERSION]
    assert conv.click_key == click.click_key and conv.graph == click.graph  # the label meets its click-time context


def test_buy_within_window_is_positive_with_context_up_to_the_click():
    st = UserState.new("u", 200)
    st.apply(ev("A", "click", 0), 0, DAY, 50)
    st.apply(ev("B", "click", 10), 1, DAY, 50)
    out = st.apply(ev("A", "buy", 100), 2, DAY, 50)
    conv = [s for s in out if s.kind == CONVERSION]
    assert len(conv) == 1 and conv[0].label == 1.0 and conv[0].item_id == "A"
    assert conv[0].graph.to_arrays().items == ["A"]  # context ends at the click, no leakage of the buy
    assert list(st.pending) == ["B"]


def test_window_expiry_by_later_event_or_watermark_is_negative():
    st = UserState.new("u", 200)
    st.apply(ev("A", "click", 0), 0, DAY, 50)
    st.apply(ev("B", "click", 10), 1, DAY, 50)
    out = st.apply(ev("C", "click", DAY + 5), 2, DAY, 50)
    conv = [s for s in out if s.kind == CONVERSION]
    assert [(s.item_id, s.label) for s in conv] == [("A", 0.0)]
    assert [(s.item_id, s.label) for s in st.expire(3 * DAY, DAY, 50)] == [("B", 0.0), ("C", 0.0)]
    assert st.pending == {}


def test_redelivered_offsets_change_nothing():
    st = UserState.new("u", 200)
    st.apply(ev("A", "click", 0), 5, DAY, 50)
    before = st.to_bytes()
    assert st.apply(ev("A", "click", 0), 5, DAY, 50) == []
    assert st.apply(ev("Z", "buy", 1), 3, DAY, 50) == []
    assert st.to_bytes() == before


def test_state_and_sample_encodings_round_trip():
    st = UserState.new("u1", 30)
    samples = []
    for k in range(40):
        samples += st.apply(ev(f"i{k % 5}", ("click", "cart", "buy")[k % 3], float(k * 100)), k, DAY, 10)
    back = UserState.from_bytes(st.to_bytes())
    assert back.to_bytes() == st.to_bytes() and back.offset == 39 and back.pending.keys() == st.pending.keys()
    for s in samples:
        r = Sample.from_bytes(s.to_bytes())
        assert r.to_bytes() == s.to_bytes() and r.graph == s.graph and r.label == s.label


def test_offline_samples_count_matches_events():
    events = [ev("A", "click", 0, user="1"), ev("A", "buy", 5, user="1"), ev("B", "click", 0, user="2"),
              ev("C", "click", 1, user="2")]
    out = samples_from_events(events, final_watermark=10 * DAY)
    kinds = sorted((s.user_id, s.kind, s.label) for s in out)
    assert kinds == [("1", 0, 1.0), ("1", 1, 1.0), ("1", 2, 0.0), ("2", 0, 1.0), ("2", 1, 0.0), ("2", 1, 0.0),
                     ("2", 2, 0.0), ("2", 2, 0.0)]


def test_a_sample_carries_its_source_identity_and_version_1_is_still_read():
    st = UserState.new("u", 30)
    st.apply(ev("A", "click", 0), 0, DAY, 10)
    (s, _click) = st.apply(ev("B", "click", 10), 1, DAY, 10)
    s.generation, s.partition, s.offset, s.seq = 3, 2, 41, 1
    back = Sample.from_bytes(s.to_bytes())
    assert (back.generation, back.partition, back.offset, back.seq) == (3, 2, 41, 1) and back.source == (3, 2)
    v1 = bytes([1]) + s.to_bytes()[1:_SAMPLE_HEADER.size] + s.to_bytes()[_SAMPLE_HEADER.size + _SOURCE.size:]
    old = Sample.from_bytes(v1)  # written before identities: no identity, same content
    assert (old.offset, old.item_id, old.graph) == (-1, "B", s.graph)


def test_the_guard_admits_each_identity_once_per_source_and_survives_a_checkpoint():
    def sample(partition, offset, seq, generation=0):
        return Sample(RETRIEVAL, "u", UserState.new("u", 5).graph, "i", "c", 0, 1.0, 0.0, 0.0,
                      generation, partition, offset, seq)

    guard = RedeliveryGuard()
    assert [guard.admit(sample(0, 5, k)) for k in (0, 1)] == [True, True]
    assert guard.admit(sample(1, 2, 0))  # another source partition: its own order
    assert not guard.admit(sample(0, 5, 1)) and not guard.admit(sample(0, 4, 7))  # re-deliveries
    assert guard.admit(sample(0, 6, 0)) and guard.admit(sample(0, 3, 0, generation=1))  # a new generation
    restored = RedeliveryGuard.from_state_dict(guard.state_dict())
    assert not restored.admit(sample(0, 6, 0)) and restored.admit(sample(0, 6, 1))
    offline = sample(-1, -1, 0)
    assert guard.admit(offline) and guard.admit(offline)  # no identity: never a re-delivery
