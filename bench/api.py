"""``tgastream bench api``: the HTTP API under a bounded loopback load while "the trainer" writes.

Starts a real ``tgastream serve`` process on a free 127.0.0.1 port with its own temporary data
dir, over a serving store this process fills first (``--users`` user vectors, ``--items`` item
vectors, bought items and context graphs of synthetic users) and a checkpoint of a briefly trained
learner. Then ``--clients`` concurrent aiohttp clients send ``--requests`` requests, 40 % embedding,
40 % recommendations (k=10), 20 % score (20 candidates), 5 % of them for unknown users (a 404 on
embedding and recommendations: client errors, expected). Meanwhile a writer thread plays the
trainer: every 100 ms one batch of new user and item vectors, a few bought lists and a bumped
model version (so the API catches up and reloads its item matrix all along), and once, halfway
(half the requests answered or half of ``--max-seconds`` gone, whichever comes first), a new checkpoint (so the scorer reloads). Latency is measured by the client, request sent to body
read. The target is 0 server errors (5xx) and 0 transport errors.

``--replica topic``: the server is a topic-fed API replica instead (its own store, materialized
from the embeddings topic of an embedded broker, and its approximate item index above
``ann_exact_below``), the way API replicas run in production: the store is filled first and
bound to the topic (a restarted replica's state), the server rebuilds its index from it at start,
and the writer publishes its batches to the topic, which the replica applies to its store and
index while it answers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tgastream.core.settings import Settings
from tgastream.bench.report import write_json

HELP = "the HTTP API under load: p50/p99 per route, errors, requests/s, while the store and model change"

ROUTES = ("embedding", "recommendations", "score")
MIX = (0.4, 0.4, 0.2)  # share of each route
UNKNOWN_SHARE = 0.05  # requests for a user the store does not hold
CANDIDATES = 20  # items per score request
K = 10
TICK_S = 0.1  # writer: one batch per tick
TICK_USERS, TICK_ITEMS, TICK_BOUGHT = 300, 100, 20
BOUGHT_SHARE = 0.2  # users with bought items at the start
START_TIMEOUT_S = 120.0  # the server imports torch and loads a checkpoint: slow on a loaded machine
TOPIC_START_TIMEOUT_S = 900.0  # a topic-fed replica also builds its item index at start (1M items: minutes)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from tgastream.stream.cli import add_setting_flags

    p.add_argument("--requests", type=int, default=20_000, help="requests to send (default: 20000)")
    p.add_argument("--clients", type=int, default=50, help="concurrent clients (default: 50)")
    p.add_argument("--items", type=int, default=10_000, help="item vectors in the store (default: 10000)")
    p.add_argument("--users", type=int, default=3000, help="user vectors in the store (default: 3000)")
    p.add_argument("--max-seconds", type=float, default=300.0,
                   help="stop sending after this many seconds of load, even if requests remain (default: 300)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, the request mix and the writer (default: 0)")
    p.add_argument("--json", type=Path, help="write the result as JSON")
    p.add_argument("--replica", choices=("store", "topic"), default="store",
                   help="store: the server reads a serving store this process writes (a secondary reader); topic: "
                        "a topic-fed replica (own store and approximate index) following an embedded broker's "
                        "embeddings topic, which the writer publishes to (default: store)")
    add_setting_flags(p, "device")


@dataclass
class Outcome:
    route: str
    status: int  # 0 = transport error
    ms: float
    error: str = ""
    at: float = 0.0  # seconds into the load when it completed


@dataclass
class WriterStats:
    batches: int = 0
    model_version: int = 1
    checkpoint_at_s: float | None = None
    error: str = ""
    vectors: int = 0
    done: threading.Event = field(default_factory=threading.Event)


# -- the data -----------------------------------------------------------------------------------------


def _fill_store(store, args: argparse.Namespace, settings: Settings, rng) -> tuple[list[str], list[str], dict[str, str]]:
    """Users, items (ids), item → category of the synthetic catalogue; store written with version 1."""
    import numpy as np

    from tgastream.state.graph import UserGraph
    from tgastream.state.serving import VectorRecord
    from tgastream.stream.synth import SynthConfig, generate

    users = [str(u + 1) for u in range(args.users)]
    items = [str(i + 1) for i in range(args.items)]
    rows = generate(SynthConfig(users=args.users, events=8 * args.users, items=args.items, seed=args.seed))
    graphs: dict[str, UserGraph] = {}
    item_cat: dict[str, str] = {}
    for ts, u, i, c, b in rows:
        g = graphs.get(str(u + 1)) or graphs.setdefault(str(u + 1), UserGraph(settings.sample_len))
        g.append(str(i + 1), str(c + 1), int(b), float(ts))
        item_cat[str(i + 1)] = str(c + 1)
    now = time.time()
    vec = lambda n: _unit(rng.standard_normal((n, settings.dim), dtype=np.float32))  # noqa: E731
    uvec, ivec = vec(len(users)), vec(len(items))
    bought = {u: [items[j] for j in rng.integers(0, len(items), 5)]
              for u in rng.choice(users, int(len(users) * BOUGHT_SHARE), replace=False)}
    store.write(users={u: VectorRecord(1, now, now, uvec[k]) for k, u in enumerate(users)},
                items={i: VectorRecord(1, now, now, ivec[k]) for k, i in enumerate(items)},
                bought=bought, contexts={u: g.to_bytes() for u, g in graphs.items()}, model_version=1)
    return users, items, item_cat


def _unit(m):
    import numpy as np

    return m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-6)


def _learner_states(args: argparse.Namespace, settings: Settings, ck_dir: Path) -> dict:
    """Write checkpoint 1 of a briefly trained learner; return the state of one more step (checkpoint 2)."""
    from tgastream.core.events import BEHAVIORS, Event
    from tgastream.model.config import ModelConfig, OnlineConfig
    from tgastream.model.online import OnlineLearner
    from tgastream.state.checkpoint import save_checkpoint
    from tgastream.state.samples import samples_from_events
    from tgastream.stream.synth import SynthConfig, generate

    rows = generate(SynthConfig(users=50, events=1500, items=args.items, seed=args.seed + 1))
    events = [Event(str(u + 1), str(i + 1), str(c + 1), BEHAVIORS[b], float(ts)) for ts, u, i, c, b in rows]
    samples = samples_from_events(events, sample_len=settings.sample_len)
    learner = OnlineLearner(ModelConfig(n_items=1, n_categories=1, dim=settings.dim, heads=settings.heads,
                                        layers=settings.layers, dropout=0.0),
                            OnlineConfig(device="cpu", sample_len=settings.sample_len, chunk=1024, seed=args.seed))
    half = min(len(samples) // 2, 256)
    learner.step(samples[:half])
    save_checkpoint(ck_dir, 1, {"learner": learner.state_dict(), "offsets": {}})
    learner.step(samples[half:2 * half])
    return {"learner": learner.state_dict(), "offsets": {}}


def _plan(args: argparse.Namespace, users: list[str], item_cat: dict[str, str], rng) -> list[tuple[str, str, str, dict | None]]:
    """(route, method, path, JSON body) of every request, drawn up front."""
    routes = rng.choice(len(ROUTES), args.requests, p=MIX)
    unknown = rng.random(args.requests) < UNKNOWN_SHARE
    who = rng.integers(0, len(users), args.requests)
    scored = list(item_cat.items())
    out = []
    for n in range(args.requests):
        uid = f"unknown-{n}" if unknown[n] else users[who[n]]
        route = ROUTES[routes[n]]
        if route == "embedding":
            out.append((route, "GET", f"/v1/users/{uid}/embedding", None))
        elif route == "recommendations":
            out.append((route, "GET", f"/v1/users/{uid}/recommendations?k={K}", None))
        else:
            picks = rng.integers(0, len(scored), CANDIDATES)
            out.append((route, "POST", "/v1/score",
                        {"user_id": uid, "items": [{"item_id": scored[j][0], "category_id": scored[j][1]} for j in picks]}))
    return out


# -- the trainer's stand-in --------------------------------------------------------------------------


def _produce(producer, topic: str, users: dict, items: dict, bought: dict[str, list[str]]) -> None:
    """One writer batch onto the embeddings topic, as the trainer publishes it."""
    from tgastream.stream.publisher import send_vectors

    send_vectors(producer, topic, users, items, bought)
    producer.flush()


def _writer(publish, users: list[str], items: list[str], dim: int, seed: int, stop: threading.Event,
            halfway: threading.Event, ck_dir: Path, ck_state: dict, started: float, stats: WriterStats) -> None:
    import numpy as np

    from tgastream.state.checkpoint import save_checkpoint
    from tgastream.state.serving import VectorRecord

    rng = np.random.default_rng(seed + 2)
    try:
        while not stop.wait(TICK_S):
            version = stats.model_version + 1
            now = time.time()
            us = rng.choice(users, min(TICK_USERS, len(users)), replace=False)
            its = rng.choice(items, min(TICK_ITEMS, len(items)), replace=False)
            uvec = _unit(rng.standard_normal((len(us), dim), dtype=np.float32))
            ivec = _unit(rng.standard_normal((len(its), dim), dtype=np.float32))
            bought = {u: [items[j] for j in rng.integers(0, len(items), 5)] for u in us[:TICK_BOUGHT]}
            publish({u: VectorRecord(version, now, now, uvec[k]) for k, u in enumerate(us)},
                    {i: VectorRecord(version, now, now, ivec[k]) for k, i in enumerate(its)}, bought, version)
            stats.model_version, stats.batches = version, stats.batches + 1
            stats.vectors += len(us) + len(its)
            if halfway.is_set() and stats.checkpoint_at_s is None:
                save_checkpoint(ck_dir, 2, ck_state)
                stats.checkpoint_at_s = time.monotonic() - started
    except Exception as exc:  # reported, and the run fails: the load would no longer be what it says
        stats.error = f"{type(exc).__name__}: {exc}"
    finally:
        stats.done.set()


# -- the load ------------------------------------------------------------------------------------------


async def _wait_ready(session, base: str, proc: subprocess.Popen, log_path: Path, timeout_s: float) -> None:
    import aiohttp

    from tgastream.core.errors import CommandError

    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise CommandError(f"tgastream serve exited with {proc.returncode}: {_tail(log_path, 1)}")
        try:
            async with session.get(base + "/healthz", timeout=aiohttp.ClientTimeout(total=2)) as r:
                if r.status == 200 and (await r.json()).get("scorer"):
                    return
        except (aiohttp.ClientError, asyncio.TimeoutError):
            pass
        if time.monotonic() > deadline:
            raise CommandError(f"tgastream serve not ready (scorer loaded) after {timeout_s:.0f} s")
        await asyncio.sleep(0.2)


async def _load(base: str, plan, clients: int, max_seconds: float, headers: dict[str, str], proc, log_path: Path,
                on_start, halfway: threading.Event, bar, settle, start_timeout_s: float = START_TIMEOUT_S
                ) -> tuple[list[Outcome], float, dict[str, int], dict]:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=clients, limit_per_host=clients)
    timeout = aiohttp.ClientTimeout(total=30)
    outcomes: list[Outcome] = []
    next_n = 0
    async with aiohttp.ClientSession(base_url=base, connector=connector, timeout=timeout, headers=headers) as session:
        await _wait_ready(session, base, proc, log_path, start_timeout_s)
        on_start()
        start = time.monotonic()
        deadline = start + max_seconds

        async def client() -> None:
            nonlocal next_n
            while next_n < len(plan) and time.monotonic() < deadline:
                route, method, path, body = plan[next_n]
                next_n += 1
                t0 = time.perf_counter()
                try:
                    async with session.request(method, path, json=body) as resp:
                        await resp.read()
                        out = Outcome(route, resp.status, 0.0)
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    out = Outcome(route, 0, 0.0, type(exc).__name__)
                out.ms = (time.perf_counter() - t0) * 1000.0
                outcomes.append(out)
                out.at = time.monotonic() - start
                if len(outcomes) * 2 >= len(plan) or out.at * 2 >= max_seconds:
                    halfway.set()
                bar.update(1)

        await asyncio.gather(*(client() for _ in range(clients)))
        seconds = time.monotonic() - start
        counts = await _server_counts(session)
        last = settle()  # the writer stopped: the newest model version it wrote or published
        return outcomes, seconds, counts, await _health(session, last)


async def _health(session, version: int, timeout_s: float = 30.0) -> dict:
    """The server's /healthz once its model version reaches ``version`` (the writer's last: every
    batch written or published has been applied), or after ``timeout_s``; with
    ``caught_up_s`` (None: it did not). {} when it does not answer."""
    import aiohttp

    t0 = time.monotonic()
    body: dict = {}
    while True:
        try:
            async with session.get("/healthz", timeout=aiohttp.ClientTimeout(total=5)) as r:
                body = await r.json() if r.status == 200 else {}
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            body = {}
        if body.get("model_version", 0) >= version:
            return {**body, "caught_up_s": round(time.monotonic() - t0, 2)}
        if time.monotonic() - t0 > timeout_s:
            return {**body, "caught_up_s": None} if body else {}
        await asyncio.sleep(0.1)


async def _server_counts(session) -> dict[str, int]:
    """The server's own count of the /v1 requests it answered, by status class (from /metrics)."""
    import aiohttp

    counts: Counter = Counter()
    try:
        async with session.get("/metrics") as r:
            text = await r.text()
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return {}
    for line in text.splitlines():
        if line.startswith("tgastream_api_requests_total{") and 'route="/v1/' in line:
            status = line.split('status="', 1)[1].split('"', 1)[0]
            counts[f"{status[0]}xx"] += int(float(line.rsplit(" ", 1)[1]))
    return dict(sorted(counts.items()))


