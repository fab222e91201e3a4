"""An API replica's item vectors, searchable by dot product: an exact scan below a size, an
approximate index (faiss ``IndexIVFFlat``, inner product) above it, both updated in place.

Why faiss IVF-Flat (measured side by side, docs/scaling.md): replacing a vector is a remove and an
add in one inverted list (tens of thousands per second on one core), where an HNSW graph
(hnswlib, usearch, faiss HNSW) repairs neighbour links on every replace (~1-2k/s) and builds 3-8×
slower; and an IVF list holds the vectors themselves, so the scores it returns are exact dot
products: only which items are scored is approximate.

Layout: row ``r`` of ``matrix`` [capacity, d] holds one item's vector; the faiss index knows the
item by its row number. Removed rows are marked dead and reused. A query scores
``⟨user, item⟩`` over the ``nprobe`` inverted lists whose centroids score highest with the user
(IVF) or over every live row (exact), drops excluded items, and returns the k best.

Concurrency: one first-come-first-served lock guards the matrix and the faiss index. Writers take
it per chunk of at most ``update_chunk`` vectors, so a query waits for at most one chunk (a bounded
time) plus the queries queued before it. The costly part of adding a vector to the IVF, finding its
list among all the centroids, is done before taking the lock (the centroids are fixed between
builds); under it, only the removal and the list appends; and being FIFO, a stream of queries cannot starve the
writer either (Python's plain lock lets the thread that releases it take it again at once). A (re)build
(the catalogue crossed ``exact_below`` or grew ``rebuild_growth``×) trains on a snapshot in a
background thread without the lock, then replays the rows changed meanwhile, chunk by chunk, and
swaps the new index in; queries keep being served by the old index (or the exact scan) until then.
"""

from __future__ import annotations

import heapq
import math
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Iterable, Iterator

import numpy as np


@dataclass(frozen=True)
class AnnConfig:
    """How the item index searches; ``stream.configs.ann_config`` makes one from the settings."""

    exact_below: int = 50_000  # fewer live items than this: exact scan (also the reference)
    nprobe: int = 96  # inverted lists scanned per query (recall@10 0.969 at 1M items: docs/scaling.md)
    lists_factor: float = 8.0  # inverted lists = lists_factor × √items at (re)build (8,000 at 1M)
    train_per_list: int = 40  # k-means training sample = this × lists
    update_chunk: int = 256  # most vectors written under the lock at once (bounds a query's wait)
    rebuild_growth: float = 2.0  # rebuild when the catalogue is this many times its size at build
    threads: int = 1  # faiss OpenMP threads (1: an API replica serves from one core per process)
    seed: int = 0


def _faiss(threads: int):
    """faiss, with its OpenMP team for the calling thread set to ``threads``: the setting is per
    thread, and faiss's default team (every core) spin-waits on a loaded machine, making a
    256-vector add take ~70 ms instead of ~1 ms."""
    import faiss

    faiss.omp_set_num_threads(max(1, threads))
    return faiss


class FairLock:
    """A readers-writer lock granted in arrival order (tickets): ``with lock`` is exclusive (a
    writer), ``with lock.shared()`` lets consecutive readers in together, at most ``max_shared`` at
    once (the cores: more runnable query threads than cores only queue in the scheduler, where
    the slowest wait longest). Nobody overtakes an earlier ticket, so a writer waits only for the
    readers admitted before it and a reader behind a waiting writer waits for it: neither side
    starves, and a query waits for at most the one update chunk ahead of it."""

    def __init__(self, max_shared: int = 1) -> None:
        self.max_shared = max(1, max_shared)
        self._cond = threading.Condition(threading.Lock())
        self._next = 0  # the next ticket to hand out
        self._serving = 0  # the earliest ticket not admitted yet
        self._readers = 0  # admitted readers still inside
        self._writer = False  # an admitted writer is inside

    def __enter__(self) -> "FairLock":
        with self._cond:
            ticket = self._take()
            while ticket != self._serving or self._writer or self._readers:
                self._cond.wait()
            self._serving += 1
            self._writer = True
        return self

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._writer = False
            self._cond.notify_all()

    @contextmanager
    def shared(self) -> Iterator[None]:
        """Held with other readers (never with a writer)."""
        with self._cond:
            ticket = self._take()
            while ticket != self._serving or self._writer or self._readers >= self.max_shared:
                self._cond.wait()
            self._serving += 1
            self._readers += 1
            self._cond.notify_all()  # the next ticket may be a reader too
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    def _take(self) -> int:
        ticket = self._next
        self._next += 1
        return ticket


