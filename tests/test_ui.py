"""The live page's server side (stream/ui.py) without a browser: the series it derives from
Prometheus text, the event tail on a real broker, and the app's routes over real HTTP against real
/metrics endpoints (prometheus_client servers standing in for the worker and the trainer)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import numpy as np
import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from tgastream.core.events import Event
from tgastream.state.serving import ServingStore, VectorRecord
from tgastream.stream.broker import free_port
from tgastream.stream.serve import build_app
from tgastream.stream.ui import (UI_KEY, EventTail, MetricsSampler, UiConfig, histogram_quantile, merge_processes,
                                 parse_metrics, row_from, stream_state, with_rates)

TOKEN = "ui-token"


# -- the series ---------------------------------------------------------------------------------

def test_histogram_quantile_interpolates_within_the_bucket_like_prometheus():
    cumulative = [(0.1, 10.0), (0.5, 30.0), (1.0, 40.0), (float("inf"), 40.0)]
    assert histogram_quantile(cumulative, 0.5) == pytest.approx(0.1 + 0.4 * (20 - 10) / 20)  # rank 20 in (0.1, 0.5]
    assert histogram_quantile(cumulative, 0.25) == pytest.approx(0.1 * 10 / 10)
    assert histogram_quantile([(1.0, 0.0), (float("inf"), 0.0)], 0.5) is None
    assert histogram_quantile([(1.0, 1.0), (float("inf"), 5.0)], 0.99) == 1.0  # past the last bound: that bound


def _row(t: float, consumed: float, fresh: list[tuple[float, float]] | None = None) -> dict:
    return {"t": t, "events_in": consumed, "events_applied": consumed, "samples_produced": None,
            "samples_trained": None, "vectors_out": None, "_freshness": fresh or []}


def test_rates_are_taken_over_a_few_seconds_and_a_restarted_counter_gives_none():
    rows = [_row(t, 100.0 * t) for t in range(5)]
    rated = with_rates(_row(5, 500.0), rows)
    assert rated["events_in_per_s"] == pytest.approx(100.0)  # (500 - 200) / 3 s
    assert rated["samples_produced_per_s"] is None  # unknown counter: no rate
    assert with_rates(_row(5, 3.0), rows)["events_in_per_s"] is None  # the worker restarted: no negative rate
    assert with_rates(_row(0, 0.0), [])["events_in_per_s"] is None  # the first row has nothing to compare with
    assert with_rates({**_row(5, 1.0), "samples_produced": 90.0, "samples_trained": 60.0}, rows)["samples_backlog"] == 30.0


def test_freshness_quantiles_cover_the_recent_window_not_the_whole_run():
    old = [(0.1, 0.0), (1.0, 0.0), (10.0, 1000.0), (float("inf"), 1000.0)]  # a slow start: 1000 vectors ~5 s late
    now = [(0.1, 100.0), (1.0, 100.0), (10.0, 1100.0), (float("inf"), 1100.0)]  # then 100 fast ones
    rated = with_rates(_row(20, 1.0, now), [_row(9, 1.0, old)])
    assert rated["freshness_p50"] == pytest.approx(0.05) and rated["freshness_p99"] <= 0.1
    assert with_rates(_row(20, 1.0, now), [])["freshness_p50"] > 1.0  # no window: the whole run


def test_a_process_that_does_not_answer_leaves_its_fields_empty():
    worker = parse_metrics("# TYPE tgastream_events_consumed counter\ntgastream_events_consumed_total 7.0\n"
                           "# TYPE tgastream_partition_lag gauge\ntgastream_partition_lag{partition=\"0\"} 2.0\n"
                           "tgastream_partition_lag{partition=\"1\"} 3.0\n")
    row = row_from(1.0, worker, None)
    assert row["events_in"] == 7.0 and row["worker_lag"] == 5.0
    assert row["model_version"] is None and row["auc"] is None and row["samples_trained"] is None
    assert row_from(1.0, worker, {})["auc"] is None  # a trainer without click-time metrics: not available


def test_replicas_and_ranks_merge_into_one_role_summing_counts_but_not_the_model():
    ranks = [{"tgastream_trainer_samples_trained_total": 10.0, "tgastream_model_version": 7.0,
              "tgastream_online_metric{metric=auc,model=online}": 0.6, "tgastream_trainer_rollbacks_total": 1.0},
             {"tgastream_trainer_samples_trained_total": 5.0, "tgastream_model_version": 7.0,
              "tgastream_online_metric{metric=auc,model=online}": 0.7, "tgastream_trainer_rollbacks_total": 1.0}]
    merged = merge_processes(ranks)
    assert merged["tgastream_trainer_samples_trained_total"] == 15.0 and merged["tgastream_model_version"] == 7.0
    assert merged["tgastream_trainer_rollbacks_total"] == 1.0
    assert merged["tgastream_online_metric{metric=auc,model=online}"] == 0.7


def test_the_sampler_scrapes_every_url_of_a_role_and_needs_them_all():
    regs = [CollectorRegistry(), CollectorRegistry()]
    for n, reg in enumerate(regs):
        Counter("tgastream_events_consumed", "events", registry=reg).inc(10 * (n + 1))
    ports = [free_port(), free_port()]
    servers = [start_http_server(port, "127.0.0.1", registry=reg)[0] for port, reg in zip(ports, regs)]
    urls = ",".join(f"http://127.0.0.1:{p}/metrics" for p in ports)
    sampler = MetricsSampler(UiConfig(worker_metrics=urls, trainer_metrics=urls + f",http://127.0.0.1:{free_port()}/metrics"))

    async def scrape() -> tuple:
        import aiohttp

        async with aiohttp.ClientSession() as session:
            return (await sampler._get(session, sampler.sources["worker"]),
                    await sampler._get(session, sampler.sources["trainer"]))

    try:
        worker, trainer = asyncio.run(scrape())
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
    assert worker["tgastream_events_consumed_total"] == 30.0
    assert trainer is None and "Connect" in sampler.sources["trainer"].error  # one rank down: no partial sums


def test_a_rising_rollback_counter_marks_the_time_axis():
    sampler = MetricsSampler(UiConfig())
    for t, rollbacks in ((1.0, 0.0), (2.0, 0.0), (3.0, 1.0), (4.0, None), (5.0, 1.0)):
        sampler.add({**_row(t, t), "rollbacks": rollbacks, "serving_version": 40.0})
    assert [m["t"] for m in sampler.markers] == [3.0] and sampler.markers[0]["version"] == 40.0


def test_the_event_rings_are_bounded_per_user_and_in_users():
    tail = EventTail(UiConfig(per_user=3, max_users=2))
    for i in range(5):
        tail.add(Event("a", f"i{i}", "c", "click", 100.0 + i), 1.0 + i)
    tail.add(Event("b", "x", "c", "buy", 1.0), 7.0)
    tail.add(Event("c", "y", "c", "fav", 1.0), 8.0)  # the third user: the least recently active (a) goes
    seen, events = tail.of("a")
    assert seen == 0 and events == []
    assert tail.of("b")[0] == 1 and tail.active() == ["c", "b", "a"]
    tail2 = EventTail(UiConfig(per_user=3))
    for i in range(5):
        tail2.add(Event("a", f"i{i}", "c", "click", 100.0 + i), 1.0 + i)
    seen, events = tail2.of("a")
    assert seen == 5 and [e["item"] for e in events] == ["i4", "i3", "i2"]  # newest first, 3 kept


def test_the_stream_state_says_when_it_ended():
    sampler, tail = MetricsSampler(UiConfig(worker_metrics="http://w", trainer_metrics="http://t")), EventTail(UiConfig())
    assert stream_state(100.0, sampler, tail)["state"] == "waiting"
    tail.last_event = 95.0
    assert stream_state(100.0, sampler, tail)["state"] == "live"
    ended = stream_state(120.0, sampler, tail)
    assert ended["state"] == "ended" and "no new events for 25 s" in ended["text"]
    tail.last_event = 0.0
    for source in sampler.sources.values():
        source.ok(50.0)
    assert stream_state(52.0, sampler, tail)["state"] == "live"
    assert "worker and trainer stopped" in stream_state(60.0, sampler, tail)["text"]


# -- the event tail on a real broker ------------------------------------------------------------

def test_the_tail_reads_the_events_topic_and_skips_watermarks(broker, topic_settings):
    from kafka import KafkaProducer

    from tgastream.core.events import WATERMARK_KEY, watermark_value
    from tgastream.stream.topics import ensure_app_topics

    ensure_app_topics(broker.bootstrap, topic_settings)  # this test's own names: the session broker is shared
    topic = topic_settings.events_topic
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap)
    producer.send(topic, key=b"u1", value=Event("u1", "before", "c", "click", 1.0).to_json())  # backfilled
    producer.flush()
    tail = EventTail(UiConfig(bootstrap=broker.bootstrap, events_topic=topic, backfill=100))
    tail.start()
    try:
        deadline = time.monotonic() + 30
        while tail.of("u1")[0] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        producer.send(topic, key=WATERMARK_KEY, value=watermark_value(5.0), partition=0)
        producer.send(topic, key=b"u1", value=Event("u1", "after", "c", "cart", 2.0).to_json())
        producer.flush()
        while tail.of("u1")[0] < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        seen, events = tail.of("u1")
        assert seen == 2 and [(e["item"], e["behavior"]) for e in events] == [("after", "cart"), ("before", "click")]
        assert tail.status()["state"] == "up" and tail.records == 2
    finally:
        tail.stop()
        producer.close()


# -- the routes over real HTTP ------------------------------------------------------------------

def _vec(values, version: int) -> VectorRecord:
    return VectorRecord(version, 1511658000.0, time.time(), np.asarray(values, dtype=np.float32))


async def _events(resp, want: set[str], timeout_s: float = 15.0) -> dict[str, dict]:
    """Read server-sent events until one of each kind in ``want`` came; kind → its latest data."""
    got: dict[str, dict] = {}
    kind = ""

    async def read() -> None:
        nonlocal kind
        while not want <= got.keys():
            line = (await resp.content.readline()).decode()
            if line.startswith("event: "):
                kind = line[7:].strip()
            elif line.startswith("data: "):
                got[kind] = json.loads(line[6:])

    await asyncio.wait_for(read(), timeout_s)
    return got


def test_the_routes_serve_the_page_openly_and_the_data_only_with_the_token(tmp_path: Path):
    worker_reg, trainer_reg = CollectorRegistry(), CollectorRegistry()
    consumed = Counter("tgastream_events_consumed", "events", registry=worker_reg)
    Gauge("tgastream_model_version", "version", registry=trainer_reg).set(12)
    Gauge("tgastream_online_metric", "metric", ["model", "metric"], registry=trainer_reg).labels("online", "auc").set(0.7)
    freshness = Histogram("tgastream_freshness_seconds", "fresh", registry=trainer_reg)
    w_port, t_port = free_port(), free_port()
    w_server, _ = start_http_server(w_port, "127.0.0.1", registry=worker_reg)
    t_server, _ = start_http_server(t_port, "127.0.0.1", registry=trainer_reg)
    store = ServingStore(tmp_path / "serving")
    store.write(users={"u1": _vec([1, 0], 12)}, items={f"i{n}": _vec([12 - n, 0], 12) for n in range(12)},
                bought={}, model_version=12)
    config = UiConfig(worker_metrics=f"http://127.0.0.1:{w_port}/metrics",
                      trainer_metrics=f"http://127.0.0.1:{t_port}/metrics", interval_s=0.2, down_after_s=1.0)

    async def scenario() -> None:
        app = build_app(store, token=TOKEN, ui=config)
        async with TestClient(TestServer(app)) as client:
            page = await client.get("/ui")
            assert page.status == 200 and "tgastream" in await page.text()  # no token: the page has no data
            assert (await client.get("/ui/app.js")).status == 200
            auth = {"Authorization": f"Bearer {TOKEN}"}
            assert (await client.get("/ui/index.html")).status == 401  # not a page file: the token's rule
            assert (await client.get("/ui/index.html", headers=auth)).status == 404  # only the page's own files
            wrong = await client.get("/ui/stream", headers={"Authorization": "Bearer wrong"})
            assert wrong.status == 401 and "event:" not in await wrong.text()
            assert (await client.get("/ui/stream")).status == 401

            sampler, tail = app[UI_KEY]
            tail.add(Event("u1", "i3", "c7", "click", 1511658000.0), time.time())  # what the tail would read
            async with client.get("/ui/stream?user=u1", headers=auth) as resp:
                assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
                got = await _events(resp, {"hello", "rows", "user", "status"})
                consumed.inc(50)
                freshness.observe(0.2)
                while True:  # the counter's rise reaches the page as a rate, the new vector as freshness
                    rows = (await _events(resp, {"rows"}))["rows"]["rows"]
                    if (rows[-1]["events_in_per_s"] or 0) > 0 and rows[-1]["freshness_p50"] is not None:
                        break
                # the first status may predate the first scrape: wait for the one that says the trainer is up
                deadline = time.monotonic() + 15
                while (status := (await _events(resp, {"status"}))["status"])["sources"]["trainer"]["state"] != "up":
                    assert time.monotonic() < deadline, status
            user = got["user"]
            assert user["model_version"] == 12 and user["events"][0]["item"] == "i3"
            recs = user["recommendations"]
            assert [r["item"] for r in recs] == [f"i{n}" for n in range(10)]
            assert [r["touched"] for r in recs] == [n == 3 for n in range(10)]  # the item just clicked
            row = rows[-1]
            assert row["model_version"] == 12 and row["auc"] == 0.7 and 0.1 < row["freshness_p50"] <= 0.25
            assert status["sources"]["events"]["state"] == "not configured"

            t_server.shutdown()  # the trainer goes down: the status says so, the stream goes on
            t_server.server_close()
            async with client.get("/ui/stream", headers=auth) as resp:
                deadline = time.monotonic() + 15
                while (await _events(resp, {"status"}))["status"]["sources"]["trainer"]["state"] != "down":
                    assert time.monotonic() < deadline, "the trainer never reported down"
                rows = (await _events(resp, {"rows"}))["rows"]["rows"]
                assert rows[-1]["model_version"] is None and rows[-1]["events_in"] == 50.0

    try:
        asyncio.run(scenario())
    finally:
        w_server.shutdown()
        w_server.server_close()
        store.close()


def test_with_no_source_configured_the_stream_says_so_and_carries_the_guard_state(tmp_path: Path):
    store = ServingStore(tmp_path / "serving")

    async def scenario() -> dict:
        app = build_app(store, model_state=lambda: {"state": "rolled_back", "version": 40})
        async with TestClient(TestServer(app)) as client:
            async with client.get("/ui/stream?user=nobody") as resp:
                return await _events(resp, {"hello", "user"})

    try:
        got = asyncio.run(scenario())
    finally:
        store.close()
    status = got["hello"]["status"]
    assert status["model_state"] == {"state": "rolled_back", "version": 40}
    assert {s["state"] for s in status["sources"].values()} == {"not configured"}
    assert status["stream"]["state"] == "waiting"
    assert got["user"]["known"] is False and got["user"]["recommendations"] == []


def test_the_events_topic_is_read_only_while_a_page_is_open(tmp_path: Path, broker, topic_settings, monkeypatch):
    from kafka import KafkaProducer

    from tgastream.stream import ui
    from tgastream.stream.topics import ensure_app_topics

    monkeypatch.setattr(ui, "TAIL_IDLE_S", 0.5)
    ensure_app_topics(broker.bootstrap, topic_settings)
    topic = topic_settings.events_topic
    store = ServingStore(tmp_path / "serving")
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap)

    async def scenario() -> None:
        app = build_app(store, ui=UiConfig(bootstrap=broker.bootstrap, events_topic=topic))
        async with TestClient(TestServer(app)) as client:
            tail = app[UI_KEY][1]
            assert not tail.running and tail.status()["state"] == "idle"  # nobody looks: nothing read
            async with client.get("/ui/stream?user=u9") as resp:
                assert tail.running
                producer.send(topic, key=b"u9", value=Event("u9", "seen", "c", "click", 1.0).to_json())
                producer.flush()
                deadline = time.monotonic() + 20
                while not (await _events(resp, {"user"}))["user"]["events"]:
                    assert time.monotonic() < deadline, "the event never reached the page"
            deadline = time.monotonic() + 10
            while tail.running:  # the page left: the tail stops after TAIL_IDLE_S
                assert time.monotonic() < deadline, "the tail kept reading with no page open"
                await asyncio.sleep(0.1)

    try:
        asyncio.run(scenario())
    finally:
        producer.close()
        store.close()
