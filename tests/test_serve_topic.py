"""An API replica on its own data dir, fed by the embeddings topic: it serves what the trainer
published, sees a new vector within a second, and a restart resumes from its own store."""

from __future__ import annotations

import statistics
import time

import httpx
import numpy as np

from tgastream.state.serving import bought_key, bought_value, item_key, user_key
from tgastream.stream.replay import make_producer
from tgastream.stream.topics import ensure_app_topics
from tests.test_serve import _start, rec


def _publish(settings, records: dict[bytes, bytes]) -> None:
    producer = make_producer(settings.bootstrap, linger_ms=0)
    for key, value in records.items():
        producer.send(settings.embeddings_topic, key=key, value=value)
    producer.flush()
    producer.close()


def _visible_after(base: str, path: str, timeout_s: float = 10.0) -> float:
    t0 = time.monotonic()
    while httpx.get(base + path, timeout=2).status_code != 200:
        assert time.monotonic() - t0 < timeout_s, f"{path} not served after {timeout_s} s"
        time.sleep(0.02)
    return time.monotonic() - t0


def test_a_replica_serves_the_topic_sees_new_vectors_within_a_second_and_resumes(topic_settings, tmp_path):
    settings = topic_settings
    ensure_app_topics(settings.bootstrap, settings)
    _publish(settings, {user_key("u1"): rec([1, 0]).to_bytes(), user_key("u2"): rec([0, 1]).to_bytes(),
                        item_key("a"): rec([3, 0]).to_bytes(), item_key("b"): rec([2, 0]).to_bytes(),
                        item_key("c"): rec([1, 1]).to_bytes(), item_key("d"): rec([0, 5], version=4).to_bytes(),
                        bought_key("u1"): bought_value(["a"])})
    flags = ("--bootstrap", settings.bootstrap, "--partitions", str(settings.partitions),
             "--embeddings-topic", settings.embeddings_topic)
    replica = tmp_path / "replica"
    base, proc = _start(replica, None, *flags)
    try:
        deadline = time.monotonic() + 20
        while not httpx.get(base + "/healthz").json()["source"]["caught_up"]:  # read to the topic's end
            assert time.monotonic() < deadline
            time.sleep(0.05)
        r = httpx.get(base + "/v1/users/u1/recommendations", params={"k": 2})
        assert [i["item_id"] for i in r.json()["items"]] == ["b", "c"]  # a is bought; from the topic's bought:u1
        assert httpx.get(base + "/healthz").json()["model_version"] == 4

        latencies = []
        for k in range(5):
            _publish(settings, {user_key(f"new{k}"): rec([k, 1], version=5).to_bytes()})
            latencies.append(_visible_after(base, f"/v1/users/new{k}/embedding"))
        assert statistics.median(latencies) < 1.0, latencies
        _publish(settings, {item_key("e"): rec([9, 9], version=5).to_bytes()})  # the item index grows in place
        _visible_after(base, "/v1/users/new4/embedding")
        deadline = time.monotonic() + 10
        while httpx.get(base + "/v1/users/u2/recommendations", params={"k": 1}).json()["items"][0]["item_id"] != "e":
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(10)

    base, proc = _start(replica, None, *flags)  # restart on the same data dir: serves from its store at once
    try:
        assert httpx.get(base + "/v1/users/new3/embedding").json()["vector"] == [3.0, 1.0]
        health = httpx.get(base + "/healthz").json()
        assert health["source"]["records"] == 0  # resumed from its stored offsets: nothing read again
        _publish(settings, {user_key("after"): rec(np.array([2, 2])).to_bytes()})
        _visible_after(base, "/v1/users/after/embedding")
    finally:
        proc.terminate()
        proc.wait(10)


def test_the_live_item_index_updates_rows_in_place_and_grows():
    from tgastream.state.ann_index import ItemVectorIndex

    index = ItemVectorIndex()
    for k in range(1500):  # past the first capacity of 1024 rows
        index.put(f"i{k}", np.array([k, 1.0], dtype=np.float32))
    index.put("i7", np.array([-1.0, -1.0], dtype=np.float32))  # an update keeps its row
    ids, matrix = index.get()
    assert len(ids) == 1500 == matrix.shape[0] and matrix.shape[1] == 2
    assert ids[7] == "i7" and matrix[7].tolist() == [-1.0, -1.0] and matrix[1499].tolist() == [1499.0, 1.0]
    index.put("x", np.zeros(3, dtype=np.float32))  # a model of another width: the old rows are gone
    assert index.get()[0] == ["x"] and index.get()[1].shape == (1, 3)
