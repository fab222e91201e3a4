"""The live page /ui in a real headless Chromium (Debian's chromium + chromium-driver, through
Selenium) against a running `tgastream demo`: data advances, a user's new event shows within 2 s,
their recommendations' model version changes, a wrong token gets nothing, the end is said plainly.
Writes a screenshot: docs/img/ui.png with UPDATE_UI_SCREENSHOT=1 (`make screenshot`), else into
the test's temporary directory (a test run leaves the checkout as it found it)."""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tgastream.stream.broker import die_with_parent

REPO = Path(__file__).resolve().parents[1]
DOCS_SCREENSHOT = REPO / "docs" / "img" / "ui.png"
TOKEN = "ui-test-token"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")

try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
except ImportError:  # the dev extra installs it
    webdriver = None

pytestmark = pytest.mark.skipif(webdriver is None or CHROMIUM is None or DRIVER is None,
                                reason="no headless browser: apt-get install chromium chromium-driver (and pip selenium)")


def _wait(what: str, condition, timeout_s: float, every_s: float = 0.1):
    """Poll ``condition`` until it returns a truthy value (returned), or fail saying ``what``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(every_s)


def _start_demo(tmp_path: Path, bootstrap: str, env: dict[str, str]) -> tuple[subprocess.Popen, "queue.Queue[str]"]:
    """A small demo whose replay lasts ~45 s (long enough to watch, with margin on a loaded machine), its stdout lines in a queue."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tgastream.stream.cli", "demo", "--out", str(tmp_path / "report"), "--events", "6000",
         "--users", "20", "--rate", "130", "--bootstrap", bootstrap, "--dim", "16", "--heads", "2", "--layers", "1",
         "--batch-size", "64", "--partitions", "2", "--timeout", "300", "--api-port", "0", "--quiet"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **env},
        preexec_fn=die_with_parent)
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    return proc, lines


def _page_url(proc: subprocess.Popen, lines: "queue.Queue[str]", seen: list[str]) -> str:
    deadline = time.monotonic() + 150  # cold starts of three processes importing torch, beside other tests
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            if proc.poll() is not None:
                break
            continue
        seen.append(line)
        m = re.search(r"live page: (http://127\.0\.0\.1:\d+)/ui", line)
        if m:
            return m.group(1)
    raise AssertionError("the demo printed no live page address:\n" + "".join(seen)[-3000:])


def _browser():
    opts = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1500,1000",
                "--disable-extensions", "--no-first-run"):
        opts.add_argument(arg)
    opts.binary_location = CHROMIUM
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(DRIVER), options=opts)


def _click_first(driver, selector: str) -> bool:
    """Click the first element matching ``selector``; False when there is none (yet) or it was
    just redrawn (the list of active users changes as events arrive)."""
    from selenium.common.exceptions import StaleElementReferenceException

    try:
        found = driver.find_elements(By.CSS_SELECTOR, selector)
        if found:
            found[0].click()
        return bool(found)
    except StaleElementReferenceException:
        return False


def _produce(bootstrap: str, topic: str, user: str, item: str, ts: float) -> None:
    from kafka import KafkaProducer

    from tgastream.core.events import Event

    producer = KafkaProducer(bootstrap_servers=bootstrap)
    producer.send(topic, key=user.encode(), value=Event(user, item, "probe", "click", ts).to_json())
    producer.flush()
    producer.close()


