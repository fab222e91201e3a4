"""Data-parallel ranks compute what one process computes on the union of their batches: two
gloo ranks (real processes, torch.multiprocessing spawn), replay off, 20 steps that cross id-map
growth chunks and include an eviction, end with the parameters, optimizer state and id maps of
one process trained on the union batches."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from tgastream.core.events import BEHAVIORS, Event
from tgastream.model.config import ModelConfig, OnlineConfig
from tgastream.model.distributed import init_group
from tgastream.model.online import OnlineLearner
from tgastream.state.samples import samples_from_events
from tgastream.stream.broker import free_port
from tgastream.stream.synth import SynthConfig, generate

STEPS = 20
BATCH = 48  # union batch per step; rank 0 gets the first 30, rank 1 the rest (uneven on purpose)
SPLIT = 30
CHUNK = 64  # id-map growth chunk: the catalogue crosses several of them in 20 steps
EVICT_EVERY = 7  # eviction sweeps at steps 7 and 14
TTL_S = 3 * 86400.0  # event-time idle limit: some rows are idle that long in a 30-day synthetic log


def _samples() -> list:
    rows = generate(SynthConfig(users=50, events=4000, items=400, categories=30, seed=11))
    events = [Event(str(u + 1), str(i + 1), str(c + 1), BEHAVIORS[b], float(ts)) for ts, u, i, c, b in rows]
    smp = samples_from_events(events, sample_len=20, final_watermark=events[-1].ts + 2 * 86400)
    return smp[:: max(1, len(smp) // (STEPS * BATCH))][: STEPS * BATCH]  # spread over the log's time span


def _learner() -> OnlineLearner:
    torch.set_num_threads(1)
    # the conversion loss at weight 1 with its full gradient (every path into the encoder exercised).
    # Not the default 30: a parameter whose exact gradient is 0 in a step gets rounding noise (~1e-8
    # here: conversion_head.same_cat in step 1), and Adam's first step turns that into ±lr of random
    # sign, in one process as in two; at weight 1 the noise stays below Adam's eps (1e-8)
    model = ModelConfig(n_items=1, n_categories=1, dim=16, heads=2, layers=1, dropout=0.0, uniform_negatives=32,
                        conversion_weight=1.0, conversion_grad=1.0)
    cfg = OnlineConfig(device="cpu", threads=1, sample_len=20, chunk=CHUNK, replay_share=0.0, reservoir=0,
                       evict_every=EVICT_EVERY, idle_ttl_s=TTL_S, seed=3)
    return OnlineLearner(model, cfg, group=init_group(torch.device("cpu")))


def _train(learner: OnlineLearner, batches: list[list]) -> dict:
    log = []
    for b in batches:
        learner.vectors(b)  # rows for the batch's ids (a collective with ranks)
        loss = learner.learn(b)
        log.append((loss, learner.rows.items.capacity, learner.rows.items.evictions))
    return {"params": {k: v.detach().clone() for k, v in learner.model.state_dict().items()},
            "adam": [s["exp_avg_sq"].clone() for s in learner.optimizer.state.values()],
            "items": learner.rows.items.to_bytes(), "categories": learner.rows.categories.to_bytes(),
            "log": log}


def _rank(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    samples = _samples()
    batches = [samples[k * BATCH:(k + 1) * BATCH] for k in range(STEPS)]
    mine = [b[:SPLIT] if rank == 0 else b[SPLIT:] for b in batches]
    mine[5] = [] if rank == 1 else batches[5]  # one step where rank 1 has no samples and still joins
    learner = _learner()
    torch.save(_train(learner, mine), os.path.join(out_dir, f"rank-{rank}.pt"))
    learner.group.close()


def _determined(name: str, value: torch.Tensor) -> torch.Tensor:
    """Mask of the entries whose gradient is not zero by construction. The key bias of an
    attention layer (``qkv.bias[d:2d]``) adds the same q·b_k to every edge of a node, which the
    softmax cancels: its exact gradient is 0 and what it gets is rounding noise (~1e-10), which
    Adam normalises into lr-sized steps of random sign, in one process as in two."""
    keep = torch.ones_like(value, dtype=torch.bool)
    if name.endswith("qkv.bias"):
        d = value.shape[0] // 3
        keep[d:2 * d] = False
    return keep


def test_two_gloo_ranks_end_with_the_parameters_and_id_maps_of_one_process_on_the_union(tmp_path):
    mp.spawn(_rank, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank-{r}.pt", weights_only=False) for r in range(2)]

    samples = _samples()
    batches = [samples[k * BATCH:(k + 1) * BATCH] for k in range(STEPS)]
    one = _train(_learner(), batches)

    log = one["log"]
    assert log[-1][1] > 4 * CHUNK  # crossed growth chunks
    assert log[-1][2] > 0 and log[EVICT_EVERY - 2][2] == 0  # and evicted rows along the way
    for r, got in enumerate(ranks):
        assert got["items"] == one["items"] and got["categories"] == one["categories"], f"rank {r} id maps"
        assert [c for _l, c, _e in got["log"]] == [c for _l, c, _e in log]
        for (l_got, *_), (l_one, *_) in zip(got["log"], log):
            assert abs(l_got - l_one) < 1e-4 * max(1.0, abs(l_one))  # the union's loss, on every rank
        assert got["params"].keys() == one["params"].keys()
        for name, value in one["params"].items():
            keep = _determined(name, value)
            assert torch.allclose(got["params"][name][keep], value[keep], atol=1e-5), f"rank {r} {name}"
    for name in one["params"]:
        assert torch.equal(ranks[0]["params"][name], ranks[1]["params"][name])  # ranks agree exactly
