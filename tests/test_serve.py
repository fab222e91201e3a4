"""The HTTP API against a running server process, through a real HTTP client."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tgastream.state.serving import ServingStore, VectorRecord
from tgastream.stream.broker import die_with_parent, free_port


def rec(vec, version=3) -> VectorRecord:
    return VectorRecord(version, 1511658000.0, time.time(), np.asarray(vec, dtype=np.float32))


def _start(tmp_path: Path, store: Path | None, *extra: str, env: dict[str, str] | None = None):
    """`tgastream serve` on a free port: over the trainer's ``store``, or (None) fed by the topic."""
    port = free_port()
    source = ["--store", str(store)] if store is not None else []
    proc = subprocess.Popen([sys.executable, "-m", "tgastream.stream.cli", "serve", *source, "--api-port", str(port),
                             "--data-dir", str(tmp_path), *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})}, preexec_fn=die_with_parent)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120  # a cold start imports torch: seconds idle, a minute beside parallel tests
    while True:
        try:
            if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()  # reading a live process's pipe would block until the test's timeout
            raise AssertionError(f"serve did not come up (rc {proc.wait()}): {proc.stdout.read() if proc.stdout else ''}")
        time.sleep(0.2)
    return base, proc


def _serving(tmp_path: Path):
    """A serving store written by 'the trainer' (this test) and a `tgastream serve` process reading it."""
    path = tmp_path / "serving"
    writer = ServingStore(path)
    writer.write(
        users={"u1": rec([1, 0]), "u2": rec([0, 1])},
        items={"a": rec([3, 0]), "b": rec([2, 0]), "c": rec([1, 1]), "d": rec([0, 5])},
        bought={"u1": ["a"]}, model_version=3,
    )
    base, proc = _start(tmp_path, path)
    try:
        yield base, writer
    finally:
        proc.terminate()
        proc.wait(10)
        writer.close()


def _guarded(tmp_path: Path, token: str):
    """`tgastream serve` over a one-user, one-item store with ``token`` as its api_token (from the
    environment, as a deployment would set it): yields (base URL, process); after it stops, the
    token must appear nowhere in its output (the settings are printed at start, the token never)."""
    writer = ServingStore(tmp_path / "serving")
    writer.write(users={"u1": rec([1, 0])}, items={"a": rec([3, 0])}, model_version=3)
    base, proc = _start(tmp_path, tmp_path / "serving", env={"TGASTREAM_API_TOKEN": token})
    try:
        yield base, proc
    finally:
        proc.terminate()
        output = proc.communicate(timeout=10)[0]
        writer.close()
        assert token not in output


@pytest.fixture
def api(tmp_path: Path):
    """A server of this test's own (for tests that write to the store)."""
    yield from _serving(tmp_path)


@pytest.fixture(scope="module")
def shared_api(tmp_path_factory: pytest.TempPathFactory):
    """One server for the read-only tests of this module (a server start costs seconds)."""
    yield from _serving(tmp_path_factory.mktemp("serve"))


def test_embedding_and_recommendations_exclude_bought_items(api):
    base, _ = api
    r = httpx.get(base + "/v1/users/u1/embedding")
    assert r.status_code == 200 and r.json()["vector"] == [1.0, 0.0] and r.json()["model_version"] == 3
    r = httpx.get(base + "/v1/users/u1/recommendations", params={"k": 2})
    assert [i["item_id"] for i in r.json()["items"]] == ["b", "c"]  # a is bought
    r = httpx.get(base + "/v1/users/u2/recommendations", params={"k": 10})
    assert [i["item_id"] for i in r.json()["items"]] == ["d", "c", "a", "b"]


def test_recommendations_keep_one_category_when_asked(api):
    base, writer = api
    writer.write(users={}, items={}, categories={"a": "x", "b": "y", "c": "x", "d": "y"}, model_version=5)

    def ids(user: str, category: str) -> list[str]:
        r = httpx.get(base + f"/v1/users/{user}/recommendations", params={"k": 10, "category": category})
        assert r.status_code == 200, r.text
        return [i["item_id"] for i in r.json()["items"]]

    deadline = time.monotonic() + 5
    while ids("u1", "x") != ["c"]:  # a is x too, but bought
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert ids("u2", "y") == ["d", "b"] and ids("u2", "no such category") == []
    r = httpx.get(base + "/v1/users/u1/recommendations", params={"category": "x" * 300})
    assert r.status_code == 400 and "category" in r.json()["error"]