def _tail(path: Path, lines: int) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


def _summary(outs: list[Outcome], seconds: float) -> dict:
    import numpy as np

    ms = np.array([o.ms for o in outs if o.status], dtype=np.float64)  # transport errors have no latency worth the name
    pct = lambda q: round(float(np.percentile(ms, q)), 2) if len(ms) else None  # noqa: E731
    return {
        "requests": len(outs), "p50_ms": pct(50), "p99_ms": pct(99),
        "ok": sum(200 <= o.status < 300 for o in outs),
        "client_errors": sum(400 <= o.status < 500 for o in outs),
        "server_errors": sum(o.status >= 500 for o in outs),
        "transport_errors": sum(o.status == 0 for o in outs),
        "requests_per_s": round(len(outs) / seconds, 1) if seconds > 0 else None,
    }


def _by_third(outs: list[Outcome], seconds: float) -> list[float]:
    """Requests/s completed in each third of the load (a server slowing down as the store grows shows here)."""
    if seconds <= 0:
        return []
    counts = Counter(min(int(o.at * 3 / seconds), 2) for o in outs)
    return [round(counts[k] / (seconds / 3), 1) for k in range(3)]


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def run(args: argparse.Namespace, settings: Settings) -> int:
    import numpy as np
    from tqdm import tqdm

    from tgastream.core.errors import CommandError
    from tgastream.state.serving import ServingStore
    from tgastream.stream.broker import die_with_parent, free_port, install_sigterm_handler
    from tgastream.stream.replay import make_producer

    for flag, value, low in (("--requests", args.requests, 1), ("--clients", args.clients, 1),
                             ("--items", args.items, 1), ("--users", args.users, 1)):
        if value < low:
            raise CommandError(f"{flag} must be >= {low}, got {value}")
    if args.max_seconds <= 0:
        raise CommandError(f"--max-seconds must be > 0, got {args.max_seconds}")
    install_sigterm_handler()
    rng = np.random.default_rng(args.seed)

    topic_mode = args.replica == "topic"
    with tempfile.TemporaryDirectory(prefix="tgastream-bench-api-") as tmp, contextlib.ExitStack() as stack:
        data_dir = Path(tmp)
        store_path, ck_dir, log_path = data_dir / "serving", data_dir / "checkpoints", data_dir / "serve.log"
        if topic_mode:
            store_path = data_dir / "api-serving"  # the replica's own store (``tgastream serve`` without --store)
        print(f"bench api: {args.users:,} users, {args.items:,} items (dim {settings.dim}), "
              f"model dim {settings.dim} x {settings.layers} layers, replica: {args.replica}; data in {data_dir}",
              flush=True)
        store = ServingStore(store_path)
        store_open = True
        stop, halfway = threading.Event(), threading.Event()
        stats = WriterStats()
        writer: threading.Thread | None = None
        proc: subprocess.Popen | None = None
        exited: int | None = None
        try:
            users, items, item_cat = _fill_store(store, args, settings, rng)
            ck_state = _learner_states(args, settings, ck_dir)
            plan = _plan(args, users, item_cat, rng)
            port = free_port()
            if topic_mode:
                bootstrap, topic = _bind_to_topic(stack, store, settings, data_dir)
                store.close()  # the replica's own store: the server is its only writer
                store_open = False
                producer = stack.enter_context(contextlib.closing(make_producer(bootstrap)))
                publish = lambda u, i, b, _v: _produce(producer, topic, u, i, b)  # noqa: E731
                where = ["--bootstrap", bootstrap, "--embeddings-topic", topic]
            else:
                publish = lambda u, i, b, v: store.write(users=u, items=i, bought=b, model_version=v)  # noqa: E731
                where = ["--store", str(store_path)]
            cmd = [sys.executable, "-m", "tgastream.stream.cli", "serve", *where,
                   "--api-host", "127.0.0.1", "--api-port", str(port), "--data-dir", str(data_dir)]
            if getattr(args, "config", None):
                cmd[3:3] = ["--config", str(args.config)]
            if args.setting_device:
                cmd += ["--device", args.setting_device]
            with open(log_path, "wb") as log:
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        preexec_fn=die_with_parent, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            base = f"http://127.0.0.1:{port}"
            headers = {"Authorization": f"Bearer {settings.api_token}"} if settings.api_token else {}

            def settle() -> int:
                stop.set()
                if writer is not None:
                    writer.join(10)
                return stats.model_version

            def on_start() -> None:
                nonlocal writer
                writer = threading.Thread(target=_writer, name="bench-api-writer", daemon=True,
                                          args=(publish, users, items, settings.dim, args.seed, stop, halfway, ck_dir,
                                                ck_state, time.monotonic(), stats))
                writer.start()

            print(f"serving on {base} (pid {proc.pid}); {args.requests:,} requests from {args.clients} clients, "
                  f"writer: {TICK_USERS} users + {TICK_ITEMS} items per {TICK_S * 1000:.0f} ms", flush=True)
            with tqdm(total=len(plan), desc="bench api", unit="req", file=sys.stderr, disable=None,
                      mininterval=0.5) as bar:
                outcomes, seconds, server_counts, health = asyncio.run(_load(
                    base, plan, args.clients, args.max_seconds, headers, proc, log_path, on_start, halfway, bar,
                    settle, TOPIC_START_TIMEOUT_S if topic_mode else START_TIMEOUT_S))
        finally:
            stop.set()
            if writer is not None:
                writer.join(10)
            if proc is not None:
                exited = proc.poll()  # None: it was running until we stopped it
                _stop(proc)
            if store_open:
                store.close()
        tracebacks = log_path.read_text(errors="replace").count("Traceback") if log_path.exists() else 0
        if tracebacks:
            print(f"server log: {tracebacks} traceback(s); last lines: {_tail(log_path, 5)}", file=sys.stderr)

    result = _summary(outcomes, seconds)
    by_route = {r: _summary([o for o in outcomes if o.route == r], seconds) for r in ROUTES}
    result = {**result,
              "by_route": {r: {k: s[k] for k in ("requests", "p50_ms", "p99_ms", "server_errors", "client_errors",
                                                 "transport_errors")} for r, s in by_route.items()},
              "clients": args.clients, "items": args.items, "users": args.users, "seconds": round(seconds, 2),
              "replica": args.replica, "server_health_at_end": health,
              "statuses": {r: dict(sorted(Counter(o.status for o in outcomes if o.route == r).items())) for r in ROUTES},
              "unknown_user_share": UNKNOWN_SHARE, "score_candidates": CANDIDATES, "k": K,
              "writer": {"batches": stats.batches, "vectors": stats.vectors, "last_model_version": stats.model_version,
                         "checkpoint_2_at_s": None if stats.checkpoint_at_s is None else round(stats.checkpoint_at_s, 2)},
              "transport_error_kinds": dict(Counter(o.error for o in outcomes if o.status == 0)),
              "requests_per_s_by_third": _by_third(outcomes, seconds), "server_counted": server_counts, "server_tracebacks": tracebacks}

    print(f"\n{'route':<16} {'requests':>9} {'p50 ms':>8} {'p99 ms':>8} {'2xx':>7} {'4xx':>6} {'5xx':>5} {'transport':>9}")
    for name, s in [*by_route.items(), ("all", result)]:
        print(f"{name:<16} {s['requests']:>9,} {_fmt(s['p50_ms']):>8} {_fmt(s['p99_ms']):>8} {s['ok']:>7,} "
              f"{s['client_errors']:>6,} {s['server_errors']:>5,} {s['transport_errors']:>9,}")
    print(f"\n{result['requests']:,} requests in {seconds:.1f} s = {result['requests_per_s']:,.0f} requests/s, "
          f"{args.clients} clients; writer: {stats.batches} batches ({stats.vectors:,} vectors, model version "
          f"1 → {stats.model_version}), checkpoint 2 at "
          f"{'-' if stats.checkpoint_at_s is None else f'{stats.checkpoint_at_s:.1f} s'}")
    print(f"requests/s by third of the run: {' / '.join(f'{x:,.0f}' for x in result['requests_per_s_by_third'])}")
    if health:
        src = health.get("source") or {}
        print(f"server at the end: model version {health.get('model_version')} (the writer's last: "
              f"{stats.model_version}), caught up {'in ' + str(health['caught_up_s']) + ' s' if health.get('caught_up_s') is not None else 'NOT within 30 s'}"
              + (f"; {src.get('records', 0):,} topic records applied" if src else ""))
    answered = Counter(f"{o.status // 100}xx" for o in outcomes if o.status)
    print(f"server's own count (/metrics) of /v1 answers: "
          f"{', '.join(f'{k} {v:,}' for k, v in server_counts.items()) or 'unavailable'}"
          f"{'' if server_counts == dict(answered) else f' (client received: {dict(sorted(answered.items()))})'}")
    write_json(args.json, result)
    if stats.error:
        print(f"error: the writer failed: {stats.error}", file=sys.stderr)
        return 1
    if exited is not None:
        print(f"error: tgastream serve exited with {exited} during the run", file=sys.stderr)
        return 1
    if len(outcomes) < args.requests:
        print(f"note: stopped by --max-seconds {args.max_seconds:g} after {len(outcomes):,} of {args.requests:,} requests",
              file=sys.stderr)
    return 0


def _bind_to_topic(stack: contextlib.ExitStack, store, settings: Settings, data_dir: Path) -> tuple[str, str]:
    """An embedded broker with the app's topics, and ``store`` bound to its embeddings topic (as a
    replica's store is once it has read the topic): (bootstrap, embeddings topic)."""
    from tgastream.stream.broker import EmbeddedBroker
    from tgastream.stream.generations import topic_ids
    from tgastream.stream.topics import ensure_app_topics

    broker = stack.enter_context(EmbeddedBroker(log_path=data_dir / "broker.log"))
    ensure_app_topics(broker.bootstrap, settings.replace(bootstrap=broker.bootstrap))
    topic = settings.embeddings_topic
    store.set_source(topic_ids(broker.bootstrap, [topic])[topic])
    return broker.bootstrap, topic


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 10 s; always reaped."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
