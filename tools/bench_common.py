"""What the benchmark tools share: Markdown tables, the load note, timing medians and peak memory.

The benchmarks run on shared machines (a 2-core CPU whose load moves every number), so each prints
the load average it started under (:func:`load_average`), times with medians over repeats after a
warm-up (:func:`median_time`, synchronising CUDA so the GPU's queued work is counted), measures
wall time and peak memory of one method the same way (:func:`measured`), and writes its tables in
one Markdown form (:func:`markdown_table`), so the README's tables read alike. The load and
timing helpers are shear's own (:mod:`shear.evaluation.timing`): a benchmark and a run's speed
section time alike.

Example:
    >>> print(markdown_table(["method", "ppl"], [["dense", "12.00"]], align="-r"))
    | method | ppl |
    |---|---:|
    | dense | 12.00 |
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch

from shear.evaluation.timing import load_average, median_seconds, sync

__all__ = ["Measured", "load_average", "markdown_table", "mean", "measured", "median_time", "sync"]

T = TypeVar("T")


def markdown_table(head: Sequence[str], rows: Sequence[Sequence[object]], align: str = "") -> str:
    """A Markdown table, no trailing newline: ``align`` has one letter per column, ``l``/``-`` left
    (``---``) or ``r`` right (``---:``); missing letters mean left."""
    marks = ["---:" if (align[i] if i < len(align) else "-") == "r" else "---" for i in range(len(head))]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(marks) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def mean(values: dict[str, float] | Sequence[float]) -> float:
    """The mean of a perplexity dict's values (or of a sequence)."""
    return statistics.mean(values.values() if isinstance(values, dict) else values)


def median_time(fn: Callable[[], object], repeats: int, device: torch.device | None = None) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` after one warm-up call, the device synchronised
    around each (:func:`shear.evaluation.timing.median_seconds`)."""
    return median_seconds(fn, repeats, device)


@dataclass(frozen=True)
class Measured(Generic[T]):
    """What :func:`measured` returns: the function's value, its wall seconds, and the peak memory it
    added above the memory at its start (Linux VmHWM on CPU, ``max_memory_allocated`` on CUDA)."""

    value: T
    seconds: float
    added_bytes: int


def measured(fn: Callable[..., T], *args: Any, device: torch.device | None = None) -> Measured[T]:
    """Run ``fn(*args)`` and measure wall time and added peak memory on ``device`` (default CPU)."""
    from shear.training import PeakMemory

    start = time.perf_counter()
    with PeakMemory(device or torch.device("cpu")) as meter:
        value = fn(*args)
    return Measured(value, time.perf_counter() - start, int(meter.stats.added_bytes))
