"""The repeat-recent prior of the retrieval head: the untrained model ranks as repeat-recent does,
and training can move it away from there."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from tgastream.core.events import load_events
from tgastream.model.batching import to_batch
from tgastream.model.config import TrainConfig
from tgastream.model.evaluation import EvalConfig, build_data, build_model, candidates, repeat_ranks, validation_as_test
from tgastream.model.inference import saved_model_config
from tgastream.model.retrieval_head import RetrievalHead, repeat_features
from tgastream.model.training import fit
from tgastream.state.samples import RETRIEVAL
from tgastream.stream.synth import SynthConfig, write_file

from tests.conftest import shared_data

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = EvalConfig(dim=16, layers=1, heads=2, train=TrainConfig(epochs=1, batch_size=128), eval_batch=256,
                 window_s=6 * 3600.0)


@pytest.fixture(scope="module")
def log(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prior") / "synth.csv"
    write_file(SynthConfig(users=30, events=3000, seed=5, days=4), path)
    return path


def _repeat_order(keys: np.ndarray) -> list[int]:
    """The context's distinct item keys, most recent first (repeat-recent's list)."""
    out: list[int] = []
    for k in keys[::-1].tolist():
        if k > 0 and k not in out:
            out.append(k)
    return out


def _top10_agrees(model, data, rows: np.ndarray) -> tuple[int, int]:
    """(rows whose model top-10 equals repeat-recent's determinate top-10, rows checked); where the
    context has fewer than 10 distinct items, repeat-recent ties the rest, so only its own items
    (the first positions) are compared."""
    vectors, bias = model.item_vectors(torch.from_numpy(data.catalogue_rows), torch.from_numpy(data.catalogue_cats))
    t = data.test
    agree = 0
    with torch.no_grad():
        for start in range(0, len(rows), 256):
            sel = rows[start:start + 256]
            b = to_batch(t, sel)
            z = model.score_catalogue(b, vectors, bias)  # [B, C]
            cand = candidates(torch.from_numpy(data.first_seen), torch.from_numpy(t.event_ts[sel]), b.keys)
            z = z.masked_fill(~cand, float("-inf"))
            top = (z.topk(10, dim=1).indices + 1).numpy()  # [B, 10] keys
            for b, i in enumerate(sel):
                want = _repeat_order(t.keys[i, :t.lengths[i]])[:10]
                agree += top[b, :len(want)].tolist() == want
    return agree, len(rows)


@pytest.mark.parametrize("name", ["tga", "sasrec_copy"])
def test_untrained_model_ranks_exactly_as_repeat_recent(log, name):
    data = build_data(load_events(log), CFG, progress=False)
    rows = np.flatnonzero(data.test.kind == RETRIEVAL)
    assert len(rows) > 100
    torch.manual_seed(0)
    model = build_model(name, CFG, data).eval()
    agree, n = _top10_agrees(model, data, rows)
    assert agree == n
    # the same holds for the mid-rank of every target that is in the context
    vectors, bias = model.item_vectors(torch.from_numpy(data.catalogue_rows), torch.from_numpy(data.catalogue_cats))
    b = to_batch(data.test, rows)
    with torch.no_grad():
        z = model.score_catalogue(b, vectors, bias)
    in_context = (b.keys == b.target_key.unsqueeze(1)).any(1).numpy()
    own = z.gather(1, (b.target_key - 1).unsqueeze(1)).squeeze(1)
    model_rank = 1 + ((z > own.unsqueeze(1)).sum(1)).numpy()
    assert in_context.sum() > 50
    np.testing.assert_array_equal(model_rank[in_context], repeat_ranks(data, rows)[in_context])


def test_untrained_model_ranks_as_repeat_recent_on_the_tmall_log():
    events = load_events(shared_data("tmall-brands-2014.csv"))
    cfg = replace(CFG, dim=32, window_s=86400.0)
    data = validation_as_test(build_data(events[:20000], cfg, progress=False))
    rows = np.flatnonzero(data.test.kind == RETRIEVAL)[:2000]
    assert len(rows) > 500
    torch.manual_seed(1)
    agree, n = _top10_agrees(build_model("tga", cfg, data).eval(), data, rows)
    assert agree == n


def test_repeat_features_count_distinct_items_by_recency():
    keys = torch.tensor([[5, 7, 5, 9, 7, 0]])  # oldest first, 0 = padding
    mask = keys > 0
    newest, rank, count = repeat_features(keys, mask)
    assert newest.tolist() == [[False, False, True, True, True, False]]
    assert rank[0, 2:5].tolist() == [2.0, 1.0, 0.0]  # 7 newest, then 9, then 5
    assert count[0, :5].tolist() == [2.0, 2.0, 2.0, 1.0, 2.0]


def test_training_moves_the_prior_and_the_pointer(log):
    data = build_data(load_events(log), CFG, progress=False)
    torch.manual_seed(0)
    model = build_model("tga", CFG, data)
    head = model.retrieval_head
    start = head.repeat_coefficients
    fit(model, data.train, replace(CFG.train, max_train_samples=1024), torch.device("cpu"), progress=False)
    moved = head.repeat_coefficients
    assert abs(moved["a"] - start["a"]) > 0.5  # the level learns (50× the learning rate)
    assert moved["gamma"] != 0.0
    assert float(head.ptr_query.weight.abs().sum()) > 0  # the learned pointer leaves its zero start


def test_a_checkpoint_config_without_the_prior_reads_as_no_prior():
    cfg = saved_model_config({"model_config": {"n_items": 10, "n_categories": 3}})
    assert cfg.repeat_prior is False
    assert saved_model_config({"model_config": {"n_items": 10, "n_categories": 3, "repeat_prior": True}}).repeat_prior


def test_a_checkpoint_config_from_before_the_bound_reads_as_unbounded():
    old = saved_model_config({"model_config": {"n_items": 10, "n_categories": 3, "repeat_prior": True}})
    assert old.pointer_bound == 0.0
    new = saved_model_config({"model_config": {"n_items": 10, "n_categories": 3, "repeat_prior": True,
                                               "pointer_bound": 8.0}})
    assert new.pointer_bound == 8.0


def _pointer_parts(bound: float, prior: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(pointer logits c [B, N], the same head's logits with a zero learned term) of a head whose
    learned pointer weights are scaled up ``scale``×: what the online learner's collapse looked like."""
    torch.manual_seed(0)
    head = RetrievalHead(8, copy=True, recency_buckets=24, repeat_prior=prior, repeat_start=20.0, pointer_bound=bound)
    torch.nn.init.normal_(head.ptr_query.weight, std=scale)
    torch.nn.init.normal_(head.ptr_key.weight, std=scale)
    u, states = torch.randn(4, 8) * 5, torch.randn(4, 6, 8) * 5  # [B, d], [B, N, d]
    keys = torch.tensor([[1, 2, 3, 2, 4, 5]] * 4)
    mask, lengths = keys > 0, torch.full((4,), 6)
    c = head.node_logits(u, states, mask, lengths, keys)
    with torch.no_grad():
        head.ptr_query.weight.zero_()
        head.ptr_query.bias.zero_()
    return c, head.node_logits(u, states, mask, lengths, keys)


def test_with_the_prior_the_learned_pointer_cannot_switch_the_pointer_off():
    c, prior_only = _pointer_parts(bound=8.0, prior=True, scale=3.0)
    learned = c - prior_only  # [B, N]: the learned bilinear term alone
    assert learned.abs().max() <= 8.0 + 1e-5
    assert learned.abs().max() > 7.0  # large weights reach the bound (this is not a vacuous check)
    c_free, prior_free = _pointer_parts(bound=0.0, prior=True, scale=3.0)
    assert (c_free - prior_free).abs().max() > 50.0  # unbounded, the same weights move it by far more


def test_without_the_prior_the_pointer_is_not_bounded():
    c, zero = _pointer_parts(bound=8.0, prior=False, scale=3.0)
    assert (c - zero).abs().max() > 50.0