def _exact_top(scores: np.ndarray, want: int) -> np.ndarray:
    """Positions of the ``want`` highest ``scores``, best first (stable for ties)."""
    if want < len(scores):
        top = np.argpartition(-scores, want - 1)[:want]
    else:
        top = np.arange(len(scores))
    return top[np.argsort(-scores[top], kind="stable")]


class ItemVectorIndex:
    """Item id → vector (+ optional category), top-k by dot product with filters."""

    def __init__(self, config: AnnConfig | None = None) -> None:
        self.config = config or AnnConfig()
        self._lock = FairLock(max_shared=os.cpu_count() or 1)
        self._build_lock = threading.Lock()
        self._one_build = threading.Lock()
        self._ivf = None  # faiss.IndexIVFFlat over live rows (ids = row numbers), or None
        self._ivf_items = 0  # live items when the current IVF was built
        self._building: threading.Thread | None = None
        self._dirty: set[int] | None = None  # rows changed while a build runs
        self._pending_cat: dict[str, str] = {}  # categories of items with no vector yet
        self.builds = 0
        self.last_build_s = 0.0
        self._reset(0)

    # ---- state -------------------------------------------------------------------------------
    def _reset(self, dim: int) -> None:
        self.matrix = np.zeros((0, dim), dtype=np.float32)  # [capacity, d]
        self.live = np.zeros(0, dtype=bool)  # [capacity]
        self.cat_of = np.zeros(0, dtype=np.int32)  # [capacity] category code, -1 = none
        self.ids: list[str | None] = []  # row → item id (None: a free row)
        self.rows: dict[str, int] = {}
        self._free: list[int] = []  # min-heap of free rows, reused lowest first
        self._cat_codes: dict[str, int] = {}
        self._cat_rows: dict[int, set[int]] = {}
        self._ivf, self._ivf_items = None, 0
        if self._dirty is not None:
            self._dirty = set()

    @property
    def dim(self) -> int:
        return self.matrix.shape[1]

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def approximate(self) -> bool:
        """Whether a query (with no category filter) is answered by the IVF index now."""
        return self._ivf is not None and len(self.rows) >= self.config.exact_below

    def _grow(self, need: int) -> None:
        cap = self.matrix.shape[0]
        if need <= cap:
            return
        new = max(1024, 2 * cap, need)
        m = np.zeros((new, self.dim), dtype=np.float32)
        m[:cap] = self.matrix
        live = np.zeros(new, dtype=bool)
        live[:cap] = self.live
        cat = np.full(new, -1, dtype=np.int32)
        cat[:cap] = self.cat_of
        self.matrix, self.live, self.cat_of = m, live, cat

    def _row_for(self, item_id: str) -> tuple[int, bool]:
        """(row of ``item_id``, whether it is new), allocating one for a new id."""
        row = self.rows.get(item_id)
        if row is not None:
            return row, False
        if self._free:
            row = heapq.heappop(self._free)
            self.ids[row] = item_id
        else:
            row = len(self.ids)
            self.ids.append(item_id)
            self._grow(row + 1)
        self.rows[item_id] = row
        cat = self._pending_cat.pop(item_id, None)
        if cat is not None:
            self._set_cat(row, cat)
        return row, True

    def _set_cat(self, row: int, category: str) -> None:
        old = int(self.cat_of[row])
        if old >= 0:
            self._cat_rows[old].discard(row)
        code = self._cat_codes.setdefault(category, len(self._cat_codes))
        self.cat_of[row] = code
        self._cat_rows.setdefault(code, set()).add(row)

    # ---- writes ------------------------------------------------------------------------------
    def put(self, item_id: str, vector: np.ndarray, category: str | None = None) -> None:
        self.put_many([item_id], np.asarray(vector, dtype=np.float32)[None, :],
                      None if category is None else [category])

    def put_many(self, item_ids: list[str], vectors: np.ndarray, categories: list[str] | None = None) -> None:
        """Insert or replace vectors [n, d] (the last of repeated ids wins), chunk by chunk under
        the lock. A vector of another width than the index's means a new model: start over."""
        vectors = np.asarray(vectors, dtype=np.float32)
        last = {iid: j for j, iid in enumerate(item_ids)}  # dedupe: the last occurrence
        order = list(last.values()) if len(last) < len(item_ids) else range(len(item_ids))
        chunk = max(1, self.config.update_chunk)
        order = list(order)
        for start in range(0, len(order), chunk):
            part = order[start:start + chunk]
            ivf, lists = self._assign(vectors, part)  # outside the lock: the costly part of an add
            with self._lock:
                if vectors.shape[1] != self.dim:  # a model of another width replaces every vector
                    self._reset(vectors.shape[1])
                rows, fresh = [], []
                for j in part:
                    row, new = self._row_for(item_ids[j])
                    rows.append(row)
                    fresh.append(new)
                    if categories is not None:
                        self._set_cat(row, categories[j])
                r = np.asarray(rows, dtype=np.int64)
                vecs = vectors[part]  # [c, d]
                self.matrix[r] = vecs
                self.live[r] = True
                if self._ivf is not None:
                    faiss = _faiss(self.config.threads)
                    old = r[~np.asarray(fresh)]
                    if len(old):
                        self._ivf.remove_ids(old)
                    if self._ivf is ivf and lists is not None:  # the lists were found by this index's centroids
                        vecs = np.ascontiguousarray(vecs)
                        ivf.add_core(len(r), faiss.swig_ptr(vecs), faiss.swig_ptr(r), faiss.swig_ptr(lists))
                    else:
                        self._ivf.add_with_ids(vecs, r)
                if self._dirty is not None:
                    self._dirty.update(rows)
        self._maybe_build()

    def _assign(self, vectors: np.ndarray, part: list[int]):
        """(the current IVF, the inverted list of each of ``vectors[part]`` [c] by its centroids),
        computed without the lock: the centroids never change between builds, and scanning all of
        them is most of an add's cost (4·√n dot products a vector), so a query waits only for the
        list appends. (None, None) when there is no IVF or the width differs (a reset is due)."""
        ivf = self._ivf
        if ivf is None or vectors.shape[1] != ivf.d:
            return None, None
        _faiss(self.config.threads)
        _, lists = ivf.quantizer.search(np.ascontiguousarray(vectors[part]), 1)  # [c, 1]
        return ivf, np.ascontiguousarray(lists[:, 0], dtype=np.int64)

    def set_categories(self, categories: dict[str, str]) -> None:
        """Item → category (kept for items whose vector has not arrived yet)."""
        with self._lock:
            for iid, cat in categories.items():
                row = self.rows.get(iid)
                if row is None:
                    self._pending_cat[iid] = cat
                else:
                    self._set_cat(row, cat)

    def remove(self, item_ids: Iterable[str]) -> int:
        """Forget items (evicted upstream); their rows are reused. Returns how many were known."""
        gone = 0
        ids = list(item_ids)
        chunk = max(1, self.config.update_chunk)
        for start in range(0, len(ids), chunk):
            with self._lock:
                rows = []
                for iid in ids[start:start + chunk]:
                    self._pending_cat.pop(iid, None)
                    row = self.rows.pop(iid, None)
                    if row is None:
                        continue
                    rows.append(row)
                    self.ids[row] = None
                    self.live[row] = False
                    code = int(self.cat_of[row])
                    if code >= 0:
                        self._cat_rows[code].discard(row)
                        self.cat_of[row] = -1
                    heapq.heappush(self._free, row)
                if rows:
                    if self._ivf is not None:
                        _faiss(self.config.threads)
                        self._ivf.remove_ids(np.asarray(rows, dtype=np.int64))
                    if self._dirty is not None:
                        self._dirty.update(rows)
                gone += len(rows)
        return gone

    # ---- (re)build ---------------------------------------------------------------------------
    def _needs_build(self) -> bool:
        n = len(self.rows)
        if n < self.config.exact_below or n == 0:
            return False
        return self._ivf is None or n >= self.config.rebuild_growth * max(1, self._ivf_items)

    def _maybe_build(self) -> None:
        with self._build_lock:
            if self._building is None and self._needs_build():
                self._building = threading.Thread(target=self._build_guarded, name="ann-build", daemon=True)
                self._building.start()

    def _build_guarded(self) -> None:
        try:
            self.build()
        finally:
            with self._build_lock:
                self._building = None
        self._maybe_build()  # it grew again meanwhile

    def wait_built(self, timeout: float | None = None) -> None:
        """Wait for a background (re)build to finish (tests, benchmarks, start-up)."""
        t = self._building
        if t is not None:
            t.join(timeout)

    def build(self) -> None:
        """Train an IVF on a snapshot of the live rows, add them, replay what changed meanwhile,
        swap it in. The lock is held only for the snapshot and for each replayed chunk; one
        build runs at a time."""
        with self._one_build:
            self._build()

    @property
    def lists(self) -> int:
        """Inverted lists of the built approximate index (0: none built)."""
        return 0 if self._ivf is None else int(self._ivf.nlist)

    def set_nprobe(self, nprobe: int) -> None:
        """Lists scanned per query from now on (bounded by the built index's lists); for sweeps."""
        with self._lock:
            self.config = replace(self.config, nprobe=nprobe)
            if self._ivf is not None:
                self._ivf.nprobe = max(1, min(nprobe, self._ivf.nlist))

    def _build(self) -> None:
        cfg = self.config
        faiss = _faiss(cfg.threads)
        t0 = time.perf_counter()
        with self._lock:
            dim = self.dim
            live_rows = np.flatnonzero(self.live[:len(self.ids)]).astype(np.int64)
            snapshot = self.matrix[live_rows].copy()  # [n, d]
            self._dirty = set()
        n = len(live_rows)
        if n == 0 or dim == 0:
            with self._lock:
                self._dirty = None
            return
        nlist = max(1, min(n // 39, int(math.ceil(cfg.lists_factor * math.sqrt(n)))))  # faiss wants ≥ 39 points a list
        quantizer = faiss.IndexFlatIP(dim)
        ivf = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.cp.seed = cfg.seed
        ivf.cp.niter = 10
        ivf.cp.max_points_per_centroid = max(cfg.train_per_list, 39)
        rng = np.random.default_rng(cfg.seed)
        sample = min(n, cfg.train_per_list * nlist)
        train = snapshot if sample == n else snapshot[np.sort(rng.choice(n, sample, replace=False))]
        ivf.train(train)
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)  # remove/replace by id without a scan
        ivf.add_with_ids(snapshot, live_rows)
        ivf.nprobe = min(cfg.nprobe, nlist)
        in_ivf = np.zeros(int(live_rows[-1]) + 1, dtype=bool)  # rows the new index holds
        in_ivf[live_rows] = True
        chunk = max(1, cfg.update_chunk)
        while True:
            with self._lock:
                if self.dim != dim:  # reset meanwhile (a new model width): this build is void
                    self._dirty = None
                    return
                dirty = self._dirty
                take = [dirty.pop() for _ in range(min(chunk, len(dirty)))]
                in_ivf = self._replay(ivf, take, in_ivf)
                if not dirty:
                    self._ivf, self._ivf_items = ivf, n
                    self._dirty = None
                    break
        self.builds += 1
        self.last_build_s = time.perf_counter() - t0

    def _replay(self, ivf, rows: list[int], in_ivf: np.ndarray) -> np.ndarray:
        """Bring ``rows`` of a new index up to date with the matrix (under the lock); returns
        the (possibly grown) mask of rows the new index holds."""
        if not rows:
            return in_ivf
        r = np.asarray(rows, dtype=np.int64)
        if r.max() >= len(in_ivf):
            in_ivf = np.concatenate([in_ivf, np.zeros(int(r.max()) + 1 - len(in_ivf), dtype=bool)])
        old = r[in_ivf[r]]
        if len(old):
            ivf.remove_ids(old)
        now = r[self.live[r]]
        if len(now):
            ivf.add_with_ids(self.matrix[now], now)
        in_ivf[r] = self.live[r]
        return in_ivf

    # ---- queries -----------------------------------------------------------------------------
    def top_k(self, user: np.ndarray, k: int, exclude: Iterable[str] = (), category: str | None = None,
              exact: bool = False) -> list[tuple[str, float]]:
        """The k items with the highest dot product with ``user`` [d], skipping ``exclude``
        (e.g. what the user bought) and, with ``category``, items of other categories.
        ``exact=True`` scans every candidate (the reference the approximate answer is measured by)."""
        exclude = exclude if isinstance(exclude, (set, frozenset)) else set(exclude)
        user = np.ascontiguousarray(user, dtype=np.float32)
        with self._lock.shared():  # queries run together (faiss searches release the GIL); updates wait
            if not self.rows or k < 1:
                return []
            if category is not None:
                code = self._cat_codes.get(category)
                cand = self._cat_rows.get(code, set()) if code is not None else set()
                if not cand:
                    return []
                rows = np.fromiter(cand, dtype=np.int64, count=len(cand))
                if exact or self._ivf is None or len(rows) < self.config.exact_below:
                    return self._exact(user, rows, k, exclude)
                return self._approx(user, k, exclude, rows)
            if exact or not self.approximate:
                return self._exact(user, None, k, exclude)
            return self._approx(user, k, exclude, None)

    def _exact(self, user: np.ndarray, rows: np.ndarray | None, k: int, exclude: set[str]) -> list[tuple[str, float]]:
        n = len(self.ids)
        if rows is None:
            # [n]; einsum runs one thread without BLAS (stream/serve.py says why)
            scores = np.einsum("ij,j->i", self.matrix[:n], user)
            scores[~self.live[:n]] = -np.inf
            rows = np.arange(n)
        else:
            scores = np.einsum("ij,j->i", self.matrix[rows], user)  # [len(rows)]
        top = _exact_top(scores, min(len(scores), k + len(exclude)))
        out = []
        for t in top:
            iid = self.ids[rows[t]]
            if iid is None or iid in exclude or not np.isfinite(scores[t]):
                continue
            out.append((iid, float(scores[t])))
            if len(out) == k:
                break
        return out

    def _approx(self, user: np.ndarray, k: int, exclude: set[str], rows: np.ndarray | None) -> list[tuple[str, float]]:
        faiss = _faiss(self.config.threads)
        want = min(len(self.rows), k + len(exclude))
        params = None
        if rows is not None:  # a category: only its rows, more lists (a small share of each)
            params = faiss.SearchParametersIVF(sel=faiss.IDSelectorBatch(rows),
                                               nprobe=min(self._ivf.nlist, 4 * self._ivf.nprobe))
        scores, labels = self._ivf.search(user[None, :], want, params=params)  # [1, want] each
        out = []
        for s, r in zip(scores[0], labels[0]):
            if r < 0:
                break
            iid = self.ids[r]
            if iid is None or iid in exclude:
                continue
            out.append((iid, float(s)))
            if len(out) == k:
                break
        if len(out) < k and (len(self.rows) if rows is None else len(rows)) > len(out) + len(exclude):
            return self._exact(user, rows, k, exclude)  # too few in the lists probed (large k, scattered category)
        return out

    # ---- views -------------------------------------------------------------------------------
    def get(self) -> tuple[list[str], np.ndarray]:
        """Live item ids and their vectors [I, d] (a copy), in row order."""
        with self._lock.shared():  # a reader, like top_k
            rows = np.flatnonzero(self.live[:len(self.ids)])
            return [self.ids[r] for r in rows], self.matrix[rows]

    def memory_bytes(self) -> int:
        """Bytes of the vectors held: the matrix and (when built) the IVF's lists and id map."""
        total = self.matrix.nbytes + self.live.nbytes + self.cat_of.nbytes
        if self._ivf is not None:
            n = self._ivf.ntotal
            total += n * (self.dim * 4 + 8) + n * 16 + self._ivf.nlist * self.dim * 4  # lists, ids, hashtable, centroids
        return total
