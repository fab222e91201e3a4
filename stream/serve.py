"""The HTTP API over the serving store (aiohttp): embeddings, recommendations, conversion scores.

Routes: ``GET /v1/users/{id}/embedding``, ``GET /v1/users/{id}/recommendations?k=10[&category=C]``
(items the user bought are left out; state/ann_index.py searches), ``POST /v1/score``,
``GET /healthz``, ``GET /metrics``, ``GET /openapi.json`` (the document of all of them,
stream/openapi.py). Errors are JSON ``{"error": ...}`` with a
4xx/5xx status, for every failure: bad input, unknown routes and methods, oversized bodies, and
an unexpected exception (500, logged). With a token set, every route but ``/healthz`` requires
``Authorization: Bearer <token>``. The store is opened as a RocksDB secondary and caught up at most every
``refresh_s`` seconds, so the API follows the trainer's writes without blocking it.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

from tgastream.core.events import MAX_ID_CHARS  # the stream rejects longer ids: none can be stored
from tgastream.state.registry import MANIFEST, serving_state
from tgastream.state.serving import ServingStore
from tgastream.core.kafka_security import PLAINTEXT, KafkaSecurity
from tgastream.state.ann_index import AnnConfig, ItemVectorIndex
from tgastream.stream.materialize import TopicMaterializer, index_from_store
from tgastream.stream.ui import UI_PAGE_PATHS, UiConfig, add_ui_routes

from tgastream.stream.openapi import MAX_BODY_BYTES, MAX_CANDIDATES, MAX_K, spec  # the limits are the API's contract
OPEN_ROUTES = frozenset({"/healthz"}) | UI_PAGE_PATHS  # without the token: probes carry none; the page's static files hold no data

log = logging.getLogger("tgastream.api")


class Scorer(Protocol):
    """Conversion probability of candidate (item, category) pairs given a user's context graph."""

    def __call__(self, context: bytes | None, candidates: list[tuple[str, str]]) -> list[float]: ...


@dataclass
class ApiMetrics:
    registry: CollectorRegistry
    requests: Counter = field(init=False)
    latency: Histogram = field(init=False)

    def __post_init__(self) -> None:
        self.requests = Counter("tgastream_api_requests", "HTTP requests served", ["route", "status"],
                                registry=self.registry)
        self.latency = Histogram("tgastream_api_request_seconds", "HTTP request latency", ["route"],
                                 registry=self.registry, buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, 1))


class ModelState:
    """Whether the serving model is live, pinned or rolled back: the trainer's registry in the
    checkpoint directory (state/registry.py), re-read when the file changes."""

    def __init__(self, checkpoint_dir: Path | None) -> None:
        self.path = Path(checkpoint_dir) / MANIFEST if checkpoint_dir is not None else None
        self._mtime = -1.0
        self._state = {"state": "live", "version": None}

    def __call__(self) -> dict:
        if self.path is None:
            return self._state
        try:
            mtime = self.path.stat().st_mtime
        except OSError:
            mtime = 0.0
        if mtime != self._mtime:
            self._mtime = mtime
            self._state = serving_state(self.path.parent) if mtime else {"state": "live", "version": None}
        return self._state


class ItemIndex:
    """Item vectors of the trainer's store (read as a secondary), reloaded when the model version
    changes (or ``max_age_s`` passes) into an exact index: a reload per model step could not
    afford an approximate build (replicas following the topic update theirs in place)."""

    def __init__(self, store: ServingStore, max_age_s: float = 5.0) -> None:
        self.store, self.max_age_s = store, max_age_s
        self.version, self.loaded_at = -1, 0.0
        self.index = ItemVectorIndex(AnnConfig(exact_below=2**62))

    def get(self) -> ItemVectorIndex:
        version = self.store.model_version()
        if version != self.version or time.monotonic() - self.loaded_at > self.max_age_s:
            self.index = index_from_store(self.store, AnnConfig(exact_below=2**62))
            self.version, self.loaded_at = version, time.monotonic()
        return self.index


def top_k(user: np.ndarray, ids: list[str], matrix: np.ndarray, k: int, exclude: set[str]) -> list[tuple[str, float]]:
    """The k items with the highest dot product with ``user``, skipping ``exclude``."""
    if not ids:
        return []
    # [I]; einsum runs one thread without BLAS: a GEMV is memory-bound, and OpenBLAS's threads
    # (which the API cannot size once numpy is loaded) fight over the cores under concurrent load
    scores = np.einsum("ij,j->i", matrix, user)
    want = min(len(ids), k + len(exclude))
    top = np.argpartition(-scores, want - 1)[:want] if want < len(ids) else np.arange(len(ids))
    top = top[np.argsort(-scores[top], kind="stable")]
    out = [(ids[i], float(scores[i])) for i in top if ids[i] not in exclude]
    return out[:k]


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _authorized(request: web.Request, token: str) -> bool:
    given = request.headers.get("Authorization", "")
    return hmac.compare_digest(given.encode(), f"Bearer {token}".encode())


