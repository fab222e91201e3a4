"""Publishing apart from training: while a training step is in progress (held here for as long as
the test likes), newly arrived samples are still read and their vectors published, with the
weights of the newest finished step; after the step the trainer trains everything."""

from __future__ import annotations

import threading
import time
import zlib

from tgastream.core.events import BEHAVIORS, Event
from tgastream.model.config import OnlineConfig
from tgastream.model.online import OnlineLearner
from tgastream.state.samples import samples_from_events
from tgastream.state.serving import ServingStore
from tgastream.stream.configs import online_model_config
from tgastream.stream.replay import make_producer
from tgastream.stream.synth import SynthConfig, generate
from tgastream.stream.topics import ensure_app_topics
from tgastream.stream.trainer import Trainer


class HeldLearner(OnlineLearner):
    """An online learner whose first optimizer step waits until the test releases it: a training
    step as long as the test needs."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.entered = threading.Event()
        self.release = threading.Event()

    def learn(self, samples, *args, **kwargs) -> float:
        if self.version == 0 and samples:
            self.entered.set()
            assert self.release.wait(300), "never released"
        return super().learn(samples, *args, **kwargs)


def _samples(n_events: int) -> list:
    rows = generate(SynthConfig(users=40, events=n_events, items=300, seed=9))
    events = [Event(str(u + 1), str(i + 1), str(c + 1), BEHAVIORS[b], float(ts)) for ts, u, i, c, b in rows]
    return samples_from_events(events, sample_len=20, final_watermark=events[-1].ts + 2 * 86400)


def _produce(settings, samples, offsets: dict[int, int]) -> None:
    """As a worker stamps them: partition by user, offsets counting on from ``offsets``."""
    producer = make_producer(settings.bootstrap)
    for s in samples:
        p = zlib.crc32(s.user_id.encode()) % settings.partitions
        s.partition, s.offset = p, offsets.get(p, 0)
        offsets[p] = s.offset + 1
        s.arrival_ts = time.time()
        producer.send(settings.samples_topic, key=s.user_id.encode(), value=s.to_bytes(), partition=p)
    producer.flush()
    producer.close()


def _wait(cond, what: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_long_training_step_does_not_delay_publishing(topic_settings, one_thread):
    settings = topic_settings.replace(batch_size=64, guard=False, dim=16, heads=2, layers=1, sample_len=20,
                                      device="cpu", threads=1, checkpoint_every_steps=10_000,
                                      checkpoint_every_s=10_000.0)
    ensure_app_topics(settings.bootstrap, settings)
    samples = _samples(900)
    first, second = samples[:200], samples[200:]
    learner = HeldLearner(online_model_config(settings),
                          OnlineConfig(device="cpu", threads=1, sample_len=20, seed=settings.seed))
    trainer = Trainer(settings, settings.bootstrap, learner)
    offsets: dict[int, int] = {}
    _produce(settings, first, offsets)
    done: list = []
    runner = threading.Thread(target=lambda: done.append(trainer.serve_forever(idle_exit_s=3.0)), daemon=True)
    runner.start()
    try:
        _wait(learner.entered.is_set, "the first training step")
        published_before = trainer.run.published_users
        _produce(settings, second, offsets)
        # the step is still held: every sample of the second wave is read and its users' vectors go out
        _wait(lambda: trainer.run.samples >= len(samples), "the second wave published during the step")
        assert not learner.release.is_set() and learner.version == 0 and trainer.run.steps == 0
        assert trainer.run.published_users > published_before
        assert len(trainer.run.freshness) >= sum(1 for s in second if s.kind == 0 and s.arrival_ts > 0) > 0
        assert trainer.stats()["publishing"] == "thread"
        assert max(trainer.run.version_lags) == 0  # (no step has finished: version 0's weights)
    finally:
        learner.release.set()
    runner.join(timeout=300)
    assert done, "the trainer did not exit"
    run = done[0]
    assert run.trained == len(samples) and run.samples == len(samples)
    assert learner.version == run.steps > 1
    serving = ServingStore(settings.data_dir / "serving")
    try:
        versions = {serving.user(s.user_id).model_version for s in second[-20:]}
    finally:
        serving.close()
    assert versions and max(versions) <= learner.version


def test_the_inference_copy_is_refreshed_in_place_but_never_while_it_is_published_from():
    import torch

    from tgastream.stream.publisher import LatestModel

    learner = OnlineLearner(online_model_config(_small()), OnlineConfig(device="cpu", threads=1, chunk=64))
    weight = lambda m: m.model.embed.item.weight  # noqa: E731
    other = OnlineLearner(online_model_config(_small()), OnlineConfig(device="cpu", threads=1, chunk=64))
    latest = LatestModel()
    latest.put(learner, 0)
    with latest.use() as held:
        before = weight(held).clone()
        with torch.no_grad():
            weight(learner).add_(1.0)
        latest.put(learner, 1)
        latest.put(learner, 2)  # the spare is the held copy: a new one is built instead
        assert held.version == 0 and torch.equal(weight(held), before)
        assert latest.get() is not held and latest.get().version == 2
        # still known as the learner's copy (its clicks' predictions are handed to the learner)
        assert latest.copied_from(held, learner) and not latest.copied_from(held, other)
    first_after = latest.get()
    latest.put(learner, 3)  # the spare (version 1's copy) is free: refreshed in place, swapped in
    current = latest.get()
    assert current is not first_after and current.version == 3 and latest.rebuilt == 3 and latest.swaps == 4
    assert torch.equal(weight(current), weight(learner)) and not weight(current).requires_grad
    latest.put(other, 4)  # (e.g. the guard's good model while rolled back)
    assert not latest.copied_from(latest.get(), learner) and latest.copied_from(latest.get(), other)


def _small():
    from tgastream.core.settings import Settings

    return Settings(dim=16, heads=2, layers=1)
