"""``tgastream bench index``: an API replica's item index, exact scan and approximate index side by
side, per catalogue size (100k and 1M items by default).

Per (size, method) in one process, on one synthetic clustered catalogue (item embeddings gather by
kind; the users are noisy copies of items): build time (every vector put, the index trained),
query latency p50/p99 with one client and with 8 concurrent clients (threads), updates per second
(vectors replaced in place, in chunks, while a client queries all the time, for ``--update-s``
seconds), recall@10 against the exact scan, and the memory the vectors take. Methods:
``exact`` (state/ann_index.py below ``ann_exact_below``) and ``faiss-ivf`` (above it, what the
replica serves with); ``--libraries`` adds the HNSW libraries that were weighed against it
(hnswlib, usearch, faiss HNSW) at the smallest size, through the same measurements.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path
from typing import Callable

from tgastream.core.settings import Settings
from tgastream.bench.report import write_json

HELP = "item index of an API replica: exact vs approximate top-k (build, updates while querying, p50/p99, recall@10, memory)"
CLIENTS = 8


def add_arguments(p: argparse.ArgumentParser) -> None:
    from tgastream.stream.cli import add_setting_flags, float_list, int_list

    add_setting_flags(p, "ann_exact_below", "ann_nprobe", "ann_lists_factor", "ann_update_chunk", "seed")
    p.add_argument("--items", type=int_list, default=[100_000, 1_000_000], help="catalogue sizes (default: 100000,1000000)")
    p.add_argument("--dim", type=int, default=None, help="vector width (default: settings dim)")
    p.add_argument("--queries", type=int, default=400, help="top-k queries per measurement (default: 400)")
    p.add_argument("--k", type=int, default=10, help="k of top-k (default: 10)")
    p.add_argument("--update-s", type=float, default=5.0, help="seconds of updates while querying (default: 5)")
    p.add_argument("--libraries", action="store_true",
                   help="also measure hnswlib, usearch and faiss HNSW at the smallest size (the choice of library)")
    p.add_argument("--sweep", action="store_true",
                   help="instead: at the largest --items, the approximate index at each --lists-factors (lists = "
                        "factor x sqrt(items)) with --nprobes each: recall@10 and one-client p50/p99 per setting")
    p.add_argument("--lists-factors", type=float_list, default=[2.0, 4.0, 8.0],
                   help="lists factors of --sweep (default: 2,4,8)")
    p.add_argument("--nprobes", type=int_list, default=[24, 48, 96, 160, 200, 256, 400],
                   help="nprobe values of --sweep (default: 24,48,96,160,200,256,400)")
    p.add_argument("--json", type=Path, help="write the results as JSON here")
    p.add_argument("--png", type=Path, help="plot latency and recall against catalogue size here")


def catalogue(n: int, dim: int, seed: int):
    """Clustered item vectors [n, d] (n/100 kinds) and the generator that made them."""
    import numpy as np

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // 100), dim), dtype=np.float32)
    x = centres[rng.integers(0, len(centres), n)] + 0.7 * rng.standard_normal((n, dim), dtype=np.float32)
    return x, rng


class _Method:
    """One index under test: build(ids, x), query(u, k) -> ids, replace(rows, x), memory_mb()."""

    name = ""

    def build(self, x) -> None: ...

    def query(self, u, k: int) -> list[int]: ...

    def replace(self, rows, x) -> None: ...

    def memory_mb(self) -> float: ...


class _Ours(_Method):
    """state/ann_index.py, forced exact or approximate."""

    def __init__(self, settings: Settings, exact: bool) -> None:
        from tgastream.state.ann_index import AnnConfig, ItemVectorIndex

        from tgastream.stream.configs import ann_config

        cfg = ann_config(settings)
        self.exact = exact
        self.name = "exact" if exact else "faiss-ivf"
        self.index = ItemVectorIndex(AnnConfig(exact_below=2**62, update_chunk=cfg.update_chunk) if exact else cfg)

    def build(self, x) -> None:
        self.ids = [str(i) for i in range(len(x))]
        self.index.put_many(self.ids, x)
        self.index.wait_built()

    def query(self, u, k: int) -> list[int]:
        return [int(i) for i, _ in self.index.top_k(u, k, exact=self.exact)]

    def replace(self, rows, x) -> None:
        self.index.put_many([self.ids[r] for r in rows], x)

    def memory_mb(self) -> float:
        return self.index.memory_bytes() / 2**20


class _Hnswlib(_Method):
    name = "hnswlib"

    def build(self, x) -> None:
        import hnswlib

        self.index = hnswlib.Index("ip", x.shape[1])
        self.index.init_index(len(x), M=16, ef_construction=100)
        self.index.set_num_threads(1)
        self.index.add_items(x, list(range(len(x))))
        self.index.set_ef(128)
        self.n, self.d = len(x), x.shape[1]

    def query(self, u, k: int) -> list[int]:
        return [int(i) for i in self.index.knn_query(u, k)[0][0]]

    def replace(self, rows, x) -> None:
        self.index.add_items(x, rows)

    def memory_mb(self) -> float:
        return self.n * (self.d * 4 + 16 * 2 * 4 + 8) / 2**20  # vectors + level-0 links (M = 16) + label


class _Usearch(_Method):
    name = "usearch"

    def build(self, x) -> None:
        import numpy as np
        from usearch.index import Index

        self.index = Index(ndim=x.shape[1], metric="ip", dtype="f32", connectivity=16, expansion_add=100,
                           expansion_search=128)
        self.index.add(np.arange(len(x)), x, threads=1)

    def query(self, u, k: int) -> list[int]:
        return [int(i) for i in self.index.search(u, k, threads=1).keys]

    def replace(self, rows, x) -> None:
        import numpy as np

        keys = np.asarray(rows, dtype=np.uint64)
        self.index.remove(keys)
        self.index.add(keys, x, threads=1)

    def memory_mb(self) -> float:
        return self.index.memory_usage / 2**20


class _FaissHnsw(_Method):
    name = "faiss-hnsw"

    def build(self, x) -> None:
        import faiss

        faiss.omp_set_num_threads(1)
        self.index = faiss.IndexHNSWFlat(x.shape[1], 16, faiss.METRIC_INNER_PRODUCT)
        self.index.hnsw.efConstruction = 100
        self.index.add(x)
        self.index.hnsw.efSearch = 128
        self.n, self.d = len(x), x.shape[1]

    def query(self, u, k: int) -> list[int]:
        return [int(i) for i in self.index.search(u[None, :], k)[1][0]]

    def replace(self, rows, x) -> None:
        raise NotImplementedError("faiss HNSW cannot remove or replace a vector")

    def memory_mb(self) -> float:
        return self.n * (self.d * 4 + 16 * 2 * 4) / 2**20


def exact_top(x, users, k: int) -> list[list[int]]:
    """The true top-k rows of each user by dot product (the reference of recall@k)."""
    import numpy as np

    out = []
    for start in range(0, len(users), 10):
        scores = users[start:start + 10] @ x.T  # [10, n]
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        out += [sorted(t.tolist(), key=lambda i, s=s: -s[i]) for t, s in zip(top, scores)]
    return out


RECALL_QUERIES = 100  # queries whose exact top-k is the reference of recall@k


def query_users(x, rng, queries: int):
    """Query vectors [Q, d]: random items of the catalogue plus unit Gaussian noise (users near
    what they like)."""
    import numpy as np

    return x[rng.integers(0, len(x), queries)] + rng.standard_normal((queries, x.shape[1]), dtype=np.float32)


def recall_at_k(found: list[list[int]], truth: list[list[int]], k: int) -> float:
    """Mean share of each query's true top-k that the index returned."""
    import numpy as np

    return float(np.mean([len(set(f) & set(t)) / k for f, t in zip(found, truth)]))


