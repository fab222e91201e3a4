"""``tgastream bench trainer``: trained samples/s of the online learner with 1 rank and with 2
data-parallel ranks (torch.distributed: gloo on CPU, NCCL on CUDA), side by side in one run, on
the same stored sample stream, and where a step's time goes.

The stream: a seeded synthetic log turned into samples, stamped with partitions by user (as the
workers do) and stored as sample bytes. Rank r of W decodes the partitions p with p % W == r and
runs the trainer's per-step work on ``batch_size`` of them per step: row sync (a collective) and
the publish vectors, prequential scoring, one optimizer step on the union of the ranks' batches
(model/distributed.py). Every rank takes the same number of steps (a rank that ran out joins
with none). Trained samples/s = samples / wall time of the step loop (slowest rank).

Step split (seconds per step, rank 0): ``idmap_sync`` (row sync incl. its all-gather),
``publish`` (user and item vectors of the batch), ``score`` (prequential scoring: from the training forward's node states, inside ``learn``, where the model has no dropout),
``encode_forward`` (the encoder in the training forward pass), ``negatives_catalogue`` (the rest
of the loss: item lookups, in-batch and uniform negatives, pointer, heads), ``backward`` (what
``learn`` spends outside forward, collectives and the optimizer: batching, backward, clipping),
``all_reduce`` (target gather and the gradient all-reduce), ``optimizer`` (Adam), and
``kafka_decode`` (decoding the sample records: the trainer's per-record work on what Kafka
delivers; fetching and producing over the network are not part of this bench, see
``bench freshness`` for the whole pipeline).

FLOPs per trained sample are counted with ``torch.utils.flop_counter`` on one training step
(forward + backward of the loss; the fused TGA aggregation kernel is not a torch op and is not
counted: it is O(4·d) per node and head against the O(d²) projections) and set against this
machine's measured float32 matmul throughput on one thread.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

from tgastream.core.settings import Settings

HELP = "trained samples/s: 1 rank vs 2 data-parallel ranks on the same stored sample stream, and the step split"

PHASES = ("idmap_sync", "publish", "score", "encode_forward", "negatives_catalogue", "backward", "all_reduce",
          "optimizer", "kafka_decode")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from tgastream.stream.cli import add_setting_flags

    p.add_argument("--samples", type=int, default=8000, help="samples in the stored stream (default: 8000)")
    p.add_argument("--users", type=int, default=400, help="users of the synthetic log (default: 400)")
    p.add_argument("--ranks", default="1,2", help="rank counts to compare, comma-separated (default: 1,2)")
    p.add_argument("--rank-threads", type=int, default=1, help="torch threads per rank (default: 1)")
    p.add_argument("--partitions-of-stream", type=int, default=4, help="partitions of the stored stream (default: 4)")
    p.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="N runs of each rank count; rows and the ratio are the medians (default: 1)")
    p.add_argument("--json", type=Path, help="write the result here")
    add_setting_flags(p, "device", "dim", "layers", "heads", "batch_size", "sample_len", "lr", "seed")


def stored_stream(n_samples: int, users: int, partitions: int, sample_len: int, seed: int) -> list[tuple[int, bytes]]:
    """(partition, sample bytes) of a seeded synthetic stream: ~``n_samples`` samples."""
    from tgastream.core.events import BEHAVIORS, Event
    from tgastream.state.samples import samples_from_events
    from tgastream.stream.synth import SynthConfig, generate

    rows = generate(SynthConfig(users=users, events=int(n_samples / 1.45) + 200, seed=seed))
    events = [Event(str(u + 1), str(i + 1), str(c + 1), BEHAVIORS[b], float(ts)) for ts, u, i, c, b in rows]
    samples = samples_from_events(events, sample_len=sample_len, final_watermark=events[-1].ts + 2 * 86400)
    samples = samples[:n_samples]
    return [(zlib.crc32(s.user_id.encode()) % partitions, s.to_bytes()) for s in samples]


class Timers:
    """Seconds per phase; ``wrap`` times a function, ``inner`` times one only inside another."""

    def __init__(self) -> None:
        self.total: dict[str, float] = {k: 0.0 for k in PHASES}
        self.extra: dict[str, float] = {"vectors": 0.0, "learn": 0.0, "forward": 0.0}
        self.inside: set[str] = set()

    def add(self, name: str, dt: float) -> None:
        (self.total if name in self.total else self.extra)[name] += dt

    def wrap(self, name: str, fn, only_inside: str | None = None):
        def timed(*a, **kw):
            if only_inside is not None and only_inside not in self.inside:
                return fn(*a, **kw)
            self.inside.add(name)
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.add(name, time.perf_counter() - t0)
                self.inside.discard(name)
        return timed


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rank_main(rank: int, world: int, port: int, spec: dict, out_dir: str) -> None:
    """One rank: decode its partitions, step ``steps`` times with the others, write its times."""
    import json

    import torch

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(spec["threads"])
    import tgastream.model.online as online
    from tgastream.model.config import ModelConfig, OnlineConfig
    from tgastream.model.device import resolve_device
    from tgastream.model.distributed import init_group, rank_device
    from tgastream.state.samples import Sample

    device = resolve_device(rank_device(spec["device"], rank) if world > 1 else spec["device"])
    group = init_group(device) if world > 1 else None
    timers = Timers()
    online.sync_rows = timers.wrap("idmap_sync", online.sync_rows)
    online.global_view = timers.wrap("all_reduce", online.global_view)
    online.all_reduce_gradients = timers.wrap("all_reduce", online.all_reduce_gradients)
    model_cfg = ModelConfig(n_items=1, n_categories=1, dim=spec["dim"], layers=spec["layers"], heads=spec["heads"],
                            dropout=0.0)
    learner = online.OnlineLearner(model_cfg, OnlineConfig(lr=spec["lr"], device=str(device), threads=spec["threads"],
                                                           sample_len=spec["sample_len"], seed=spec["seed"]), group)
    m = learner.model
    m.loss = timers.wrap("forward", m.loss)
    m.encode = timers.wrap("encode_forward", m.encode, only_inside="forward")
    records = [b for p, b in _load(spec["stream"]) if p % world == rank]
    t0 = time.perf_counter()
    mine = [Sample.from_bytes(b) for b in records]
    timers.add("kafka_decode", time.perf_counter() - t0)
    bs = spec["batch_size"]
    steps = math.ceil(max(len(mine), 1) / bs)
    if group is not None:
        steps = int(group.all_max(torch.tensor([steps], dtype=torch.float64))[0])
        group.barrier()
    learner.optimizer.step = timers.wrap("optimizer", learner.optimizer.step)
    one_pass = learner.scores_from_training(0, bs)
    learner._score_from = timers.wrap("score", learner._score_from)  # inside learn: scores from its forward
    start, cpu0 = time.perf_counter(), time.process_time()
    for k in range(steps):
        if rank == 0 and spec.get("progress") and k % 10 == 0:
            print(f"\r  step {k}/{steps}", end="", file=sys.stderr, flush=True)
        batch = mine[k * bs:(k + 1) * bs]
        t = time.perf_counter()
        learner.note_predictions(learner.vectors(batch).clicks)  # (as the trainer: clicks predicted here)
        _sync(device)
        timers.add("vectors", time.perf_counter() - t)
        if not one_pass:  # (dropout: a scoring pass of its own)
            t = time.perf_counter()
            if batch:
                learner.score(batch, score_limit=bs)
            _sync(device)
            timers.add("score", time.perf_counter() - t)
        t = time.perf_counter()
        learner.learn(batch, score_limit=bs if one_pass else None)
        _sync(device)
        timers.add("learn", time.perf_counter() - t)
    if group is not None:
        group.barrier()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
    tt, ex = timers.total, timers.extra
    tt["publish"] = ex["vectors"] - tt["idmap_sync"]
    tt["negatives_catalogue"] = ex["forward"] - tt["encode_forward"]
    tt["backward"] = ex["learn"] - ex["forward"] - tt["all_reduce"] - tt["optimizer"] - (tt["score"] if one_pass else 0.0)
    out = {"one_pass": one_pass, "rank": rank, "world": world, "samples": len(mine), "steps": steps, "wall_s": wall, "cpu_s": cpu,
           "per_step_s": {k: v / steps for k, v in tt.items()}, "device": str(device),
           "loss": learner.last_loss, "version": learner.version}
    Path(out_dir, f"rank-{rank}.json").write_text(json.dumps(out))
    if group is not None:
        group.close()


def _save(path: Path, stream: list[tuple[int, bytes]]) -> None:
    import pickle

    path.write_bytes(pickle.dumps(stream))


def _load(path: str) -> list[tuple[int, bytes]]:
    import pickle

    return pickle.loads(Path(path).read_bytes())  # our own temp file, written by this run


def run_ranks(world: int, spec: dict) -> dict:
    """Run ``world`` ranks (spawned processes; one process, no group, for 1) and merge their times."""
    import json

    import torch.multiprocessing as mp

    from tgastream.stream.broker import free_port

    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_rank_main, args=(world, free_port(), spec, out), nprocs=world, join=True)  # 1 rank: no group
        ranks = [json.loads(Path(out, f"rank-{r}.json").read_text()) for r in range(world)]
    total = sum(r["samples"] for r in ranks)
    wall = max(r["wall_s"] for r in ranks)
    cpu = sum(r["cpu_s"] for r in ranks)
    return {"ranks": world, "threads": spec["threads"], "trained_samples_per_s": total / wall,
            "cpu_ms_per_sample": 1000 * cpu / max(total, 1),  # CPU time the ranks used (all their threads)
            "cpu_share": cpu / (wall * world),  # of the wall time, how much CPU each rank got on average
            "samples": total, "steps": ranks[0]["steps"], "wall_s": wall, "breakdown_s_per_step": ranks[0]["per_step_s"],
            "final_loss": ranks[0]["loss"], "model_version": ranks[0]["version"]}


def flops_per_sample(spec: dict, stream: list[tuple[int, bytes]]) -> float:
    """Forward + backward FLOPs of one training step on ``batch_size`` samples, per sample."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from tgastream.model.batching import collate
    from tgastream.model.vocab import RowKeys
    from tgastream.model.config import ModelConfig, OnlineConfig
    from tgastream.model.online import OnlineLearner
    from tgastream.state.samples import Sample

    learner = OnlineLearner(ModelConfig(n_items=1, n_categories=1, dim=spec["dim"], layers=spec["layers"],
                                        heads=spec["heads"], dropout=0.0),
                            OnlineConfig(device=spec["device"] if spec["device"] != "auto" else "cpu",
                                         threads=spec["threads"], sample_len=spec["sample_len"]))
    batch = [Sample.from_bytes(b) for _p, b in stream[: spec["batch_size"]]]
    learner.vectors(batch)
    vocabs = learner.rows.vocabs()
    enc = collate(batch, vocabs, learner.device, keys=RowKeys(vocabs.items))
    learner.model.train()
    with FlopCounterMode(display=False) as counter:
        learner.model.loss(enc).loss.backward()
    return counter.get_total_flops() / len(batch)


