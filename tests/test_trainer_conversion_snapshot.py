"""The live trainer with ``--conversion-snapshot-steps``: every click's P(buy) comes from the
learner's snapshot (none handed over from the publishing forward, none left to the training
step), every label finds its click's prediction, and every sample is trained once."""

from __future__ import annotations

from tgastream.state.samples import CLICK, CONVERSION
from tgastream.stream.topics import ensure_app_topics
from tests.trainer_util import produce_identified_samples, start_trainer, stats


def test_a_trainer_with_a_conversion_snapshot_judges_every_click_and_trains_every_sample(topic_settings, tmp_path):
    settings = topic_settings
    ensure_app_topics(settings.bootstrap, settings)
    samples = produce_identified_samples(settings, 1500, seed=4)
    clicks = sum(s.kind == CLICK for s in samples)
    labels = sum(s.kind == CONVERSION for s in samples)
    data = tmp_path / "trainer"
    proc = start_trainer(settings, data, tmp_path / "t.log", "--batch-size", "64", "--idle-exit", "4",
                         "--sample-len", "20", "--conversion-snapshot-steps", "3")
    assert proc.wait(300) == 0, (tmp_path / "t.log").read_text()[-3000:]
    st = stats(data)
    assert st["trained"] == len(samples)
    online = st["online"]
    assert clicks > 0 and labels > 0
    assert online["clicktime_predicted"] == clicks and online["clicktime_in_step"] == 0
    assert online["clicktime_snapshot"] == clicks  # every one by the snapshot
    assert online["clicktime_joined"] == labels and online["clicktime_unmatched"] == 0
