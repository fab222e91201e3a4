"""Shared fixtures: one real Tansu broker per test session, fresh topics per test."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from tgastream.stream.broker import EmbeddedBroker
from tgastream.core.settings import Settings

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# The longest end-to-end files (real processes, a minute or more each on 2 cores), run first: with
# `make test`'s parallel workers (pytest-xdist) they then overlap the many short tests instead of
# starting last and setting the suite's length. Order only; each still runs in any order alone.
HEAVY_FIRST = ("system/test_chaos.py", "test_trainer_restart.py", "test_broker_restart.py", "test_pipeline.py",
               "test_guard_ranks.py", "test_trainer_ranks.py", "test_demo.py", "test_ui_browser.py", "test_serve_topic.py",
               "test_worker_crash.py", "test_distributed_equivalence.py", "test_worker_rebalance.py",
               "test_prometheus_scrape.py", "test_bench_guard.py", "test_bench_api.py", "test_stop_deadline.py")


def _heaviness(item: pytest.Item) -> int:
    path = item.path.as_posix()
    return next((k for k, name in enumerate(HEAVY_FIRST) if path.endswith("tests/" + name)), len(HEAVY_FIRST))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=_heaviness)  # stable: the rest keep their order


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is faster, and immune to a busy shared machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory):
    """A real broker process for the whole session; killed (with its process group) at the end."""
    log = tmp_path_factory.mktemp("broker") / "tansu.log"
    with EmbeddedBroker(log_path=log) as b:
        yield b


@pytest.fixture
def topic_settings(broker: EmbeddedBroker, tmp_path: Path) -> Settings:
    """Settings with topic names unique to this test, so tests sharing the broker never collide."""
    tag = uuid.uuid4().hex[:8]
    return Settings(
        bootstrap=broker.bootstrap, partitions=4, data_dir=tmp_path / "data",
        events_topic=f"events-{tag}", dlq_topic=f"dlq-{tag}", samples_topic=f"samples-{tag}",
        embeddings_topic=f"embeddings-{tag}", features_topic=f"features-{tag}",
    )


def shared_data(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} not present")
    return path
