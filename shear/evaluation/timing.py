"""Timing that holds on shared machines: medians after a warm-up, CUDA synchronised, the load noted.

Speed numbers move with the machine: a 2-core CPU slows badly when another process shares the cores,
and a GPU's work is queued, not done, when a call returns. So every measurement here warms up once,
synchronises the device around each timed call and takes the median of the repeats; a CPU
measurement states the load average it ran under (:func:`load_average`).

Example:
    >>> seconds = median_seconds(lambda: sum(range(1000)), repeats=3)
    >>> seconds > 0
    True
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

import torch

__all__ = ["load_average", "sync", "median_seconds"]


def load_average() -> float:
    """The 1-minute load average (0.0 where the OS has none): two-thread OpenMP slows badly when
    another process shares the cores, so every CPU measurement states it."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


def sync(device: torch.device | None = None) -> None:
    """Wait for queued CUDA work (on ``device``, or the current one if CUDA is in use); a no-op on CPU."""
    if device is not None and device.type != "cuda":
        return
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize(device)


def median_seconds(
    fn: Callable[[], object],
    repeats: int,
    device: torch.device | None = None,
    *,
    setup: Callable[[], object] | None = None,
) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` after one warm-up call, the device synchronised
    around each (a GPU's queued work is inside the time). ``setup`` runs untimed before every call
    (e.g. refilling a cache the timed call consumes)."""
    times = []
    for i in range(repeats + 1):
        if setup is not None:
            setup()
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        if i:  # the first call is the warm-up
            times.append(time.perf_counter() - start)
    return statistics.median(times)
