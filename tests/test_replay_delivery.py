"""A replay or copy that loses records says so in one line instead of counting them sent."""

from __future__ import annotations

import pytest
from kafka.errors import KafkaTimeoutError
from kafka.future import Future

from tgastream.stream.replay import Deliveries, DeliveryError


def test_every_acknowledged_send_passes_the_check():
    deliveries = Deliveries()
    futures = [Future() for _ in range(3)]
    for f in futures:
        deliveries.track(f)
        f.success(None)
    deliveries.check("events on broker:9092")
    assert deliveries.failed == 0


def test_a_send_the_broker_never_acknowledged_fails_the_run_with_a_count_and_the_first_error():
    deliveries = Deliveries()
    futures = [Future() for _ in range(4)]
    for f in futures:
        deliveries.track(f)
    futures[0].success(None)
    futures[1].failure(KafkaTimeoutError("Batch expired after 120000 ms"))
    futures[2].failure(KafkaTimeoutError("Batch expired after 120000 ms"))
    futures[3].success(None)
    with pytest.raises(DeliveryError, match=r"2 of 4 records were not delivered to events on broker:9092 "
                                            r"\(KafkaTimeoutError: .*Batch expired"):
        deliveries.check("events on broker:9092")
