"""The live page of a running system (``/ui`` on the API): charts of the pipeline and one user's
events beside their recommendations, pushed to the browser by server-sent events.

Read-only. Three sources, each optional (a panel whose source is missing or down says so):

- the stream worker's and the trainer's Prometheus ``/metrics`` (URLs in ``ui_worker_metrics`` /
  ``ui_trainer_metrics``), scraped once a second by :class:`MetricsSampler` into a bounded time
  series of rates and gauges (:func:`row_from`);
- the events topic, tailed by :class:`EventTail` (a kafka-python consumer in a thread, no group)
  into a bounded ring of recent events per user;
- the API's own serving store and item index: a user's vector, its model version and top-10.

The static files (``stream/static/ui/``: no build step, no external network, a small canvas chart
of our own) carry no data and are served without the token; the data stream ``/ui/stream``
requires ``Authorization: Bearer <token>`` like every other route when a token is set (the page
reads it with ``fetch``, which, unlike ``EventSource``, can send that header).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import aiohttp
from aiohttp import web

from tgastream.core.events import WATERMARK_KEY, Event, parse_json
from tgastream.core.kafka_security import PLAINTEXT, KafkaSecurity, kafka_python_args
from tgastream.stream.promscrape import parse_metrics  # (re-exported: the page's pure functions)

log = logging.getLogger("tgastream.api.ui")

STATIC = Path(__file__).parent / "static" / "ui"
PAGE_FILES = ("app.js", "chart.js", "ui.css")
UI_PAGE_PATHS = frozenset({"/ui", *(f"/ui/{name}" for name in PAGE_FILES)})
"""Paths of the page itself: static, no data, answered without the token (a browser cannot add a
header to a navigation)."""

UI_KEY: web.AppKey = web.AppKey("ui", tuple)  # (sampler, tail) of a running app, for tests and tools
TOP_K = 10
IDLE_S = 10.0  # no new event for this long, after some: the stream has ended (or paused)
TAIL_IDLE_S = 60.0  # the events topic is read while a page is open and this long after the last one closed


@dataclass(frozen=True)
class UiConfig:
    """Where the page's data comes from; an empty URL or no bootstrap leaves that panel 'not configured'."""

    worker_metrics: str = ""  # e.g. http://127.0.0.1:9101/metrics
    trainer_metrics: str = ""
    bootstrap: str | None = None  # the events topic's broker (the user panel's events)
    events_topic: str = "behavior-events"
    security: KafkaSecurity = PLAINTEXT
    interval_s: float = 1.0  # scrape period
    history: int = 900  # rows kept (15 min at 1 s)
    backfill: int = 2000  # events read back per partition at start (recent history of users)
    per_user: int = 20  # recent events kept per user (the page shows 20)
    max_users: int = 10_000  # users kept, least recently active dropped first (≤ 200k small tuples: tens of MB)
    down_after_s: float = 5.0  # a process is down after this long without an answer (a busy one is not)


# -- metrics: pure functions (Prometheus text is parsed by stream/promscrape.py) -----------------

def total(metrics: dict[str, float], name: str) -> float | None:
    """Sum of ``name`` over its label sets; None when the process does not export it."""
    values = [v for k, v in metrics.items() if k == name or k.startswith(name + "{")]
    return sum(values) if values else None


def buckets(metrics: dict[str, float], name: str) -> list[tuple[float, float]]:
    """Cumulative ``(le, count)`` pairs of histogram ``name``, by ``le``."""
    prefix = f"{name}_bucket{{le="
    out = [(float(k[len(prefix):-1]), v) for k, v in metrics.items() if k.startswith(prefix)]
    return sorted(out)


def histogram_quantile(cumulative: list[tuple[float, float]], q: float) -> float | None:
    """The q-quantile of a cumulative histogram, linear within its bucket (Prometheus's rule);
    None without observations. Past the last finite bound: that bound."""
    if not cumulative or cumulative[-1][1] <= 0:
        return None
    rank = q * cumulative[-1][1]
    lower_le, lower_count = 0.0, 0.0
    for le, count in cumulative:
        if count >= rank:
            if le == float("inf"):
                return lower_le
            if count == lower_count:
                return le
            return lower_le + (le - lower_le) * (rank - lower_count) / (count - lower_count)
        lower_le, lower_count = le, count
    return lower_le


