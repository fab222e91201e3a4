"""A poisoned stretch fed into a live trainer (real broker, `tgastream train` process): the guard
trips within its window (it holds: publishes the good model, since the stream looks broken), rolls
the online model back once the stretch is over (what it learned from it goes), from the trip until
it recovers every vector published carries the good version, the next checkpoint records the good
version as its parent, and the online metrics recover after the stretch; the same stream without
the poison never rolls back."""

from __future__ import annotations

import json
import math
import random

import pytest
from kafka import KafkaConsumer, TopicPartition

from tgastream.bench.guard import poison
from tgastream.core.events import BEHAVIORS, Event
from tgastream.state.registry import Registry
from tgastream.state.samples import samples_from_events
from tgastream.state.serving import VectorRecord
from tgastream.stream.replay import make_producer
from tgastream.stream.synth import SynthConfig, generate
from tgastream.stream.topics import ensure_app_topics
from tests.trainer_util import history, start_trainer

BATCH = 64
POISON_STEPS = (25, 55)  # steps [25, 55) see the poisoned stretch (every step is one batch of 64, in order)
WINDOW_STEPS = 12  # the guard's window in steps: ~19 retrieval rows scored a step, min 150 of them
ARGS = ("--train-policy", "bounded", "--burst", "1", "--batch-size", str(BATCH),  # the default learning rate
        "--checkpoint-every-steps", "5", "--checkpoint-every-s", "1000", "--idle-exit", "3", "--sample-len", "20",
        "--guard-window", "400", "--guard-min-retrievals", "150", "--guard-min-positives", "5", "--shadow-share", "0.5",
        "--guard-margin", "0.06")  # the default model: with the repeat prior (its learned pointer bounded, see
# model/retrieval_head.py; unbounded, seed 1 of the healthy stream dipped 0.067 HR@10 and rolled back at step 72-74)


def _stream(seed: int, poisoned: bool) -> list:
    rows = generate(SynthConfig(users=120, events=4400, items=400, seed=seed))
    events = [Event(str(u + 1), str(i + 1), str(c + 1), BEHAVIORS[b], float(ts)) for ts, u, i, c, b in rows]
    samples = samples_from_events(events, sample_len=20, final_watermark=events[-1].ts + 2 * 86400)
    samples.sort(key=lambda s: s.event_ts)
    samples = samples[:90 * BATCH]
    if poisoned:
        lo, hi = POISON_STEPS[0] * BATCH, POISON_STEPS[1] * BATCH
        samples[lo:hi] = poison(samples[lo:hi], 1.0, random.Random(seed), "spam")
    for k, s in enumerate(samples):
        s.partition, s.offset = 0, k
    return samples


def _run(settings, tmp_path, name: str, samples: list, seed: int) -> list[dict]:
    ensure_app_topics(settings.bootstrap, settings)
    producer = make_producer(settings.bootstrap)
    for s in samples:  # one partition: the trainer reads them in stream order, one batch a step
        producer.send(settings.samples_topic, key=s.user_id.encode(), value=s.to_bytes(), partition=0)
    producer.flush()
    producer.close()
    data = tmp_path / name
    proc = start_trainer(settings, data, tmp_path / f"{name}.log", *ARGS, "--seed", str(seed))
    assert proc.wait(600) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
    return history(data)


def _published(settings) -> list[VectorRecord]:
    consumer = KafkaConsumer(bootstrap_servers=settings.bootstrap, enable_auto_commit=False, group_id=None)
    tps = [TopicPartition(settings.embeddings_topic, p) for p in consumer.partitions_for_topic(settings.embeddings_topic)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    out, idle = [], 0
    while idle < 3:
        polled = consumer.poll(1000)
        idle = 0 if polled else idle + 1
        out += [VectorRecord.from_bytes(r.value) for recs in polled.values() for r in recs
                if r.key.startswith((b"user:", b"item:"))]
    consumer.close()
    return out


def _hr(row: dict, model: str = "online") -> float | None:
    return (row.get("shadow") or {}).get(model, {}).get("hr@10")


@pytest.mark.slow
def test_poisoned_stretch_rolls_back_publishes_the_good_model_and_recovers(topic_settings, tmp_path):
    settings = topic_settings
    rows = _run(settings, tmp_path, "poisoned", _stream(11, poisoned=True), seed=0)
    events = [(r["step"], r["guard_event"], r["model_state"]) for r in rows if r["guard_event"]]
    tripped = [r for r in rows if r["guard_event"] in ("rollback", "hold")]  # hold: publish the good model
    rollbacks = [r for r in rows if r["guard_event"] == "rollback"]
    assert tripped and rollbacks, events
    first = tripped[0]
    assert POISON_STEPS[0] < first["step"] <= POISON_STEPS[0] + WINDOW_STEPS, events  # within its window
    good = first["serving_version"]
    assert good < POISON_STEPS[0] + 1 and first["model_state"] == "rolled_back"
    assert rollbacks[0]["step"] <= POISON_STEPS[1] + WINDOW_STEPS, events  # what it learned meanwhile is dropped

    # every vector published after a step is the model that step left serving (the good one while rolled back)
    times = [r["time"] for r in rows]
    held = 0
    for rec in _published(settings):
        before = [k for k, t in enumerate(times) if t < rec.publish_ts]
        if not before or rows[before[-1]]["step"] < first["step"]:
            continue
        row = rows[before[-1]]
        assert rec.model_version == row["serving_version"], (rec.model_version, row)
        held += row["model_state"] == "rolled_back"
    assert held > 0  # some vectors were published while rolled back, all from the good version

    reg = Registry.load(tmp_path / "poisoned" / "checkpoints")
    assert reg.get(good).status == "good"
    after = [v for v in reg.versions if v.version >= rollbacks[0]["step"]]  # (a checkpoint follows a step)
    assert after and after[0].parent == rollbacks[0]["serving_version"]  # the next version records the good one
    assert len({v.version for v in reg.versions}) == len(reg.versions)

    before_stretch, repeat_before = _hr(rows[POISON_STEPS[0] - 2]), _hr(rows[POISON_STEPS[0] - 2], "repeat")
    repeat_during = [h for r in rows if POISON_STEPS[0] + 12 <= r["step"] < POISON_STEPS[1]
                     and (h := _hr(r, "repeat")) is not None]
    end = _hr(rows[-1])
    # the stretch was broken: the model-free reference fell by over 4 standard errors of a window's mean
    assert repeat_before and max(repeat_during) < repeat_before - 4 * math.sqrt(repeat_before * (1 - repeat_before) / 400)
    assert before_stretch and end is not None and end >= 0.8 * before_stretch  # the online metrics recovered after it
    assert rows[-1]["model_state"] == "live"


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_the_same_stream_without_poison_never_rolls_back(topic_settings, tmp_path, seed):
    rows = _run(topic_settings, tmp_path, "healthy", _stream(11, poisoned=False), seed=seed)
    assert len(rows) >= 85
    assert not [r for r in rows if r["guard_event"] == "rollback"]
    assert any(r["guard_event"] == "promoted" for r in rows)  # the guard was comparing against a baseline
    assert {r["model_state"] for r in rows} == {"live"}
    print(json.dumps({"steps": len(rows), "promotions": sum(r["guard_event"] == "promoted" for r in rows)}))