def test_new_writes_become_visible_to_the_running_server(api):
    base, writer = api
    assert httpx.get(base + "/v1/users/u9/embedding").status_code == 404
    writer.write(users={"u9": rec([0, 2], version=4)}, items={}, model_version=4)
    deadline = time.monotonic() + 5
    while httpx.get(base + "/v1/users/u9/embedding").status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert httpx.get(base + "/healthz").json()["model_version"] == 4


@pytest.mark.parametrize("method,path,body,status,fragment", [
    ("GET", "/v1/users/nobody/embedding", None, 404, "unknown user"),
    ("GET", "/v1/users/nobody/recommendations", None, 404, "unknown user"),
    ("GET", "/v1/users/u1/recommendations?k=abc", None, 400, "k must be an integer"),
    ("GET", "/v1/users/u1/recommendations?k=0", None, 400, "k must be in"),
    ("GET", "/v1/users/u1/recommendations?k=5000", None, 400, "k must be in"),
    ("POST", "/v1/score", b"{not json", 400, "body must be JSON"),
    ("POST", "/v1/score", b"[1]", 400, "JSON object"),
    ("POST", "/v1/score", b'{"items": ["a"]}', 400, "user_id"),
    ("POST", "/v1/score", b'{"user_id": "u1", "items": []}', 400, "non-empty"),
    ("POST", "/v1/score", b'{"user_id": "u1", "items": [{"category_id": "1"}]}', 400, "item_id"),
    ("GET", "/v1/nothing", None, 404, ""),
])
def test_bad_requests_get_json_errors(shared_api, method, path, body, status, fragment):
    base, _ = shared_api
    r = httpx.request(method, base + path, content=body)
    assert r.status_code == status
    assert fragment in r.json()["error"]


def test_metrics_count_requests(api):
    base, _ = api
    httpx.get(base + "/v1/users/u1/embedding")
    text = httpx.get(base + "/metrics").text
    assert 'tgastream_api_requests_total{route="/v1/users/{user_id}/embedding",status="200"}' in text


def test_score_uses_the_trainers_checkpoint(tmp_path: Path):
    from tgastream.model.config import ModelConfig, OnlineConfig
    from tgastream.model.online import OnlineLearner
    from tgastream.state.checkpoint import save_checkpoint
    from tgastream.state.samples import samples_from_events
    from tgastream.core.events import BEHAVIORS, Event
    from tgastream.stream.synth import SynthConfig, generate

    rows = generate(SynthConfig(users=20, events=600, seed=2))
    events = [Event(str(u + 1), str(i + 1), str(c + 1), BEHAVIORS[b], float(ts)) for ts, u, i, c, b in rows]
    samples = samples_from_events(events, sample_len=20)
    learner = OnlineLearner(ModelConfig(n_items=1, n_categories=1, dim=16, heads=2, layers=1, dropout=0.0),
                            OnlineConfig(device="cpu", sample_len=20, chunk=64))
    out = learner.step(samples[:200])
    writer = ServingStore(tmp_path / "serving")
    writer.write(users={}, items={}, contexts=out.contexts, model_version=1)
    writer.close()
    base, proc = _start(tmp_path, tmp_path / "serving", "--device", "cpu")
    try:
        assert httpx.get(base + "/healthz").json()["scorer"] is False
        assert httpx.post(base + "/v1/score", json={"user_id": "1", "items": ["5"]}).status_code == 503
        save_checkpoint(tmp_path / "checkpoints", 1, {"learner": learner.state_dict(), "offsets": {}})
        uid = next(iter(out.contexts))
        body = {"user_id": uid, "items": [{"item_id": samples[0].item_id, "category_id": samples[0].category_id}, "nope"]}
        deadline = time.monotonic() + 30
        while (r := httpx.post(base + "/v1/score", json=body)).status_code == 503:
            assert time.monotonic() < deadline
            time.sleep(0.5)
        assert r.status_code == 200, r.text
        scores = r.json()["scores"]
        assert [x["item_id"] for x in scores] == [samples[0].item_id, "nope"]
        assert all(0.0 < x["probability"] < 1.0 for x in scores) and r.json()["known_user"] is True
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_taken_port_stops_serve_with_one_readable_line(tmp_path: Path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = subprocess.run([sys.executable, "-m", "tgastream.stream.cli", "serve", "--store", str(tmp_path / "s"),
                              "--api-port", str(port), "--data-dir", str(tmp_path)],
                             capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert "Traceback" not in res.stderr and f"cannot listen on 127.0.0.1:{port}" in res.stderr, res.stderr