def test_live_page_follows_the_demo_in_a_real_browser(tmp_path: Path, broker):
    tag = uuid.uuid4().hex[:8]
    topics = {"TGASTREAM_EVENTS_TOPIC": f"ui-events-{tag}", "TGASTREAM_DLQ_TOPIC": f"ui-dlq-{tag}",
              "TGASTREAM_SAMPLES_TOPIC": f"ui-samples-{tag}", "TGASTREAM_EMBEDDINGS_TOPIC": f"ui-embeddings-{tag}",
              "TGASTREAM_FEATURES_TOPIC": f"ui-features-{tag}"}
    proc, lines = _start_demo(tmp_path, broker.bootstrap, {**topics, "TGASTREAM_API_TOKEN": TOKEN})
    driver = None
    seen: list[str] = []
    try:
        base = _page_url(proc, lines, seen)
        driver = _browser()
        js = lambda expr: driver.execute_script(f"return {expr};")  # noqa: E731

        # the right token: data arrives and advances while the replay runs
        driver.get(f"{base}/ui#token={TOKEN}")
        _wait("the first rows of metrics", lambda: js("tgaUi.connected && tgaUi.rows.length >= 2"), 30)
        first = js("tgaUi.rows[tgaUi.rows.length - 1]")
        _wait("the events counter to advance in the page's series", lambda: (js(
            "tgaUi.rows[tgaUi.rows.length - 1].events_in") or 0) > (first["events_in"] or 0), 15)
        assert js("tgaUi.rows.length") > 2 and js("tgaUi.rows[tgaUi.rows.length - 1].t") > first["t"]

        # a user: pick the most active one, wait for their vector, then replay one new event of theirs
        _wait("a click on an active user's button", lambda: _click_first(driver, "#active-list .pick-user"), 30)
        user = js("tgaUi.user")
        view = _wait(f"user {user}'s vector and events", lambda: js(
            "tgaUi.view && tgaUi.view.model_version !== null && tgaUi.view.events.length > 0 ? tgaUi.view : null"), 30)
        version0 = view["model_version"]
        item = f"probe-{tag}"
        _produce(broker.bootstrap, topics["TGASTREAM_EVENTS_TOPIC"], user, item, view["events"][0]["ts"] + 1)
        sent = time.monotonic()
        _wait("the replayed event in the user panel",
              lambda: driver.find_elements(By.CSS_SELECTOR, f"#user-events tr[data-item='{item}']"), 2.0, every_s=0.05)
        shown_after = time.monotonic() - sent
        assert shown_after <= 2.0
        _wait("the recommendations' model version to change", lambda: driver.find_element(
            By.ID, "rec-version").text not in ("–", str(version0)), 60, every_s=0.25)
        assert len(driver.find_elements(By.CSS_SELECTOR, "#user-recs li")) == 10

        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors

        # a wrong token: the stream is refused, the page gets and shows no data
        driver.get(f"{base}/ui#token=wrong-{TOKEN}")
        _wait("the page to report the refused token", lambda: js("tgaUi.unauthorized"), 15)
        assert js("tgaUi.received") == 0 and js("tgaUi.rows.length") == 0
        assert "refused" in driver.find_element(By.ID, "message").text
        assert httpx.get(f"{base}/ui/stream", headers={"Authorization": "Bearer wrong"}, timeout=5).status_code == 401

        # the screenshot, with the run's history (up to 25 s of it: the replay may be over sooner)
        driver.get(f"{base}/ui?user={user}#token={TOKEN}")
        _wait("rows again", lambda: js("tgaUi.rows.length > 0 && tgaUi.view !== null"), 15)
        end = time.monotonic() + 25
        while time.monotonic() < end and js("tgaUi.rows.length") < 25:
            time.sleep(0.5)
        shot = DOCS_SCREENSHOT if os.environ.get("UPDATE_UI_SCREENSHOT") == "1" else tmp_path / "ui.png"
        shot.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 20_000
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE" and "401" not in e["message"]]
        assert not errors, errors  # (the 401 is the wrong token's, above)

        # the demo stops: the page keeps its last state and says the stream ended
        proc.send_signal(signal.SIGTERM)
        _wait("'stream ended' on the page", lambda: "stream ended" in driver.find_element(By.ID, "stream-state").text, 60,
              every_s=0.25)
        assert js("tgaUi.rows.length") > 0 and driver.find_elements(By.CSS_SELECTOR, "#user-events tr")
        print(json.dumps({"event_shown_after_s": round(shown_after, 3)}))
    except Exception:
        while not lines.empty():
            seen.append(lines.get())
        print("".join(seen)[-4000:])
        raise
    finally:
        if driver is not None:
            driver.quit()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _serve_in_thread(app, port: int) -> tuple[threading.Thread, "asyncio.AbstractEventLoop"]:
    """``app`` on 127.0.0.1:``port`` in its own event loop thread (stopped with ``loop.stop``)."""
    import asyncio

    from aiohttp import web

    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app)

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        loop.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, loop


def test_the_page_says_the_trainer_is_down_and_marks_rollbacks(tmp_path: Path):
    """No demo: an API whose trainer answers, then stops; a rollback on the time axis; no click-time metrics."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

    from tgastream.state.serving import ServingStore
    from tgastream.stream.broker import free_port
    from tgastream.stream.serve import build_app
    from tgastream.stream.ui import UI_KEY, UiConfig

    registry = CollectorRegistry()
    version = Gauge("tgastream_model_version", "version", registry=registry)
    rollbacks = Counter("tgastream_trainer_rollbacks", "rollbacks", registry=registry)
    t_port, port = free_port(), free_port()
    trainer, _ = start_http_server(t_port, "127.0.0.1", registry=registry)
    store = ServingStore(tmp_path / "serving")
    app = build_app(store, model_state=lambda: {"state": "rolled_back", "version": 3},
                    ui=UiConfig(trainer_metrics=f"http://127.0.0.1:{t_port}/metrics", interval_s=0.25, down_after_s=1.0))
    thread, loop = _serve_in_thread(app, port)
    driver = None
    try:
        _wait("the API", lambda: httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200, 30)
        driver = _browser()
        js = lambda expr: driver.execute_script(f"return {expr};")  # noqa: E731
        driver.get(f"http://127.0.0.1:{port}/ui")
        for v in range(1, 6):  # the model moves, then the guard rolls back
            version.set(v)
            time.sleep(0.3)
        rollbacks.inc()
        _wait("the rollback marker", lambda: js("tgaUi.markers.length") == 1, 10)
        assert driver.find_element(By.ID, "guard-state").text == "rolled back v3"
        assert driver.find_element(By.ID, "trainer-state").text == "up"
        assert driver.find_element(By.ID, "quality-na").is_displayed()  # no click-time metrics exported
        trainer.shutdown()
        trainer.server_close()
        _wait("the trainer tile to say down", lambda: driver.find_element(By.ID, "trainer-state").text.startswith(
            "down since"), 10)
        assert "trainer is not answering" in driver.find_element(By.ID, "message").text
        rows = js("tgaUi.rows.length")
        _wait("rows to keep coming with the trainer down", lambda: js("tgaUi.rows.length") > rows + 2, 10)
        assert js("tgaUi.rows[tgaUi.rows.length - 1].model_version") is None
        assert not [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert app[UI_KEY][0].markers[0]["kind"] == "rollback"
    finally:
        if driver is not None:
            driver.quit()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(15)
        store.close()