def _delta(now: list[tuple[float, float]], before: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Bucket counts observed between two scrapes (a restart, counts falling, gives ``now``)."""
    old = dict(before)
    diff = [(le, c - old.get(le, 0.0)) for le, c in now]
    return now if any(c < 0 for _, c in diff) else diff


ONLINE_METRICS = ("auc", "logloss", "ece", "hr@10")


def row_from(t: float, worker: dict[str, float] | None, trainer: dict[str, float] | None) -> dict:
    """One time-series row of absolute values (counters, gauges) of both processes; a process that
    did not answer (None) gives None for its fields. Rates come from two rows (:func:`with_rates`)."""
    w, tr = worker or {}, trainer or {}

    def wv(name: str) -> float | None:
        return total(w, name) if worker is not None else None

    def tv(name: str) -> float | None:
        return total(tr, name) if trainer is not None else None

    online = {m: tr.get(f"tgastream_online_metric{{metric={m},model=online}}") for m in ONLINE_METRICS}
    return {
        "t": t,
        "events_in": wv("tgastream_events_consumed_total"),
        "events_applied": wv("tgastream_events_applied_total"),
        "samples_produced": wv("tgastream_samples_emitted_total"),
        "worker_lag": wv("tgastream_partition_lag"),
        "samples_consumed": tv("tgastream_trainer_samples_total"),
        "samples_trained": tv("tgastream_trainer_samples_trained_total"),
        "vectors_out": tr.get("tgastream_embeddings_published_total{kind=user}") if trainer is not None else None,
        "trainer_lag": tv("tgastream_trainer_lag"),
        "model_version": tv("tgastream_model_version"),
        "serving_version": tv("tgastream_serving_model_version"),
        "rolled_back": tv("tgastream_model_rolled_back"),
        "rollbacks": tv("tgastream_trainer_rollbacks_total"),
        **online,
        "_freshness": buckets(tr, "tgastream_freshness_seconds"),
    }


RATES = {"events_in": "events_in_per_s", "events_applied": "events_applied_per_s",
         "samples_produced": "samples_produced_per_s", "samples_trained": "samples_trained_per_s",
         "vectors_out": "vectors_out_per_s"}
RATE_WINDOW_S = 3.0  # rates over ~3 s: the worker's counters move in steps (one per fetched batch)
FRESHNESS_WINDOW_S = 10.0


def _base(row: dict, earlier: list[dict], key: str, window_s: float) -> dict | None:
    """The row to take a difference against: the newest earlier one at least ``window_s`` older
    with ``key`` known, else the oldest with it (the series' start); None without one."""
    known = [r for r in earlier if r.get(key) is not None and r["t"] < row["t"]]
    old = [r for r in known if row["t"] - r["t"] >= window_s - 0.5]
    return old[-1] if old else known[0] if known else None


def with_rates(row: dict, earlier: list[dict]) -> dict:
    """``row`` (absolute values) plus per-second rates of its counters over ~RATE_WINDOW_S against
    ``earlier`` rows (oldest first), and freshness p50/p99 of the vectors published in the last
    ~FRESHNESS_WINDOW_S (the whole run when there is no older row). A counter that fell (the
    process restarted) gives no rate for that row."""
    out = {k: v for k, v in row.items() if not k.startswith("_")}
    for key, rate in RATES.items():
        base = _base(row, earlier, key, RATE_WINDOW_S) if row.get(key) is not None else None
        dv = row[key] - base[key] if base is not None else None
        out[rate] = dv / (row["t"] - base["t"]) if dv is not None and dv >= 0 else None
    produced, trained = row.get("samples_produced"), row.get("samples_trained")
    out["samples_backlog"] = max(0.0, produced - trained) if produced is not None and trained is not None else None
    fresh = row["_freshness"]
    base = _base(row, [r for r in earlier if r.get("_freshness")], "_freshness", FRESHNESS_WINDOW_S)
    if base is not None:
        fresh = _delta(fresh, base["_freshness"])
    out["freshness_p50"] = histogram_quantile(fresh, 0.5)
    out["freshness_p99"] = histogram_quantile(fresh, 0.99)
    return out


# -- metrics: the sampler -----------------------------------------------------------------------

@dataclass
class Source:
    """One scraped process: when it last answered, and its last error."""

    name: str
    url: str
    down_after_s: float = 5.0
    ever_up: bool = False
    last_ok: float = 0.0
    first_failure: float = 0.0  # when it stopped answering (0 while it answers)
    error: str = ""

    def ok(self, now: float) -> None:
        self.ever_up, self.last_ok, self.first_failure, self.error = True, now, 0.0, ""

    def failed(self, now: float, error: str) -> None:
        self.first_failure = self.first_failure or now
        self.error = error

    def status(self, now: float) -> dict:
        if not self.url:
            state = "not configured"
        elif not self.ever_up:
            state = "not up yet"
        else:
            state = "up" if now - self.last_ok < self.down_after_s else "down"
        return {"name": self.name, "state": state, "since": self.last_ok if state == "down" else 0.0,
                "error": self.error}


class MetricsSampler:
    """Scrapes the worker's and trainer's /metrics every ``interval_s`` into a bounded series of
    rows (:func:`with_rates`), and marks rollbacks (the trainer's rollback counter rising)."""

    def __init__(self, config: UiConfig) -> None:
        self.config = config
        self.sources = {"worker": Source("worker", config.worker_metrics, config.down_after_s),
                        "trainer": Source("trainer", config.trainer_metrics, config.down_after_s)}
        self.rows: deque[dict] = deque(maxlen=config.history)
        self.raw: deque[dict] = deque(maxlen=32)  # absolute rows, for rates and the freshness window
        self.markers: deque[dict] = deque(maxlen=200)  # {"t", "kind": "rollback", "version"}

    async def _get(self, session: aiohttp.ClientSession, source: Source) -> dict[str, float] | None:
        """Every process behind ``source`` (its URLs, each host's addresses), merged; None unless all answered."""
        if not source.url:
            return None
        try:
            targets = [t for url in source.url.split(",") if url.strip() for t in await _targets(url.strip())]
            texts = await asyncio.gather(*(_fetch(session, url, host) for url, host in targets))
            metrics = merge_processes([parse_metrics(text) for text in texts])
        except Exception as exc:  # down, refused, timed out, garbled: the panel says so
            source.failed(time.time(), f"{type(exc).__name__}: {exc}"[:200])
            return None
        source.ok(time.time())
        return metrics

    def add(self, row: dict) -> dict:
        """Append one absolute row; return its rated row (also kept in :attr:`rows`)."""
        rated = with_rates(row, list(self.raw))
        prev = next((r["rollbacks"] for r in reversed(self.raw) if r.get("rollbacks") is not None), None)
        if row.get("rollbacks") is not None and prev is not None and row["rollbacks"] > prev:
            self.markers.append({"t": row["t"], "kind": "rollback", "version": row.get("serving_version")})
        self.raw.append(row)
        self.rows.append(rated)
        return rated

    async def run(self) -> None:
        async with aiohttp.ClientSession() as session:
            while True:
                started = time.monotonic()
                worker, trainer = await asyncio.gather(self._get(session, self.sources["worker"]),
                                                       self._get(session, self.sources["trainer"]))
                self.add(row_from(time.time(), worker, trainer))
                await asyncio.sleep(max(0.05, self.config.interval_s - (time.monotonic() - started)))


async def _targets(url: str) -> list[tuple[str, str | None]]:
    """``url`` once per IPv4 address of its host: a name with several (compose replicas behind one
    service name) is every replica, like Prometheus's DNS discovery. ``(url, Host header)`` pairs."""
    import socket

    import yarl

    parsed = yarl.URL(url)
    host = parsed.host or ""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, parsed.port, family=socket.AF_INET,
                                                             type=socket.SOCK_STREAM)
    except OSError:
        return [(url, None)]  # let the request itself fail (and say why)
    addresses = sorted({info[4][0] for info in infos})
    if len(addresses) <= 1:
        return [(url, None)]
    return [(str(parsed.with_host(a)), parsed.raw_authority) for a in addresses]


async def _fetch(session: aiohttp.ClientSession, url: str, host: str | None) -> str:
    headers = {"Host": host} if host else None
    async with session.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=2.0)) as resp:
        resp.raise_for_status()
        return await resp.text()


