"""``tgastream bench scale``: what a stream worker's state and the trainer's id maps cost as the
number of users and ids grows (10k, 100k, 1M users; 1M and 10M ids).

Workers: driven through the state layer directly (stream/processor.py on a state/store.py
StateStore, the code a worker runs per fetched batch), not through Kafka: the broker is not what
grows with users. Per user count U, in a fresh child process:

1. *Fill*: U users with history lengths drawn from the real per-user event counts of a Taobao
   file (complete 9-day histories, ``--histories``; capped at ``max_len`` by the graph window).
   Their records are made by the worker's own code: a pool of ``--pool`` users' synthetic events
   (Zipf items over a 4M catalogue, Taobao's behavior mix) is processed once, and each of the U
   users stores one pool record (pool user ``u % pool``) under its own key. So the bytes are
   real records' bytes, written in batches as the worker persists them.
2. *Stream*: ``--events`` new events over the U users (a user's chance ∝ its history length), in
   batches of ``worker_batch`` records per partition, persisted like the worker does (snapshot of
   the changed users → one RocksDB write batch) every ``--persist-every`` events; users beyond the
   processor's cache (``worker_cache_users``) are read back from RocksDB. Measured: events/s,
   p99 of a batch's apply time and of a persist, RocksDB bytes per user live and after a full
   compaction, the process's resident memory.

Trainer: an :class:`~state.idmap.IdMap` filled to N ids (1M, 10M) in batches, its memory and
snapshot bytes, an eviction sweep of half of them; and the cost of growing the item table with its
Adam state by one chunk (model/rows.py) at N rows, measured at 1M (and computed for more).
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

from tgastream.core.settings import Settings
from tgastream.bench.report import write_json

HELP = "state cost against users and ids: worker events/s, update p99, RocksDB bytes per user, memory; trainer id maps"
DEFAULT_HISTORIES = Path("../shared/data/taobao-users-60k.csv")
BEHAVIORS = ("click", "fav", "cart", "buy")
BEHAVIOR_MIX = (0.892, 0.031, 0.055, 0.022)  # Taobao UserBehavior: pv / fav / cart / buy


def add_arguments(p: argparse.ArgumentParser) -> None:
    from tgastream.stream.cli import add_setting_flags, int_list

    p.add_argument("--users", type=int_list, default=[10_000, 100_000, 1_000_000], help="user counts (default: 10000,100000,1000000)")
    p.add_argument("--ids", type=int_list, default=[1_000_000, 10_000_000], help="trainer id-map sizes (default: 1000000,10000000)")
    p.add_argument("--histories", type=Path, default=DEFAULT_HISTORIES,
                   help="Taobao-format CSV whose per-user event counts give the history lengths (default: %(default)s)")
    p.add_argument("--pool", type=int, default=1000, help="distinct users processed to make the records (default: 1000)")
    p.add_argument("--events", type=int, default=30_000, help="stream events per user count (default: 30000)")
    p.add_argument("--persist-every", type=int, default=5_000, help="events between persists (default: 5000)")
    p.add_argument("--rows-at", type=int, default=1_000_000, help="table rows at which one growth step is timed (default: 1000000)")
    p.add_argument("--json", type=Path, help="write the results as JSON here")
    p.add_argument("--png", type=Path, help="plot cost against users here")
    add_setting_flags(p, "max_len", "sample_len", "partitions", "worker_batch", "worker_cache_users", "seed")


# ---- inputs ------------------------------------------------------------------------------------

def history_lengths(path: Path) -> list[int]:
    """Events per user in a Taobao-format CSV (``user,item,category,behavior,ts``)."""
    counts: Counter = Counter()
    with open(path) as f:
        for line in f:
            counts[line.split(",", 1)[0]] += 1
    return sorted(counts.values())


class _Rec:
    __slots__ = ("offset", "key", "value")

    def __init__(self, offset: int, key: bytes, value: bytes) -> None:
        self.offset, self.key, self.value = offset, key, value


class _CountSink:
    """Samples and rejects counted, not kept (the worker's producer is not under test)."""

    def __init__(self) -> None:
        self.samples = self.rejects = 0

    def sample(self, partition, key, value) -> None:
        self.samples += 1

    def reject(self, partition, key, value, headers) -> None:
        self.rejects += 1


def _events(rng, users: list[str], n: int, t0: float, span_s: float) -> list[tuple[str, bytes]]:
    """``n`` events of ``users`` (in that order of arrival), Zipf items over a 4M catalogue."""
    import numpy as np

    from tgastream.core.events import Event

    items = np.minimum(rng.zipf(1.3, n), 4_000_000) * 7919 % 5_000_000  # [n] skewed, spread ids
    cats = items % 9439
    beh = rng.choice(4, n, p=BEHAVIOR_MIX)
    ts = t0 + np.sort(rng.uniform(0, span_s, n))
    return [(u, Event(u, str(int(i)), str(int(c)), BEHAVIORS[b], float(round(t, 3))).to_json())
            for u, i, c, b, t in zip(users, items, cats, beh, ts)]


def _user_id(u: int) -> str:
    return str(1_000_000 + u)  # Taobao-like numeric ids


# ---- one worker at U users (runs in a child process) -------------------------------------------

def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _pool_records(settings: Settings, lengths: list[int], pool: int, seed: int, root: Path) -> tuple[list[bytes], float]:
    """Records of ``pool`` users whose histories (lengths drawn from ``lengths``) went through the
    worker's processor; and the latest event time in them."""
    import numpy as np

    from tgastream.state.store import StateStore
    from tgastream.stream.processor import Processor, ProcessorConfig

    rng = np.random.default_rng(seed)
    sizes = rng.choice(lengths, pool)
    users = [f"p{j}" for j, s in enumerate(sizes) for _ in range(s)]
    order = rng.permutation(len(users))
    users = [users[j] for j in order]
    t_end = time.time() - 86_400
    events = _events(rng, users, len(users), t_end - 9 * 86_400, 9 * 86_400)
    store = StateStore(root / "pool", "state")
    proc = Processor(store, ProcessorConfig(max_len=settings.max_len, sample_len=settings.sample_len,
                                            max_cached_users=pool + 1), _CountSink())
    recs = [_Rec(o, u.encode(), v) for o, (u, v) in enumerate(events)]
    for start in range(0, len(recs), 5000):
        proc.process(0, recs[start:start + 5000])
    snap = proc.snapshot()
    out = [snap.puts[0][f"p{j}".encode()] for j in range(pool)]
    store.destroy()
    return out, t_end


def _worker_at(users: int, settings: Settings, args: argparse.Namespace, pool: list[bytes], weights,
               t_end: float, root: Path) -> dict:
    import numpy as np

    from tgastream.state.store import StateStore
    from tgastream.stream.processor import Processor, ProcessorConfig

    parts = settings.partitions
    store = StateStore(root / f"u{users}", "state")
    rss0 = _rss_mb()
    # 1. fill: every user holds a record the processor made
    t0 = time.perf_counter()
    batch: dict[int, dict[bytes, bytes]] = {p: {} for p in range(parts)}
    for u in range(users):
        key = _user_id(u)
        batch[u % parts][key.encode()] = pool[u % len(pool)]
        if u % 20_000 == 19_999 or u == users - 1:
            for p, puts in batch.items():
                store.partition(p).write(puts)
                puts.clear()
    fill_s = time.perf_counter() - t0
    # 2. stream: new events over those users, by activity
    rng = np.random.default_rng(args.seed + users)
    p_user = weights[np.arange(users) % len(pool)].astype(np.float64)
    who = rng.choice(users, args.events, p=p_user / p_user.sum())
    events = _events(rng, [_user_id(int(u)) for u in who], args.events, t_end + 60, 3600)
    proc = Processor(store, ProcessorConfig(max_len=settings.max_len, sample_len=settings.sample_len,
                                            max_cached_users=settings.worker_cache_users), _CountSink())
    queues: dict[int, list[_Rec]] = {p: [] for p in range(parts)}
    offsets = [10**12] * parts  # past every offset the pool records hold
    apply_ms, persist_ms = [], []
    since = 0
    t0 = time.perf_counter()

    def persist() -> None:
        ts = time.perf_counter()
        snap = proc.snapshot()
        for p, puts in snap.puts.items():
            store.partition(p).write(puts)
        proc.persisted(snap)
        persist_ms.append((time.perf_counter() - ts) * 1e3)

    def flush(p: int) -> None:
        if queues[p]:
            stats = proc.process(p, queues[p])
            apply_ms.append(stats.apply_s * 1e3)
            queues[p] = []

    for (uid, value), u in zip(events, who):
        p = int(u) % parts
        queues[p].append(_Rec(offsets[p], uid.encode(), value))
        offsets[p] += 1
        if len(queues[p]) >= settings.worker_batch:
            flush(p)
        since += 1
        if since >= args.persist_every:
            for q in range(parts):
                flush(q)
            persist()
            since = 0
    for q in range(parts):
        flush(q)
    persist()
    stream_s = time.perf_counter() - t0
    # 3. bytes: live (SST + memtables), then after flushing and compacting everything
    live = sum(s.bytes for s in store.stats().values())
    rss = _rss_mb()
    for p in range(parts):
        db = store.partition(p).db
        db.flush()
        db.compact_range(None, None)
    compacted = sum(s.bytes for s in store.stats().values())
    disk = _dir_bytes(store.root)
    row = {"users": users, "fill_s": round(fill_s, 1), "events": args.events,
           "events_per_s": round(args.events / stream_s), "apply_batch": settings.worker_batch,
           "update_p50_ms": round(float(np.quantile(apply_ms, 0.5)), 2),
           "update_p99_ms": round(float(np.quantile(apply_ms, 0.99)), 2),
           "persist_p99_ms": round(float(np.quantile(persist_ms, 0.99)), 1),
           "bytes_per_user_live": round(live / users), "bytes_per_user_compacted": round(compacted / users),
           "disk_bytes_per_user": round(disk / users), "cached_users": proc.cached_users,
           "rss_mb": round(rss, 1), "rss_growth_mb": round(rss - rss0, 1)}
    store.destroy()
    return row


def _child(fn, conn, *a) -> None:
    try:
        conn.send(fn(*a))
    except BaseException as exc:  # report, never hang the parent
        conn.send({"error": f"{type(exc).__name__}: {exc}"})
    finally:
        conn.close()


def _in_child(fn, *a) -> dict:
    """``fn(*a)`` in a fresh process: each size's memory is its own, freed after (spawned, not
    forked: RocksDB's background threads in this process must not be copied mid-lock)."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(fn, child, *a))
    proc.start()
    child.close()
    result = parent.recv()
    proc.join()
    return result


# ---- trainer id maps and table rows ------------------------------------------------------------

def _idmap_at(n: int, chunk: int) -> dict:
    import numpy as np

    from tgastream.state.idmap import IdMap

    rss0 = _rss_mb()
    m = IdMap(chunk)
    t0 = time.perf_counter()
    step = max(1, min(100_000, n // 10))  # ids of one batch share a use time
    for start in range(0, n, step):
        m.lookup([str(10_000_000 + i) for i in range(start, min(n, start + step))], now=float(start))
    fill_s = time.perf_counter() - t0
    rss = _rss_mb()
    t0 = time.perf_counter()
    snap = len(m.to_bytes())
    snap_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    freed = len(m.evict(now=float(n), ttl_s=n / 2))  # the older half was idle
    evict_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    m.lookup([str(90_000_000 + i) for i in range(min(freed, 100_000))], now=float(n + 1))  # reuse freed rows
    reuse_s = time.perf_counter() - t0
    del np
    return {"ids": n, "fill_s": round(fill_s, 1), "ids_per_s": round(n / fill_s), "memory_mb": round(rss - rss0, 1),
            "bytes_per_id": round((rss - rss0) * 2**20 / n), "snapshot_mb": round(snap / 2**20, 1),
            "snapshot_s": round(snap_s, 2), "evicted": freed, "evict_s": round(evict_s, 2),
            "reuse_100k_s": round(reuse_s, 2), "capacity": m.capacity}


def _table_growth_at(rows: int, dim: int, chunk: int) -> dict:
    """One growth step (``chunk`` rows) of an item table with Adam state at ``rows`` rows."""
    import torch
    from torch import nn

    from tgastream.model.rows import _grow_parameter

    torch.set_num_threads(1)
    emb = nn.Embedding(rows, dim)
    opt = torch.optim.Adam(emb.parameters(), lr=1e-3)
    emb(torch.arange(8)).sum().backward()
    opt.step()  # Adam state exists: [rows, dim] twice
    t0 = time.perf_counter()
    _grow_parameter(emb, "weight", rows + chunk, opt, 0.05)
    grow_s = time.perf_counter() - t0
    table_mb = rows * dim * 4 * 3 / 2**20
    return {"rows": rows, "dim": dim, "chunk": chunk, "grow_step_s": round(grow_s, 3),
            "table_with_adam_mb": round(table_mb),
            "amortised_us_per_new_id": round(grow_s / chunk * 1e6, 1)}


# ---- the command -------------------------------------------------------------------------------

def run(args: argparse.Namespace, settings: Settings) -> int:
    import numpy as np

    from tgastream.core.errors import CommandError
    from tgastream.model.config import OnlineConfig

    if not args.histories.exists():
        raise CommandError(f"--histories {args.histories}: no such file (a Taobao-format CSV)")
    if min(args.users, default=1) < 1 or args.pool < 1 or args.events < 1 or args.persist_every < 1:
        raise CommandError("--users, --pool, --events and --persist-every must be >= 1")
    args.seed = settings.seed
    lengths = history_lengths(args.histories)
    capped = [min(n, settings.max_len) for n in lengths]
    print(f"history lengths from {args.histories.name}: {len(lengths)} users, median {int(np.median(lengths))}, "
          f"mean {np.mean(lengths):.0f} (mean {np.mean(capped):.0f} kept in the {settings.max_len}-event window)")
    root = Path(tempfile.mkdtemp(prefix="tgastream-scale-", dir=os.environ.get("TMPDIR")))
    try:
        t0 = time.perf_counter()
        pool, t_end = _pool_records(settings, lengths, args.pool, settings.seed, root)
        pool_events = sum(np.random.default_rng(settings.seed).choice(lengths, args.pool))
        print(f"pool: {args.pool} users, {pool_events:,} events through the processor in {time.perf_counter() - t0:.0f} s")
        weights = np.random.default_rng(settings.seed).choice(lengths, args.pool)
        gc.collect()
        workers = []
        for u in args.users:
            print(f"worker at {u:,} users ...", flush=True)
            row = _in_child(_worker_at, u, settings, args, pool, weights, t_end, root)
            if "error" in row:
                raise CommandError(f"worker at {u} users: {row['error']}")
            workers.append(row)
            print("  " + json.dumps(row), flush=True)
        chunk = OnlineConfig().chunk
        idmaps = []
        for n in args.ids:
            print(f"id map at {n:,} ids ...", flush=True)
            row = _in_child(_idmap_at, n, chunk)
            if "error" in row:
                raise CommandError(f"id map at {n}: {row['error']}")
            idmaps.append(row)
            print("  " + json.dumps(row), flush=True)
        print(f"item table growth step at {args.rows_at:,} rows ...", flush=True)
        growth = _in_child(_table_growth_at, args.rows_at, settings.dim, chunk)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    _print(workers, idmaps, growth)
    write_json(args.json, {"workers": workers, "idmaps": idmaps, "table_growth": growth,
                           "histories": str(args.histories.name), "history_median": int(np.median(lengths)),
                           "history_mean_kept": round(float(np.mean(capped)), 1), "pool": args.pool,
                           "partitions": settings.partitions, "worker_cache_users": settings.worker_cache_users,
                           "driven": "state layer directly (stream/processor.py + state/store.py), no Kafka"})
    if args.png:
        _plot(workers, idmaps, args.png)
    return 0


def _print(workers: list[dict], idmaps: list[dict], growth: dict) -> None:
    print(f"{'users':>10} {'events/s':>9} {'upd p50 ms':>10} {'upd p99 ms':>10} {'persist p99':>11} "
          f"{'B/user live':>11} {'B/user comp':>11} {'RSS MB':>7} {'fill s':>7}")
    for r in workers:
        print(f"{r['users']:>10,} {r['events_per_s']:>9,} {r['update_p50_ms']:>10.1f} {r['update_p99_ms']:>10.1f} "
              f"{r['persist_p99_ms']:>11.1f} {r['bytes_per_user_live']:>11,} {r['bytes_per_user_compacted']:>11,} "
              f"{r['rss_mb']:>7.0f} {r['fill_s']:>7.1f}")
    print(f"{'ids':>10} {'ids/s':>9} {'MB':>7} {'B/id':>6} {'snapshot MB':>11} {'evict s':>8}")
    for r in idmaps:
        print(f"{r['ids']:>10,} {r['ids_per_s']:>9,} {r['memory_mb']:>7.0f} {r['bytes_per_id']:>6} "
              f"{r['snapshot_mb']:>11.1f} {r['evict_s']:>8.2f}")
    print(f"table growth: {growth}")


def _plot(workers: list[dict], idmaps: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    us = [r["users"] for r in workers]
    axes[0].plot(us, [r["events_per_s"] for r in workers], marker="o", label="events/s")
    axes[0].set_title("worker events/s")
    axes[1].plot(us, [r["bytes_per_user_live"] for r in workers], marker="o", label="live")
    axes[1].plot(us, [r["bytes_per_user_compacted"] for r in workers], marker="o", label="compacted")
    axes[1].set_title("RocksDB bytes per user")
    ax2 = axes[1].twinx()
    ax2.plot(us, [r["rss_mb"] for r in workers], marker="s", color="grey", label="RSS MB")
    ax2.set_ylabel("worker RSS MB")
    axes[2].plot(us, [r["update_p99_ms"] for r in workers], marker="o", label="batch apply p99")
    axes[2].plot(us, [r["persist_p99_ms"] for r in workers], marker="o", label="persist p99")
    axes[2].set_title("ms")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("users")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