def _latencies(query: Callable, users, k: int, clients: int) -> list[float]:
    """Milliseconds per query, ``clients`` threads sharing ``users``."""
    out: list[float] = []
    lock = threading.Lock()

    def client(part) -> None:
        mine = []
        for u in part:
            t0 = time.perf_counter()
            query(u, k)
            mine.append((time.perf_counter() - t0) * 1e3)
        with lock:
            out.extend(mine)

    threads = [threading.Thread(target=client, args=(users[c::clients],)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def _updates_while_querying(method: _Method, x, rng, seconds: float, chunk: int, users, k: int) -> tuple[float, list[float]]:
    """Replace random vectors in chunks for ``seconds`` while one client queries without pause:
    (updates per second, the client's latencies in ms)."""
    import numpy as np

    stop = threading.Event()
    lat: list[float] = []

    def client() -> None:
        i = 0
        while not stop.is_set():
            t0 = time.perf_counter()
            method.query(users[i % len(users)], k)
            lat.append((time.perf_counter() - t0) * 1e3)
            i += 1

    t = threading.Thread(target=client)
    t.start()
    done, t0 = 0, time.perf_counter()
    try:
        while time.perf_counter() - t0 < seconds:
            rows = np.unique(rng.integers(0, len(x), chunk))  # one vector per item per chunk
            method.replace(rows.tolist(), x[rows] + 0.01 * rng.standard_normal((len(rows), x.shape[1]), dtype=np.float32))
            done += len(rows)
    except NotImplementedError:
        done = 0
    finally:
        elapsed = time.perf_counter() - t0
        stop.set()
        t.join()
    return done / elapsed, lat


def _measure(method: _Method, x, users, truth, k: int, rng, update_s: float, chunk: int) -> dict:
    import numpy as np
    from tqdm import tqdm

    t0 = time.perf_counter()
    method.build(x)
    build_s = time.perf_counter() - t0
    one = _latencies(method.query, users, k, 1)
    many = _latencies(method.query, users, k, CLIENTS)
    found = [method.query(u, k) for u in tqdm(users[:len(truth)], desc=f"recall {method.name}", leave=False)]
    recall = recall_at_k(found, truth, k)
    ups, during = _updates_while_querying(method, x, rng, update_s, chunk, users, k)

    def q(a, p):
        return round(float(np.quantile(np.asarray(a), p)), 3) if a else None

    return {"items": len(x), "method": method.name, "build_s": round(build_s, 2),
            "updates_per_s": round(ups), "topk_p50_ms": q(one, 0.5), "topk_p99_ms": q(one, 0.99),
            f"topk_p50_ms_{CLIENTS}_clients": q(many, 0.5), f"topk_p99_ms_{CLIENTS}_clients": q(many, 0.99),
            "topk_p99_ms_during_updates": q(during, 0.99), "recall@10": round(recall, 4),
            "memory_mb": round(method.memory_mb(), 1)}


def run(args: argparse.Namespace, settings: Settings) -> int:
    from tgastream.core.errors import CommandError

    dim = args.dim or settings.dim
    if min(args.items, default=0) < max(args.k, 1000) or args.queries < CLIENTS or dim < 1 or args.update_s <= 0:
        raise CommandError("--items must each be >= 1000 and >= --k, --queries >= 8, --dim >= 1, --update-s > 0")
    chunk = settings.ann_update_chunk
    if args.sweep:
        return sweep(args, settings, max(args.items), dim)
    rows = []
    for n in args.items:
        x, rng = catalogue(n, dim, settings.seed)
        users = query_users(x, rng, args.queries)
        methods: list[_Method] = [_Ours(settings, exact=True), _Ours(settings, exact=False)]
        if args.libraries and n == min(args.items):
            methods += [_Hnswlib(), _Usearch(), _FaissHnsw()]
        truth = exact_top(x, users[:RECALL_QUERIES], args.k)
        for m in methods:
            print(f"{n:,} items: {m.name} ...", flush=True)
            try:
                rows.append(_measure(m, x, users, truth, args.k, rng, args.update_s, chunk))
            except ImportError as exc:
                print(f"  skipped: {exc}")
                continue
            except Exception as exc:  # a library that fails one measurement must not lose the others
                if m.name in ("exact", "faiss-ivf"):
                    raise
                print(f"  {m.name} failed: {type(exc).__name__}: {exc}")
                continue
            print("  " + json.dumps(rows[-1]), flush=True)
    header = (f"{'items':>10} {'method':>10} {'build s':>8} {'updates/s':>10} {'p50 ms':>7} {'p99 ms':>7} "
              f"{'p50 8cl':>8} {'p99 8cl':>8} {'p99 upd':>8} {'recall@10':>9} {'MB':>7}")
    print(header)
    for r in rows:
        print(f"{r['items']:>10,} {r['method']:>10} {r['build_s']:>8.2f} {r['updates_per_s']:>10,} "
              f"{r['topk_p50_ms']:>7.2f} {r['topk_p99_ms']:>7.2f} {r['topk_p50_ms_8_clients']:>8.2f} "
              f"{r['topk_p99_ms_8_clients']:>8.2f} {r['topk_p99_ms_during_updates'] or 0:>8.2f} "
              f"{r['recall@10']:>9.3f} {r['memory_mb']:>7.1f}")
    from tgastream.stream.configs import ann_config

    cfg = ann_config(settings)
    write_json(args.json, {"rows": rows, "k": args.k, "dim": dim, "queries": args.queries, "clients": CLIENTS,
                           "update_chunk": chunk, "update_s": args.update_s, "nprobe": cfg.nprobe,
                           "lists_factor": cfg.lists_factor, "recall_queries": RECALL_QUERIES,
                           "catalogue": "clustered: n/100 Gaussian centres, noise 0.7; users = item + N(0, 1)"})
    if args.png:
        _plot(rows, args.png)
    return 0


def sweep(args: argparse.Namespace, settings: Settings, n: int, dim: int) -> int:
    """Recall@10 and latency of the approximate index against its two knobs, on one catalogue:
    the lists (``lists_factor`` x sqrt(n), fixed at build) and the lists probed per query (nprobe,
    changed in place): the evidence for the defaults (docs/scaling.md)."""
    import dataclasses

    import numpy as np

    from tgastream.state.ann_index import ItemVectorIndex
    from tgastream.stream.configs import ann_config

    x, rng = catalogue(n, dim, settings.seed)
    users = query_users(x, rng, args.queries)
    truth = exact_top(x, users[:RECALL_QUERIES], args.k)
    ids = [str(i) for i in range(n)]
    rows = []
    for factor in args.lists_factors:
        index = ItemVectorIndex(dataclasses.replace(ann_config(settings), exact_below=0, lists_factor=factor))
        t0 = time.perf_counter()
        index.put_many(ids, x)
        index.wait_built()
        build_s = time.perf_counter() - t0
        for nprobe in args.nprobes:
            index.set_nprobe(nprobe)

            def query(u, k: int) -> list[int]:
                return [int(i) for i, _ in index.top_k(u, k)]

            lat = np.asarray(_latencies(query, users, args.k, 1))
            found = [query(u, args.k) for u in users[:len(truth)]]
            recall = recall_at_k(found, truth, args.k)
            rows.append({"items": n, "lists_factor": factor, "lists": index.lists, "nprobe": nprobe,
                         "build_s": round(build_s, 2), "recall@10": round(recall, 4),
                         "topk_p50_ms": round(float(np.quantile(lat, 0.5)), 3),
                         "topk_p99_ms": round(float(np.quantile(lat, 0.99)), 3)})
            print("  " + json.dumps(rows[-1]), flush=True)
    print(f"{'items':>10} {'lists':>6} {'nprobe':>6} {'recall@10':>9} {'p50 ms':>7} {'p99 ms':>7}")
    for r in rows:
        print(f"{r['items']:>10,} {r['lists']:>6} {r['nprobe']:>6} {r['recall@10']:>9.3f} "
              f"{r['topk_p50_ms']:>7.2f} {r['topk_p99_ms']:>7.2f}")
    write_json(args.json, {"rows": rows, "k": args.k, "dim": dim, "queries": args.queries, "recall_queries": RECALL_QUERIES,
                           "catalogue": "clustered: n/100 Gaussian centres, noise 0.7; users = item + N(0, 1)"})
    return 0


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name in sorted({r["method"] for r in rows}):
        mine = sorted((r for r in rows if r["method"] == name), key=lambda r: r["items"])
        xs = [r["items"] for r in mine]
        axes[0].plot(xs, [r["topk_p99_ms"] for r in mine], marker="o", label=f"{name} p99")
        axes[0].plot(xs, [r["topk_p50_ms"] for r in mine], marker=".", linestyle="--", label=f"{name} p50")
        axes[1].plot(xs, [r["updates_per_s"] for r in mine], marker="o", label=name)
    for ax, title in zip(axes, ("top-10 latency (ms, one client)", "updates/s while querying")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("items")
        ax.set_title(title)
        ax.legend(fontsize=7)
    axes[0].axhline(5, color="grey", linewidth=0.5)
    axes[1].axhline(10_000, color="grey", linewidth=0.5)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