def _user_id(request: web.Request) -> str | web.Response:
    """The path's user id, or the JSON error for one no user can have."""
    uid = request.match_info["user_id"]
    if len(uid) > MAX_ID_CHARS:
        return _error(400, f"user id longer than {MAX_ID_CHARS} characters")
    return uid  # percent-escapes that are not UTF-8 stay escaped: an id no user has (404)


def build_app(store: ServingStore, scorer: Scorer | None = None, refresh_s: float = 0.5,
              registry: CollectorRegistry | None = None, extra_metrics: Callable[[], bytes] | None = None,
              token: str = "", materializer: TopicMaterializer | None = None,
              model_state: Callable[[], dict] | None = None, ui: UiConfig | None = None) -> web.Application:
    """The aiohttp application. ``scorer`` is None when no model checkpoint is available yet;
    a non-empty ``token`` guards every route but /healthz. With a ``materializer`` the app follows
    the embeddings topic into ``store`` and its item index while it runs; without one ``store`` is
    the trainer's (a secondary reader) and the item index is reloaded per model version."""
    registry = registry or CollectorRegistry()
    metrics = ApiMetrics(registry)
    model_state = model_state or ModelState(None)
    items_now: Callable[[], ItemVectorIndex] = (lambda: materializer.index) if materializer is not None \
        else ItemIndex(store).get
    last_catch_up = [0.0]

    def fresh() -> None:
        now = time.monotonic()
        if now - last_catch_up[0] >= refresh_s:
            store.catch_up()
            last_catch_up[0] = now

    @web.middleware
    async def observe(request: web.Request, handler):
        route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
        start = time.perf_counter()
        try:
            if token and request.path not in OPEN_ROUTES and not _authorized(request, token):
                response = _error(401, "missing or wrong bearer token")
                response.headers["WWW-Authenticate"] = "Bearer"
            else:
                response = await handler(request)
        except web.HTTPException as exc:
            response = _error(exc.status, exc.reason or "error")
        except Exception:  # a bug must cost one request, not the server
            log.exception("%s %s failed", request.method, request.path)
            response = _error(500, "internal error")
        metrics.requests.labels(route, str(response.status)).inc()
        metrics.latency.labels(route).observe(time.perf_counter() - start)
        return response

    async def healthz(request: web.Request) -> web.Response:
        fresh()
        state = model_state()
        body = {"status": "ok", "model_version": store.model_version(), "model_state": state["state"],
                "scorer": scorer is not None and getattr(scorer, "ready", True)}
        if state["state"] != "live":
            body["serving_version"] = state.get("version")  # the good (or pinned) version published now
        if materializer is not None:
            body["source"] = {"topic": materializer.topic, "records": materializer.records,
                              "bad_records": materializer.bad_records, "caught_up": materializer.caught_up,
                              "error": materializer.error}
        return web.json_response(body)

    async def embedding(request: web.Request) -> web.Response:
        fresh()
        uid = _user_id(request)
        if isinstance(uid, web.Response):
            return uid
        rec = store.user(uid)
        if rec is None:
            return _error(404, f"unknown user {uid!r}")
        return web.json_response({"user_id": uid, "model_version": rec.model_version,
                                  "model_state": model_state()["state"], "event_ts": rec.event_ts,
                                  "publish_ts": rec.publish_ts, "vector": [round(float(x), 6) for x in rec.vector]})

    async def recommendations(request: web.Request) -> web.Response:
        fresh()
        uid = _user_id(request)
        if isinstance(uid, web.Response):
            return uid
        raw_k = request.query.get("k", "10")
        try:
            k = int(raw_k[:20]) if len(raw_k) <= 20 else MAX_K + 1  # no 10⁶-digit int parsing
        except ValueError:
            return _error(400, f"k must be an integer, got {raw_k!r}")
        if not 1 <= k <= MAX_K:
            return _error(400, f"k must be in [1, {MAX_K}], got {k}")
        category = request.query.get("category")
        if category is not None and not 0 < len(category) <= MAX_ID_CHARS:
            return _error(400, f"category must have 1 to {MAX_ID_CHARS} characters")
        rec = store.user(uid)
        if rec is None:
            return _error(404, f"unknown user {uid!r}")
        index = items_now()
        if len(index) and index.dim != rec.vector.shape[0]:
            return _error(503, "item vectors and user vector differ in size (model changing); retry")
        items = index.top_k(rec.vector, k, store.bought(uid), category=category)
        return web.json_response({"user_id": uid, "k": k, "model_version": rec.model_version,
                                  "items": [{"item_id": i, "score": round(s, 6)} for i, s in items]})

    async def score(request: web.Request) -> web.Response:
        fresh()
        try:
            body = json.loads(await request.read())
        except ValueError:
            return _error(400, "body must be JSON")
        parsed = _parse_score_body(body)
        if isinstance(parsed, str):
            return _error(400, parsed)
        uid, candidates = parsed
        if scorer is None or not getattr(scorer, "ready", True):
            return _error(503, "no model checkpoint is loaded yet")
        context = store.context(uid)
        try:
            probs = scorer(context, candidates)
        except RuntimeError as exc:
            return _error(503, str(exc))
        return web.json_response({"user_id": uid, "known_user": context is not None,
                                  "scores": [{"item_id": i, "probability": round(p, 6)}
                                             for (i, _c), p in zip(candidates, probs)]})

    async def metrics_route(request: web.Request) -> web.Response:
        body = generate_latest(registry) + (extra_metrics() if extra_metrics else b"")
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    document = spec()

    async def openapi_route(request: web.Request) -> web.Response:
        return web.json_response(document)

    app = web.Application(middlewares=[observe], client_max_size=MAX_BODY_BYTES)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/v1/users/{user_id}/embedding", embedding)
    app.router.add_get("/v1/users/{user_id}/recommendations", recommendations)
    app.router.add_post("/v1/score", score)
    app.router.add_get("/metrics", metrics_route)
    app.router.add_get("/openapi.json", openapi_route)
    add_ui_routes(app, ui or UiConfig(), store, items_now, fresh, model_state)  # the live page (stream/ui.py)
    if materializer is not None:
        async def follow_topic(app: web.Application):
            task = asyncio.ensure_future(materializer.run())
            yield
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass

        app.cleanup_ctx.append(follow_topic)
    return app


