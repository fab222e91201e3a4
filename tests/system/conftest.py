"""Options of the fault-injection system tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--chaos-json", default=None, metavar="PATH",
                     help="where the chaos test writes its JSON summary (also CHAOS_JSON; default: the test's tmp dir)")


@pytest.fixture
def chaos_json(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    try:
        opt = request.config.getoption("--chaos-json")
    except ValueError:  # this conftest was not loaded at start-up (pytest run from elsewhere)
        opt = None
    return Path(opt or os.environ.get("CHAOS_JSON") or tmp_path / "chaos.json")
