"""Shared pytest setup: the --slow profile, golden files, and deterministic, thread-limited torch."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--slow", action="store_true", default=False, help="also run tests marked slow")
    parser.addoption(
        "--update-golden", action="store_true", default=False,
        help="rewrite the golden files under tests/golden after an intended change (or SHEAR_UPDATE_GOLDEN=1)",
    )


@pytest.fixture
def golden(request: pytest.FixtureRequest) -> Callable[[Path, str], None]:
    """``golden(path, text)``: assert ``text`` equals the golden file ``path``. A missing file is a
    failure; ``pytest --update-golden`` (or ``SHEAR_UPDATE_GOLDEN=1``) writes it on purpose."""
    update = bool(request.config.getoption("--update-golden") or os.environ.get("SHEAR_UPDATE_GOLDEN"))

    def check(path: Path, text: str) -> None:
        if update:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        assert path.exists(), f"golden file {path} is missing: run pytest --update-golden to write it"
        assert text == path.read_text(), f"{path.name} differs; after an intended change run pytest --update-golden"

    return check


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _pinned_width_granularity() -> None:
    """Targets take the device's width step from SHEAR_WIDTH_GRANULARITY instead of a timing sweep, so
    runs are deterministic (tests/test_target.py measures on purpose); a value set outside is kept."""
    os.environ.setdefault("SHEAR_WIDTH_GRANULARITY", "1")


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
