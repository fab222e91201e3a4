"""``tgastream bench index``: the cost of an API replica's item index at 100k and 1M items.

The replica keeps every item vector in one growing matrix, updated in place as item records
arrive on the embeddings topic (:class:`stream.materialize.LiveItemIndex`); a recommendation is one
matrix-vector product over it plus a partial sort (:func:`stream.serve.top_k`). This measures, per
catalogue size: building the index record by record, updating 10,000 items in place (a model
step's worth), and top-k latency (p50/p99), all in one process, side by side.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tgastream.core.settings import Settings
from tgastream.bench.report import write_json

HELP = "item index of an API replica: build, in-place updates and top-k latency at 100k and 1M items"


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--items", type=_ints, default=[100_000, 1_000_000], help="catalogue sizes (default: 100000,1000000)")
    p.add_argument("--dim", type=int, default=None, help="vector width (default: settings dim)")
    p.add_argument("--queries", type=int, default=200, help="top-k queries per size (default: 200)")
    p.add_argument("--k", type=int, default=10, help="k of top-k (default: 10)")
    p.add_argument("--json", type=Path, help="write the results as JSON here")


def run(args: argparse.Namespace, settings: Settings) -> int:
    import numpy as np
    from tqdm import tqdm

    from tgastream.core.errors import CommandError
    from tgastream.stream.materialize import LiveItemIndex
    from tgastream.stream.serve import top_k

    dim = args.dim or settings.dim
    if min(args.items, default=0) < args.k or args.queries < 1 or dim < 1:
        raise CommandError("--items must each be >= --k, --queries and --dim >= 1")
    rng = np.random.default_rng(settings.seed)
    rows = []
    for n in args.items:
        vectors = rng.standard_normal((n, dim), dtype=np.float32)  # [N, d]
        index = LiveItemIndex()
        t0 = time.perf_counter()
        for i in tqdm(range(n), desc=f"build {n:,}", unit="item", leave=False):
            index.put(f"i{i}", vectors[i])
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in rng.integers(0, n, 10_000):
            index.put(f"i{i}", vectors[i] * 0.5)
        update_ms = (time.perf_counter() - t0) * 1e3
        ids, matrix = index.get()
        exclude = {f"i{i}" for i in range(5)}
        lat = []
        for _ in range(args.queries):
            user = rng.standard_normal(dim, dtype=np.float32)
            t0 = time.perf_counter()
            top_k(user, ids, matrix, args.k, exclude)
            lat.append((time.perf_counter() - t0) * 1e3)
        lat_arr = np.asarray(lat)
        rows.append({"items": n, "dim": dim, "build_s": round(build_s, 3),
                     "build_items_per_s": round(n / build_s), "update_10k_ms": round(update_ms, 2),
                     "topk_p50_ms": round(float(np.quantile(lat_arr, 0.5)), 3),
                     "topk_p99_ms": round(float(np.quantile(lat_arr, 0.99)), 3),
                     "matrix_mb": round(matrix.nbytes / 2**20, 1)})
    print(f"{'items':>10} {'dim':>4} {'build s':>8} {'items/s':>10} {'10k updates ms':>15} {'top-k p50 ms':>13} "
          f"{'top-k p99 ms':>13} {'matrix MB':>10}")
    for r in rows:
        print(f"{r['items']:>10,} {r['dim']:>4} {r['build_s']:>8.2f} {r['build_items_per_s']:>10,} "
              f"{r['update_10k_ms']:>15.1f} {r['topk_p50_ms']:>13.2f} {r['topk_p99_ms']:>13.2f} {r['matrix_mb']:>10.1f}")
    write_json(args.json, {"rows": rows, "k": args.k, "queries": args.queries})
    return 0