def matmul_flops_per_s(device_name: str, threads: int, seconds: float = 1.0) -> float:
    """Measured float32 matmul throughput ([512, 512] @ [512, 512]) on ``threads`` threads."""
    import torch

    from tgastream.model.device import resolve_device

    device = resolve_device(device_name)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    n = 2048 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    a @ b
    _sync(device)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    _sync(device)
    dt = time.perf_counter() - t0
    torch.set_num_threads(before)
    return 2 * n ** 3 * reps / dt


def _median_run(rows: list[dict]) -> dict:
    """The run with the median trained samples/s (its own step split; the others' rates kept)."""
    ordered = sorted(rows, key=lambda r: r["trained_samples_per_s"])
    return ordered[(len(ordered) - 1) // 2]


def format_table(result: dict) -> str:
    lines = [f"{'ranks':>5} {'threads':>7} {'samples':>8} {'steps':>6} {'wall s':>7} {'trained/s':>10} "
             f"{'CPU ms/sample':>14} {'CPU per rank':>13}"]
    for r in result["rows"]:
        lines.append(f"{r['ranks']:>5} {r['threads']:>7} {r['samples']:>8,} {r['steps']:>6} {r['wall_s']:>7.1f} "
                     f"{r['trained_samples_per_s']:>10,.0f} {r['cpu_ms_per_sample']:>14.2f} {r['cpu_share']:>13.0%}")
    if result["ratio_2_to_1"] is not None:
        lines.append(f"2 ranks / 1 rank: {result['ratio_2_to_1']:.2f}x")
    lines.append("")
    heads = [str(r["ranks"]) + " rank" + ("s" if r["ranks"] > 1 else "") for r in result["rows"]]
    lines.append(f"{'step time (ms per step, rank 0)':<32}" + "".join(f"{h:>12}" for h in heads))
    for k in PHASES:
        lines.append(f"{k:<32}" + "".join(f"{1000 * r['breakdown_s_per_step'][k]:>12.1f}" for r in result["rows"]))
    lines.append("")
    util = result["utilization_1_rank"]
    lines.append(f"FLOPs per trained sample (forward + backward): {result['flops_per_sample'] / 1e6:.1f} M; "
                 f"measured matmul: {result['matmul_gflops']:.1f} GFLOP/s"
                 + ("" if util is None else f"; 1 rank runs at {util:.1%} of it"))
    return "\n".join(lines)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from tgastream.bench.report import write_json
    from tgastream.core.errors import CommandError
    from tgastream.model.device import describe, resolve_device

    try:
        ranks = [int(x) for x in args.ranks.split(",") if x.strip()]
    except ValueError:
        raise CommandError(f"--ranks must be comma-separated integers, got {args.ranks!r}") from None
    if not ranks or min(ranks) < 1:
        raise CommandError(f"--ranks must be positive, got {args.ranks!r}")
    device = resolve_device(settings.device)
    if device.type == "cuda":
        import torch

        usable = [w for w in ranks if w <= torch.cuda.device_count()]  # one rank per GPU
        if usable != ranks:
            print(f"bench trainer: {torch.cuda.device_count()} GPU(s): running ranks {usable} (one rank per GPU)",
                  file=sys.stderr)
        ranks = usable
    if args.samples < settings.batch_size:
        raise CommandError(f"--samples ({args.samples}) must be at least --batch-size ({settings.batch_size})")
    print(f"bench trainer: building a stream of {args.samples:,} samples ...", file=sys.stderr, flush=True)
    stream = stored_stream(args.samples, args.users, args.partitions_of_stream, settings.sample_len, settings.seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "stream.pkl"
        _save(path, stream)
        spec = {"stream": str(path), "device": settings.device, "dim": settings.dim, "layers": settings.layers,
                "heads": settings.heads, "batch_size": settings.batch_size, "sample_len": settings.sample_len,
                "lr": settings.lr, "seed": settings.seed, "threads": args.rank_threads}
        runs: dict[int, list[dict]] = {w: [] for w in ranks}
        for k in range(max(1, args.repeat)):  # rank counts alternate within each repeat: side by side
            for world in ranks:
                print(f"bench trainer: {world} rank(s) x {args.rank_threads} thread(s) (run {k + 1}) ...",
                      file=sys.stderr, flush=True)
                runs[world].append(run_ranks(world, spec))
                print(f"bench trainer: {world} rank(s): {runs[world][-1]['trained_samples_per_s']:,.0f} trained samples/s",
                      file=sys.stderr, flush=True)
        rows = [_median_run(runs[w]) for w in ranks]
    by = {r["ranks"]: r for r in rows}
    ratios = [b["trained_samples_per_s"] / a["trained_samples_per_s"] for a, b in zip(runs.get(1, []), runs.get(2, []))]
    flops = flops_per_sample(spec, stream)
    peak = matmul_flops_per_s(settings.device, args.rank_threads)
    one = by.get(1)
    result = {
        "rows": rows,
        "ratio_2_to_1": statistics.median(ratios) if ratios else None,  # median of the runs' side-by-side ratios
        "ratios_2_to_1": ratios, "repeat": max(1, args.repeat),
        "runs": {str(w): [r["trained_samples_per_s"] for r in rs] for w, rs in runs.items()},
        "breakdown": {str(r["ranks"]): r["breakdown_s_per_step"] for r in rows},
        "flops_per_sample": flops, "matmul_gflops": peak / 1e9,
        "utilization_1_rank": (flops * one["trained_samples_per_s"] / peak) if one else None,
        "device": describe(device), "cpu_count": os.cpu_count(), "load_average": list(os.getloadavg()),
        "config": {k: v for k, v in spec.items() if k != "stream"} | {"samples": len(stream), "users": args.users},
    }
    print(format_table(result))
    write_json(args.json, result)
    return 0
