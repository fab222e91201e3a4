"""Items the trainer evicts (no event for ``idle_ttl_s`` of event time) leave serving: their
vectors are deleted from the trainer's store and tombstoned on the embeddings topic, so no API
replica keeps recommending an item whose row now belongs to another."""

from __future__ import annotations

from tgastream.state.serving import ServingStore
from tgastream.stream.materialize import ITEM_PREFIX
from tgastream.stream.topics import ensure_app_topics
from tests.kafka_util import read_topic
from tests.trainer_util import produce_identified_samples, start_trainer, stats


def test_evicted_items_are_tombstoned_and_the_topic_agrees_with_the_store(topic_settings, tmp_path):
    settings = topic_settings
    ensure_app_topics(settings.bootstrap, settings)
    produce_identified_samples(settings, 2000, seed=4)  # 40 users, 300 items over 9 days of event time
    data = tmp_path / "trainer"
    proc = start_trainer(settings, data, tmp_path / "t.log", "--batch-size", "64", "--idle-exit", "4",
                         "--sample-len", "20", "--idle-ttl-s", "3600", "--evict-every", "2", "--guard", "false")
    assert proc.wait(300) == 0, (tmp_path / "t.log").read_text()[-3000:]
    assert stats(data)["trained"] > 0

    last: dict[str, bytes | None] = {}  # item → its last record's value on the topic (None: a tombstone)
    tombstones = 0
    for r in read_topic(settings.bootstrap, settings.embeddings_topic):  # per partition, in offset order
        if r.key is not None and r.key.startswith(ITEM_PREFIX):
            item = r.key[len(ITEM_PREFIX):].decode()
            last[item] = r.value
            tombstones += r.value is None
    assert tombstones > 0, "nothing was evicted: the test's stream no longer exercises eviction"
    gone = {i for i, v in last.items() if v is None}
    live = {i for i, v in last.items() if v is not None}
    assert gone and live
    with ServingStore(data / "serving") as store:  # the trainer's own store says the same
        assert all(store.item(i) is None for i in gone)
        assert all(store.item(i) is not None for i in live)