SHARED = ("tgastream_model_version", "tgastream_serving_model_version", "tgastream_model_rolled_back",
          "tgastream_trainer_rollbacks_total", "tgastream_online_metric")
"""What every trainer rank reports alike (one model): the highest is taken, not the sum."""


def merge_processes(scrapes: list[dict[str, float]]) -> dict[str, float]:
    """Several processes of one role (worker replicas, trainer ranks) as one: counters, lags and
    histogram buckets summed; the model's version, state and metrics (:data:`SHARED`) the highest."""
    out: dict[str, float] = {}
    for metrics in scrapes:
        for key, value in metrics.items():
            if key not in out:
                out[key] = value
            elif key.split("{", 1)[0] in SHARED:
                out[key] = max(out[key], value)
            else:
                out[key] += value
    return out


# -- events: the tail -----------------------------------------------------------------------------

EVENT_FIELDS = ("item", "category", "behavior", "ts", "arrived")


class EventTail:
    """The events topic's recent records per user, read by a kafka-python consumer in a daemon
    thread (no consumer group: it commits nothing and disturbs no worker). Starts ``backfill``
    records before each partition's end, so a page opened mid-run has history."""

    def __init__(self, config: UiConfig) -> None:
        self.config = config
        self.lock = threading.Lock()
        self.users: OrderedDict[str, deque[tuple]] = OrderedDict()
        self.seq: dict[str, int] = {}  # user → events seen (the page redraws when it changes)
        self.recent: deque[str] = deque(maxlen=200)  # users of the latest events, newest last
        self.records = 0
        self.last_event = 0.0  # wall time of the latest event read
        self.error = ""
        self.connected = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, event: Event, arrived: float) -> None:
        """Keep ``event`` in its user's ring (bounded users, least recently active dropped)."""
        row = (event.item_id, event.category_id, event.behavior, event.ts, arrived)  # a tuple: ~half a dict's bytes
        with self.lock:
            ring = self.users.get(event.user_id)
            if ring is None:
                ring = self.users[event.user_id] = deque(maxlen=self.config.per_user)
                while len(self.users) > self.config.max_users:
                    gone, _ = self.users.popitem(last=False)
                    self.seq.pop(gone, None)
            else:
                self.users.move_to_end(event.user_id)
            ring.append(row)
            self.seq[event.user_id] = self.seq.get(event.user_id, 0) + 1
            self.recent.append(event.user_id)
            self.records += 1
            self.last_event = time.time()  # read now (``arrived`` may be a backfilled record's past)

    def of(self, user: str) -> tuple[int, list[dict]]:
        """(events seen, recent events newest first) of ``user``."""
        with self.lock:
            seen, rows = self.seq.get(user, 0), list(reversed(self.users.get(user, ())))
        return seen, [dict(zip(EVENT_FIELDS, row)) for row in rows]

    def active(self, n: int = 12) -> list[str]:
        """The ``n`` users with the latest events, newest first."""
        with self.lock:
            out: list[str] = []
            for u in reversed(self.recent):
                if u not in out:
                    out.append(u)
                    if len(out) == n:
                        break
            return out

    def status(self) -> dict:
        if self.config.bootstrap is None:
            return {"state": "not configured", "records": 0, "last_event": 0.0, "error": ""}
        running = self.running
        with self.lock:
            state = ("up" if self.connected else "down" if self.error else "connecting") if running else "idle"
            return {"state": state, "records": self.records, "last_event": self.last_event, "error": self.error}

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start reading (no-op without a broker or when already reading)."""
        if self.config.bootstrap is None or self.running:
            return
        self._stop.clear()
        with self.lock:
            self.connected, self.error = False, ""
        self._thread = threading.Thread(target=self._run, daemon=True, name="ui-event-tail")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _consumer(self):
        from kafka import KafkaConsumer, TopicPartition

        consumer = KafkaConsumer(**kafka_python_args(self.config.bootstrap, self.config.security, group_id=None,
                                                     enable_auto_commit=False, fetch_max_wait_ms=100))
        parts = consumer.partitions_for_topic(self.config.events_topic) or set()
        tps = [TopicPartition(self.config.events_topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        ends = consumer.end_offsets(tps) if tps else {}
        for tp in tps:
            consumer.seek(tp, max(0, ends.get(tp, 0) - self.config.backfill))
        return consumer, bool(tps)

    def _run(self) -> None:
        consumer = None
        while not self._stop.is_set():
            try:
                if consumer is None:
                    consumer, assigned = self._consumer()
                    if not assigned:  # the topic is not there yet
                        consumer.close()
                        consumer = None
                        self._stop.wait(2.0)
                        continue
                    with self.lock:
                        self.connected, self.error = True, ""
                batches = consumer.poll(timeout_ms=200)
                now = time.time()
                for records in batches.values():
                    for r in records:
                        if r.key == WATERMARK_KEY or r.value is None:
                            continue
                        parsed = parse_json(r.value)
                        if isinstance(parsed, Event):  # arrived: when it was produced (a backfilled one too)
                            self.add(parsed, r.timestamp / 1000 if r.timestamp and r.timestamp > 0 else now)
            except Exception as exc:  # broker gone or topic re-created: retry, the panel says so
                with self.lock:
                    self.connected, self.error = False, f"{type(exc).__name__}: {exc}"[:200]
                if consumer is not None:
                    try:
                        consumer.close()
                    except Exception:
                        pass
                consumer = None
                self._stop.wait(2.0)
        if consumer is not None:
            consumer.close()


# -- the routes ----------------------------------------------------------------------------------

def _sse(kind: str, data: object) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def stream_state(now: float, sampler: MetricsSampler, tail: EventTail) -> dict:
    """Whether the stream runs: ``live``, ``ended`` (events came, none for IDLE_S, or every
    source that was up went down) or ``waiting`` (nothing seen yet), with a plain sentence."""
    sources = list(sampler.sources.values())
    configured = [s.status(now)["state"] for s in sources if s.url]
    if configured and all(state == "down" for state in configured):
        return {"state": "ended", "text": "stream ended: the worker and trainer stopped (last state shown)"}
    if tail.last_event and now - tail.last_event > IDLE_S:
        return {"state": "ended", "text": f"stream ended: no new events for {now - tail.last_event:.0f} s (last state shown)"}
    if tail.last_event or "up" in configured:
        return {"state": "live", "text": "live"}
    return {"state": "waiting", "text": "waiting for the stream to start"}


def add_ui_routes(app: web.Application, config: UiConfig, store, items: Callable, refresh: Callable[[], None],
                  model_state: Callable[[], dict]) -> None:
    """Register ``/ui`` (the page), its static files and ``/ui/stream`` (server-sent events) on
    ``app``, and the sampler and event tail as background work of the app's lifetime.
    ``store``: the serving store; ``items()``: its current item index; ``refresh()``: catch the
    store up; ``model_state()``: the registry's serving state. The token is the app's middleware's."""
    sampler = MetricsSampler(config)
    tail = EventTail(config)
    closing = [False]  # set on shutdown: open streams end, or the server would wait its shutdown timeout on them
    viewers = {"open": 0, "last": time.monotonic()}  # open streams; when the last one closed

    def user_view(user: str) -> dict:
        refresh()
        seen, events = tail.of(user)
        touched = {e["item"] for e in events[:10]}
        rec = store.user(user)
        view: dict = {"user": user, "events_seen": seen, "events": events, "model_version": None,
                      "publish_ts": None, "recommendations": [], "known": rec is not None}
        if rec is None:
            return view
        index = items()
        view["model_version"], view["publish_ts"] = rec.model_version, rec.publish_ts
        if len(index) and index.dim == rec.vector.shape[0]:
            top = index.top_k(rec.vector, TOP_K, store.bought(user))
            view["recommendations"] = [{"item": i, "score": round(s, 4), "touched": i in touched} for i, s in top]
        return view

    def status() -> dict:
        now = time.time()
        return {"now": now, "stream": stream_state(now, sampler, tail),
                "sources": {**{k: s.status(now) for k, s in sampler.sources.items()}, "events": tail.status()},
                "model_state": model_state(), "active_users": tail.active()}

    async def page(request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    async def static(request: web.Request) -> web.FileResponse:
        name = request.match_info["file"]
        if name not in PAGE_FILES:  # only the page's own files: nothing else of the package is served
            raise web.HTTPNotFound(reason=f"no page file {name!r}")
        return web.FileResponse(STATIC / name, headers={"Cache-Control": "no-cache"})

    async def stream(request: web.Request) -> web.StreamResponse:
        user = request.query.get("user", "")[:128]
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
        await resp.prepare(request)
        viewers["open"] += 1
        tail.start()  # the events topic is read only while someone looks (and TAIL_IDLE_S after)
        try:
            await resp.write(_sse("hello", {"history": list(sampler.rows), "markers": list(sampler.markers),
                                            "status": status(), "panels": ONLINE_METRICS}))
            user_key, next_status = None, 0.0
            last_row_t = sampler.rows[-1]["t"] if sampler.rows else 0.0
            while not closing[0]:
                now = time.monotonic()
                if sampler.rows and sampler.rows[-1]["t"] > last_row_t:
                    new = [r for r in sampler.rows if r["t"] > last_row_t]
                    last_row_t = new[-1]["t"]
                    await resp.write(_sse("rows", {"rows": new, "markers": list(sampler.markers)[-20:]}))
                if now >= next_status:
                    await resp.write(_sse("status", status()))
                    next_status = now + 1.0
                if user:
                    seen, _ = tail.of(user)
                    store_rec = store.user(user)
                    key = (seen, store_rec.model_version if store_rec else None,
                           store_rec.publish_ts if store_rec else None)
                    if key != user_key:
                        user_key = key
                        await resp.write(_sse("user", user_view(user)))
                    else:
                        refresh()
                await asyncio.sleep(0.2)
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            viewers["open"] -= 1
            viewers["last"] = time.monotonic()
        return resp

    app.router.add_get("/ui", page)
    app.router.add_get("/ui/stream", stream)  # before /ui/{file}: the first match wins
    app.router.add_get("/ui/{file}", static)

    async def stop_idle_tail() -> None:
        """A replica nobody watches reads no events: the tail stops TAIL_IDLE_S after the last page left."""
        while True:
            await asyncio.sleep(min(5.0, TAIL_IDLE_S))
            if tail.running and not viewers["open"] and time.monotonic() - viewers["last"] > TAIL_IDLE_S:
                await asyncio.get_running_loop().run_in_executor(None, tail.stop)

    async def background(app: web.Application):
        tasks = [asyncio.ensure_future(sampler.run()), asyncio.ensure_future(stop_idle_tail())]
        yield
        for task in tasks:
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        await asyncio.get_running_loop().run_in_executor(None, tail.stop)

    async def close_streams(app: web.Application) -> None:
        closing[0] = True
        await asyncio.sleep(0.3)  # each stream sees it within one 0.2 s turn

    app.cleanup_ctx.append(background)
    app.on_shutdown.append(close_streams)
    app[UI_KEY] = (sampler, tail)
