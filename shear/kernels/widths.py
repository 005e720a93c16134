"""Which output widths a device multiplies at full speed: a short measured matmul-width sweep.

Matrix kernels tile their output: a width that is not a multiple of the tile runs the last tile
partly empty, or falls off the fast kernel altogether (on GPUs, widths off the tensor-core tiles
ran several times slower than dense: docs/gpus.md). Rather than guess the tile, :func:`measure_widths`
times ``x @ W.T`` for widths just below a representative width ``base`` (a multiple of 256), at
offsets that are odd multiples of each candidate granularity ``g`` in :data:`GRANULARITIES` (so a
width of class ``g`` is a multiple of ``g`` and of nothing coarser), plus ``base`` itself. Each
class's cost is its fastest time **per output column**; :func:`pick_granularity` returns the
smallest ``g`` whose class runs within ``tolerance`` of the best class. The sweep runs in about a
second on a CPU and less on a GPU; :mod:`shear.io.width_cache` keeps the answer per device, dtype
and torch version.

Example:
    >>> pick_granularity({1: 1.30, 8: 1.02, 16: 1.01, 32: 1.00, 64: 1.00, 128: 1.00, 256: 1.00})
    8
    >>> table = measure_widths("cpu", torch.float32, base=512, inner=64, tokens=8, repeats=1)
    >>> table.granularity in GRANULARITIES + (256,)
    True
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from shear.errors import KernelError

__all__ = ["GRANULARITIES", "WidthTable", "measure_widths", "pick_granularity", "device_name", "sweep_widths"]

GRANULARITIES: tuple[int, ...] = (1, 8, 16, 32, 64, 128)
"""Candidate width steps; ``256`` (the representative width itself) is the reference class."""

_DEFAULT_SHAPES: dict[str, tuple[int, int, int]] = {
    "cpu": (1024, 1024, 32),
    "cuda": (4096, 4096, 2048),
}
"""(base width, inner width, tokens) per device type: an MLP-sized matmul of a prefill, small
enough that the sweep takes seconds."""


@dataclass(frozen=True)
class WidthTable:
    """A measured sweep: per granularity class, its widths and median seconds per output column."""

    device: str
    """The device by name (:func:`device_name`)."""
    dtype: str
    torch: str
    granularity: int
    """The smallest class within :attr:`tolerance` of the best (:func:`pick_granularity`)."""
    base: int
    inner: int
    tokens: int
    tolerance: float
    per_column: dict[int, float] = field(default_factory=dict)
    """Granularity class -> median seconds per output column of its widths."""
    widths: dict[int, list[int]] = field(default_factory=dict)
    """Granularity class -> the widths timed."""
    seconds: float = 0.0
    """Wall time of the sweep."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WidthTable:
        """The table :meth:`to_dict` wrote (JSON turns the class keys into text)."""
        d = dict(data)
        d["per_column"] = {int(k): float(v) for k, v in d.get("per_column", {}).items()}
        d["widths"] = {int(k): [int(w) for w in v] for k, v in d.get("widths", {}).items()}
        return cls(**d)

    def format(self) -> str:
        """The sweep as text: one line per class, relative to the best."""
        best = min(self.per_column.values())
        rows = [f"{self.device} {self.dtype}: [{self.tokens} x {self.inner}] @ [{self.inner} x ~{self.base}], "
                f"granularity {self.granularity} (within {self.tolerance:.0%} of the best per column)"]
        for g, t in sorted(self.per_column.items()):
            rows.append(f"  multiples of {g:>3}: widths {self.widths.get(g, [])}  {t * 1e9:.2f} ns/column  x{t / best:.3f}")
        return "\n".join(rows)