def _parse_score_body(body: object) -> tuple[str, list[tuple[str, str]]] | str:
    """``{"user_id": ..., "items": [id | {"item_id", "category_id"}]}`` or an error message."""
    if not isinstance(body, dict):
        return "body must be a JSON object"
    uid = body.get("user_id")
    if isinstance(uid, bool) or not isinstance(uid, (str, int)) or not str(uid).strip():
        return "user_id (string or int) is required"
    if len(str(uid)) > MAX_ID_CHARS:
        return f"user_id longer than {MAX_ID_CHARS} characters"
    items = body.get("items")
    if not isinstance(items, list) or not items:
        return "items must be a non-empty list"
    if len(items) > MAX_CANDIDATES:
        return f"at most {MAX_CANDIDATES} items per request"
    out: list[tuple[str, str]] = []
    for it in items:
        if isinstance(it, dict):
            iid, cat = it.get("item_id"), it.get("category_id", "0")
        else:
            iid, cat = it, "0"
        if isinstance(iid, bool) or not isinstance(iid, (str, int)) or not str(iid).strip():
            return "each item needs an item_id (string or int)"
        if len(str(iid)) > MAX_ID_CHARS or len(str(cat)) > MAX_ID_CHARS:
            return f"ids longer than {MAX_ID_CHARS} characters"
        if isinstance(cat, bool) or not isinstance(cat, (str, int)):
            return "category_id must be a string or int"
        out.append((str(iid), str(cat)))
    return str(uid), out


def run_server(store_path: Path, host: str, port: int, scorer: Scorer | None = None,
               print_address: Callable[[str], None] = print, token: str = "",
               topic: tuple[str, str] | None = None, checkpoint_dir: Path | None = None,
               security: KafkaSecurity = PLAINTEXT, ssl_context: ssl.SSLContext | None = None,
               ann: AnnConfig | None = None, ui: UiConfig | None = None) -> None:
    """Serve until interrupted (blocking). With ``topic`` (bootstrap, embeddings topic) the API
    materializes that topic into its own store at ``store_path``; without, ``store_path`` is the
    trainer's serving store, read as a secondary. ``security``: TLS/SASL of the topic's consumer;
    ``ssl_context``: serve HTTPS (docs/security.md)."""
    materializer = None
    if topic is not None:
        store = ServingStore(store_path)  # this replica's own: it is the only writer
        materializer = TopicMaterializer(topic[0], topic[1], store, index_from_store(store, ann), security)
    else:
        if not (store_path / "CURRENT").exists():
            ServingStore(store_path).close()  # an empty store until the trainer writes one
        secondary = store_path.parent / f"{store_path.name}.reader-{port}"
        store = ServingStore.reader(store_path, secondary)
    app = build_app(store, scorer, token=token, materializer=materializer, model_state=ModelState(checkpoint_dir),
                    ui=ui)
    print_address(f"API listening on http{'s' if ssl_context else ''}://{host}:{port}")
    try:
        web.run_app(app, host=host, port=port, print=None, handle_signals=True, ssl_context=ssl_context)
    finally:
        store.close()
