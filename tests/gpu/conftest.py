"""Setup of the GPU checks (``@pytest.mark.gpu``): the device, the quick profile, a time limit, the table.

Without CUDA every test here skips and says why. ``SHEAR_GPU_QUICK=1`` runs them anyway with tiny
shapes and budgets on ``SHEAR_GPU_DEVICE`` (default: CUDA if present, else CPU), to see the plumbing
work on any machine: the goals (peak memory, throughput) are then not asserted, since the numbers
mean nothing. ``SHEAR_GPU_LIMIT`` seconds (default 240) bound each test (SIGALRM), so one stuck check
cannot eat the machine's time. Each test hands its table row to the ``gpu_row`` fixture, which
appends it as a JSON line to ``SHEAR_GPU_ROWS`` when set: ``python -m tools.gpu_check`` runs these
tests and prints those rows as one table.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import pytest
import torch


@dataclass(frozen=True)
class Gpu:
    """Where and how big the checks run."""

    device: str
    """``cuda`` on a GPU machine; ``SHEAR_GPU_DEVICE`` overrides."""
    quick: bool
    """Tiny shapes and budgets; the goals are reported, not asserted."""


def _settings() -> Gpu:
    quick = os.environ.get("SHEAR_GPU_QUICK", "") not in ("", "0")
    device = os.environ.get("SHEAR_GPU_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    return Gpu(device=device, quick=quick)


@pytest.fixture
def gpu() -> Gpu:
    """The device and profile of the check; skips (with the reason) where there is no CUDA device."""
    settings = _settings()
    if (settings.device.startswith("cuda") or not settings.quick) and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device: torch.cuda.is_available() is False here "
                    "(SHEAR_GPU_QUICK=1 runs the plumbing on the CPU)")
    if not settings.device.startswith("cuda") and not settings.quick:
        pytest.skip(f"the GPU checks' goals are for CUDA, and the device is {settings.device!r} "
                    "(SHEAR_GPU_QUICK=1 runs the plumbing with tiny shapes)")
    return settings


@pytest.fixture
def gpu_row(request: pytest.FixtureRequest) -> Callable[..., None]:
    """``gpu_row(check, result, goal, met)``: one line of the GPU table (what was measured, the goal,
    whether it was met), appended to ``SHEAR_GPU_ROWS`` (JSON lines) when set, and printed."""

    def record(check: str, result: str, goal: str = "", met: bool = True) -> None:
        row = {"test": request.node.nodeid, "check": check, "result": result, "goal": goal, "met": met}
        out = os.environ.get("SHEAR_GPU_ROWS")
        if out:
            with Path(out).open("a") as f:
                f.write(json.dumps(row) + "\n")
        print(f"{check}: {result} (goal {goal or '-'}: {'met' if met else 'NOT met'})")

    return record


class CheckTimeout(Exception):
    """A GPU check ran past ``SHEAR_GPU_LIMIT`` seconds."""


@pytest.fixture(autouse=True)
def _deterministic() -> Iterator[None]:
    """Seeded, every core unless ``OMP_NUM_THREADS`` says otherwise (the data preparation runs on the
    CPU), and a time limit per check."""
    torch.manual_seed(0)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1))
    limit = int(os.environ.get("SHEAR_GPU_LIMIT", "240"))

    def alarm(signum: int, frame: FrameType | None) -> None:
        raise CheckTimeout(f"ran past its time limit of {limit} s (SHEAR_GPU_LIMIT)")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(limit)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