def device_name(device: str | torch.device) -> str:
    """A device by what it is: the GPU's name, or the CPU's model and torch's thread count.

    Example:
        >>> "threads" in device_name("cpu")
        True
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    if dev.type == "cpu":
        model = ""
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
        except OSError:
            pass
        return f"{model or platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
    return dev.type


def sweep_widths(base: int, classes: tuple[int, ...] = GRANULARITIES) -> dict[int, list[int]]:
    """Granularity class -> widths below ``base`` that are odd multiples of it (two each), and
    ``base`` (a multiple of 256) with ``base - 256`` as the reference class 256.

    Example:
        >>> sweep_widths(1024, (1, 64))
        {1: [1023, 1021], 64: [960, 832], 256: [1024, 768]}
    """
    if base % 256 or base < 512:
        raise KernelError(f"the sweep's base width must be a multiple of 256 and at least 512, got {base}")
    out = {g: [base - g, base - 3 * g] for g in classes if g < 256}
    out[256] = [base, base - 256]
    return out


def pick_granularity(per_column: Mapping[int, float], tolerance: float = 0.03) -> int:
    """The smallest granularity whose time per column is within ``tolerance`` of the best class.

    Example:
        >>> pick_granularity({1: 2.0, 64: 1.0, 256: 1.0}), pick_granularity({1: 1.0, 256: 1.02})
        (64, 1)
    """
    if not per_column:
        raise KernelError("no widths were timed; give at least one granularity class")
    best = min(per_column.values())
    return min(g for g, t in per_column.items() if t <= best * (1 + tolerance))


def _time(x: torch.Tensor, w: torch.Tensor, iters: int) -> float:
    """Seconds of one ``x @ w.T`` (mean of ``iters``, after the device finished the queue)."""
    cuda = x.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(x.device)
    t0 = time.perf_counter()
    for _ in range(iters):
        torch.matmul(x, w.t())
    if cuda:
        torch.cuda.synchronize(x.device)
    return (time.perf_counter() - t0) / iters


def measure_widths(
    device: str | torch.device,
    dtype: torch.dtype,
    *,
    base: int | None = None,
    inner: int | None = None,
    tokens: int | None = None,
    repeats: int = 7,
    iters: int | None = None,
    tolerance: float = 0.03,
    classes: tuple[int, ...] = GRANULARITIES,
) -> WidthTable:
    """Time ``x[tokens, inner] @ W[width, inner].T`` for the widths of :func:`sweep_widths` on
    ``device`` in ``dtype`` and pick the granularity (:func:`pick_granularity`).

    The widths are timed in turn within each repeat (so a load change on the machine hits every
    class alike), and each width's fastest of ``repeats`` counts (other work on the machine only
    adds time). ``tolerance`` leans to the coarser class: a borderline width class costs speed on
    every call, one more rounding step costs a few channels. Defaults size an MLP matmul of
    a prefill per device type (:data:`_DEFAULT_SHAPES`).
    """
    dev = torch.device(device)
    if dev.type == "meta":
        raise KernelError("cannot time matmuls on the meta device; measure on the device the model will run on")
    d_base, d_inner, d_tokens = _DEFAULT_SHAPES.get(dev.type, _DEFAULT_SHAPES["cpu"])
    base, inner, tokens = base or d_base, inner or d_inner, tokens or d_tokens
    iters = iters or (20 if dev.type == "cuda" else 2)
    plan = sweep_widths(base, classes)
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, inner, generator=gen).to(dev, dtype)
    w = torch.randn(base, inner, generator=gen).to(dev, dtype)
    every = sorted({wd for ws in plan.values() for wd in ws}, reverse=True)
    slices = {wd: w[:wd] for wd in every}
    for wd in every:  # warm-up: kernel selection, caches, clocks
        _time(x, slices[wd], 1)
    samples: dict[int, list[float]] = {wd: [] for wd in every}
    for _ in range(max(repeats, 1)):
        for wd in every:
            samples[wd].append(_time(x, slices[wd], iters))
    per_width = {wd: min(s) / wd for wd, s in samples.items()}  # other load only adds time: the fastest run counts
    per_column = {g: statistics.mean(per_width[wd] for wd in ws) for g, ws in plan.items()}
    return WidthTable(
        device=device_name(dev),
        dtype=str(dtype).removeprefix("torch."),
        torch=torch.__version__,
        granularity=pick_granularity(per_column, tolerance),
        base=base,
        inner=inner,
        tokens=tokens,
        tolerance=tolerance,
        per_column=per_column,
        widths=plan,
        seconds=time.perf_counter() - start,
    )
