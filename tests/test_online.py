"""The online learner: prequential scoring, growing/evicting rows, checkpoint round trip, frozen twin."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tgastream.state.checkpoint import CheckpointRefused

from tgastream.model.config import ModelConfig, OnlineConfig
from tgastream.model.inference import IncompatibleCheckpoint, InferenceModel
from tgastream.model.online import OnlineLearner
from tgastream.state.samples import CLICK, RETRIEVAL, samples_from_events
from tgastream.core.events import BEHAVIORS, Event
from tgastream.stream.synth import SynthConfig, generate


@pytest.fixture(scope="module")
def samples():
    rows = generate(SynthConfig(users=60, events=3000, seed=5))
    events = [Event(str(u + 1), str(i + 1), str(c + 1), BEHAVIORS[b], float(ts)) for ts, u, i, c, b in rows]
    return samples_from_events(events, sample_len=20, final_watermark=events[-1].ts + 2 * 86400)


def shape(**over) -> ModelConfig:
    """A small online model (tables are sized by the learner's id maps)."""
    return ModelConfig(n_items=1, n_categories=1, **{"dim": 16, "heads": 2, "layers": 1, "dropout": 0.0, **over})


def learner(model_cfg: ModelConfig | None = None, **over) -> OnlineLearner:
    cfg = OnlineConfig(**{"device": "cpu", "sample_len": 20, "chunk": 64, "reservoir": 200, **over})
    return OnlineLearner(model_cfg or shape(), cfg)


def test_step_scores_before_learning_and_publishes_every_user_and_item(samples):
    L = learner()
    batch = samples[:128]
    out = L.step(batch)
    assert L.version == 1 and np.isfinite(out.loss)
    # every retrieval target ranked, every click predicted at once; a label counts only with its click's prediction
    assert L.metrics.retrievals_seen + L.clicktime.predicted == sum(s.kind in (RETRIEVAL, CLICK) for s in batch)
    assert L.metrics.conversions_seen == L.clicktime.joined
    assert set(out.users) == {s.user_id for s in batch}
    newest = {s.graph.item_ids[-1] for s in batch if len(s.graph)}
    assert {s.item_id for s in batch} <= set(out.items) <= {s.item_id for s in batch} | newest
    vec, ev_ts = next(iter(out.users.values()))
    assert vec.shape == (16,) and vec.dtype == np.float32 and ev_ts > 0


def test_tables_and_optimizer_state_grow_in_chunks(samples):
    L = learner()
    for k in range(0, 1024, 128):
        L.step(samples[k:k + 128])
    items = L.rows.items
    assert items.capacity > 64 and items.capacity % 64 == 0
    assert L.model.embed.item.weight.shape[0] == items.capacity == L.model.cfg.n_items
    assert L.optimizer.state[L.model.embed.item.weight]["exp_avg"].shape == L.model.embed.item.weight.shape
    assert L.model.item_bias.weight.shape[0] == items.capacity


def test_idle_rows_are_evicted_and_reset(samples):
    L = learner(idle_ttl_s=1.0, evict_every=1)
    L.step(samples[:64])
    L.step(samples[-64:])  # event time jumps far ahead: rows of the first batch go idle
    assert L.rows.items.evictions > 0


def test_state_dict_round_trip_gives_identical_scores(samples):
    L = learner()
    for k in range(0, 512, 128):
        L.step(samples[k:k + 128])
    twin = learner()
    twin.load_state_dict(L.state_dict())
    probe = samples[600:700]
    ctx = probe[0].graph
    cands = [(s.item_id, s.category_id) for s in probe[:5]]
    assert np.allclose(L.conversion_proba(ctx, cands), twin.conversion_proba(ctx, cands))
    rng = torch.get_rng_state()  # the global generator draws the uniform negatives: same draws for both
    a = L.step(probe)
    torch.set_rng_state(rng)
    b = twin.step(probe)
    assert a.loss == pytest.approx(b.loss, rel=1e-5)
    assert L.online_metrics() == twin.online_metrics()


def test_warm_start_loads_a_saved_learner_state_and_refuses_one_that_could_run_code(samples, tmp_path):
    L = learner()
    L.step(samples[:128])
    saved = tmp_path / "learner.pt"
    torch.save(L.state_dict(), saved)
    twin = learner()
    twin.warm_start(saved)
    ctx, cands = samples[300].graph, [(s.item_id, s.category_id) for s in samples[300:305]]
    assert np.allclose(L.conversion_proba(ctx, cands), twin.conversion_proba(ctx, cands))
    crafted = tmp_path / "crafted.pt"
    torch.save({"learner": CraftedPayload()}, crafted)
    with pytest.raises(CheckpointRefused):
        learner().warm_start(crafted)


class CraftedPayload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_frozen_copy_scores_but_never_learns(samples):
    L = learner()
    L.step(samples[:128])
    frozen = L.frozen_copy()
    before = [p.detach().clone() for p in frozen.model.parameters()]
    frozen.step(samples[128:256])
    assert frozen.version == L.version == 1
    assert all(torch.equal(a, b) for a, b in zip(before, frozen.model.parameters()))
    assert frozen.metrics.retrievals_seen + frozen.clicktime.predicted == sum(
        s.kind in (RETRIEVAL, CLICK) for s in samples[128:256])  # its own click-time predictions only


def test_online_learning_improves_prequential_hr():
    rows = generate(SynthConfig(users=40, events=6000, items=100, categories=10, seed=3))
    events = [Event(str(u + 1), str(i + 1), str(c + 1), BEHAVIORS[b], float(ts)) for ts, u, i, c, b in rows]
    samples = samples_from_events(events, sample_len=20)
    stream = [s for s in samples if s.kind == RETRIEVAL]
    L = learner(metric_window=400, lr=5e-3)
    # the whole catalogue has rows from the start, so first and last windows rank among the same items
    L.rows.items.lookup([i for s in samples for i in [s.item_id, *s.graph.item_ids]], now=0)
    L.rows.categories.lookup([c for s in samples for c in [s.category_id, *s.graph.category_ids]], now=0)
    L.rows.grow_tables(L.model, L.optimizer)
    L.step(stream[:400])  # the untrained model's score on the first 400
    first = L.online_metrics()["hr@10"]
    for k in range(400, len(stream) - 400, 200):
        L.step(stream[k:k + 200])
    L.metrics.ranks.clear()
    L.step(stream[-400:])
    assert L.online_metrics()["hr@10"] > first


def test_a_checkpoint_of_another_model_shape_is_refused_with_a_clear_error(samples):
    L = learner()
    L.step(samples[:64])
    other = learner(shape(dim=32))
    with pytest.raises(IncompatibleCheckpoint, match="another model version or shape"):
        other.load_state_dict(L.state_dict())


def test_online_ranks_count_ties_as_mid_ranks_like_offline(samples):
    L = learner(shape(copy=False))  # no pointer: the catalogue scores alone rank the target
    batch = [s for s in samples[:256] if s.kind == RETRIEVAL]
    L.vectors(batch)  # gives every item a row
    with torch.no_grad():  # every item vector 0, no bias: each target is tied with the whole catalogue
        L.model.embed.item.weight.zero_()
        L.model.embed.category.weight.zero_()
        L.model.item_bias.weight.zero_()
    L.score(batch)
    n = len(L.rows.items)
    assert n > 40
    assert set(L.metrics.ranks) == {1.0 + (n - 1) / 2.0}  # mid-rank, not first
    assert L.online_metrics()["hr@10"] == 0.0 and L.batch_hr == 0.0


def test_inference_model_loads_only_the_model_part_and_scores_like_the_learner(samples):
    L = learner()
    for k in range(0, 256, 128):
        L.step(samples[k:k + 128])
    served = InferenceModel.from_state(L.state_dict(), torch.device("cpu"))
    assert not served.model.training and not hasattr(served, "optimizer")
    assert served.model.cfg == L.model.cfg
    ctx = samples[300].graph
    cands = [(s.item_id, s.category_id) for s in samples[300:306]] + [("never-seen", "nor-this")]
    assert np.allclose(served.conversion_proba(ctx, cands), L.conversion_proba(ctx, cands))
    assert served.conversion_proba(ctx, []) == []


@pytest.mark.parametrize("sample_len", [5, 20])
def test_a_clicks_context_is_the_graph_its_retrieval_sample_and_target_make(sample_len):
    """The publishing forward takes a click's context as its user's newest graph (one row for
    both the user vector and the click's P(buy)), where it used the retrieval sample's context
    with the click appended: the model reads the same arrays from both (windows that slid too)."""
    from tgastream.state.samples import Sample

    rows = generate(SynthConfig(users=40, events=3000, items=200, seed=6))
    events = [Event(str(u + 1), str(i + 1), str(c + 1), BEHAVIORS[b], float(ts)) for ts, u, i, c, b in rows]
    decoded = [Sample.from_bytes(s.to_bytes()) for s in samples_from_events(events, sample_len=sample_len)]
    pairs = [(r, c) for r, c in zip(decoded, decoded[1:]) if r.kind == RETRIEVAL and c.kind == CLICK
             and r.user_id == c.user_id and r.event_ts == c.event_ts]
    assert len(pairs) > 500 and sum(len(c.graph) == sample_len for _, c in pairs) > 100  # full windows among them
    for r, c in pairs:
        assert OnlineLearner.newest_samples([r, c]) == {c.user_id: c}
        x, y = OnlineLearner.graph_of(r).to_arrays(), c.graph.to_arrays()
        assert x.items == y.items and x.categories == y.categories
        for field in ("behaviors", "ts", "gap_buckets", "neighbors", "edge_types"):
            np.testing.assert_array_equal(getattr(x, field), getattr(y, field), err_msg=field)
