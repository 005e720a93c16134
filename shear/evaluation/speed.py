"""Dense vs pruned speed where the model runs: tokens/s, speed-up, and efficiency against the ideal.

Pruning exists to make a model faster; fewer parameters do not guarantee it (a width that is not a
multiple of the kernels' tile can run slower than the wider dense one). :func:`compare_speed` times
both models on one device, row by row in turn (so a load change hits both), and reports per
measurement the tokens/s of each, the speed-up, and the **efficiency**: speed-up divided by the
ideal speed-up ``dense params / pruned params`` (base parameters, :func:`base_param_count`); 1.0 is
what the parameter count promises. It names the device (CPU model and torch threads, or the GPU),
the load average on CPU, and lists the Linear widths pruning made that are not multiples of the
target's granularity (:func:`~shear.evaluation.slow_widths.slow_widths`), with the fix.

The measurements are :mod:`shear.evaluation.throughput`'s: prefill and decode at batch 1 and 8,
decode ``eager`` (``generate``, dynamic cache) and, when asked (``mode="static"`` or ``"both"``),
with a ``StaticCache`` and ``torch.compile``.

Example:
    >>> result = compare_speed(dense, pruned, batches=(1,), repeats=1)          # doctest: +SKIP
    >>> print(result.format())                                                  # doctest: +SKIP
    >>> result.to_dict()["rows"][0]["name"]                                     # doctest: +SKIP
    'prefill b1'
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from shear.evaluation.slow_widths import slow_widths
from shear.evaluation.throughput import Outcome, speed_probes
from shear.evaluation.timing import load_average
from shear.io.width_cache import GRANULARITY_ENV, cache_key, pinned_granularity, read_width_table
from shear.kernels.allocation import base_param_count
from shear.kernels.widths import device_name
from shear.model.devices import TENSOR_CORE_MULTIPLE, model_device, model_dtype

__all__ = [
    "DEFAULT_GRANULARITY",
    "SpeedRow",
    "SpeedResult",
    "SpeedComparison",
    "measure_speed",
    "compare_speed",
    "speed_row",
]

DEFAULT_GRANULARITY = 8
"""Width granularity checked on a CPU whose width sweep has not run: the narrowest vector tile."""


@dataclass(frozen=True)
class SpeedRow:
    """One measurement of both models: tokens/s (``None`` where not measured, ``note`` says why),
    the speed-up ``pruned / dense`` and the efficiency ``speed-up / ideal speed-up``."""

    name: str
    dense: float | None
    pruned: float | None
    speedup: float | None = None
    efficiency: float | None = None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dense": self.dense, "pruned": self.pruned, "speedup": self.speedup,
                "efficiency": self.efficiency, "note": self.note}  # fmt: skip


def speed_row(name: str, dense: Outcome | None, pruned: Outcome | None, ideal: float) -> SpeedRow:
    """A :class:`SpeedRow` from two outcomes (tokens/s or ``"not measured: ..."``) and the ideal speed-up."""
    notes = [f"{who}: {x}" for who, x in (("dense", dense), ("pruned", pruned)) if isinstance(x, str)]
    d = float(dense) if isinstance(dense, (int, float)) else None
    p = float(pruned) if isinstance(pruned, (int, float)) else None
    speedup = p / d if d and p is not None else None
    efficiency = speedup / ideal if speedup is not None and ideal > 0 else None
    return SpeedRow(name, d, p, speedup, efficiency, "; ".join(notes))


@dataclass(frozen=True)
class SpeedResult:
    """The speed of one model: ``rates`` maps a measurement to tokens/s or ``"not measured: ..."``."""

    device: str
    params: int
    rates: dict[str, Outcome]
    load_average: float | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "params": self.params, "rates": dict(self.rates),
                "load_average": self.load_average, "settings": dict(self.settings)}  # fmt: skip


@dataclass
class SpeedComparison:
    """Dense vs pruned speed on one device: the rows, the device, the ideal speed-up and the slow widths."""

    rows: list[SpeedRow]
    device: str
    dense_params: int
    pruned_params: int
    granularity: int = DEFAULT_GRANULARITY
    granularity_source: str = ""
    """Where :attr:`granularity` came from (the caller, or the device's measured width table)."""
    slow_widths: list[str] = field(default_factory=list)
    """Linear widths pruning made that are not multiples of ``granularity``, by module role."""
    load_average: float | None = None
    """The 1-minute load average when the measurement started (CPU only)."""
    target: str = "cpu"
    """The device kind the fix names: ``prune with --target <target>``."""
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def ideal(self) -> float:
        """The speed-up the parameter count promises: dense params / pruned params."""
        return self.dense_params / self.pruned_params if self.pruned_params else math.nan

    @property
    def fix(self) -> str:
        return f"prune with --target {self.target}"

    def add(self, name: str, dense: Outcome | None, pruned: Outcome | None) -> SpeedRow:
        """Append a row measured elsewhere (e.g. llama.cpp on GGUF files) against the same ideal."""
        row = speed_row(name, dense, pruned, self.ideal)
        self.rows.append(row)
        return row

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the report (``ReportData.speed``) and JSON."""
        return {
            "device": self.device,
            "load_average": self.load_average,
            "dense_params": self.dense_params,
            "pruned_params": self.pruned_params,
            "ideal": self.ideal,
            "granularity": self.granularity,
            "granularity_source": self.granularity_source,
            "slow_widths": list(self.slow_widths),
            "fix": self.fix,
            "settings": dict(self.settings),
            "rows": [r.to_dict() for r in self.rows],
        }

    def format(self) -> str:
        """The comparison as a text table for the console."""
        s = self.settings
        head = f"speed on {self.device}"
        if self.load_average is not None:
            head += f" (load average {self.load_average:.2f})"
        if s:
            head += (f": {s.get('prompt_tokens')}-token prompts, {s.get('new_tokens')} new tokens, "
                     f"median of {s.get('repeats')}")  # fmt: skip
        width = max([len("measurement")] + [len(r.name) for r in self.rows]) + 2
        lines = [head, f"{'measurement':<{width}}{'dense tok/s':>13}{'pruned tok/s':>14}{'speed-up':>10}{'efficiency':>12}"]
        for r in self.rows:
            cells = f"{_num(r.dense, ',.1f'):>13}{_num(r.pruned, ',.1f'):>14}"
            cells += f"{_num(r.speedup, '.2f', 'x'):>10}{_num(r.efficiency, '.2f'):>12}"
            lines.append(f"{r.name:<{width}}{cells}" + (f"  {r.note}" if r.note else ""))
        lines.append(
            f"ideal speed-up {self.ideal:.2f}x ({self.dense_params:,} -> {self.pruned_params:,} parameters); "
            "efficiency = speed-up / ideal, 1.00 is what the parameter count promises"
        )
        if self.slow_widths:
            lines.append(f"slow widths (not multiples of {self.granularity}; {self.fix}):")
            lines += [f"  {w}" for w in self.slow_widths]
        return "\n".join(lines)


def _num(x: float | None, spec: str, suffix: str = "") -> str:
    return "-" if x is None or not math.isfinite(x) else format(x, spec) + suffix


@contextmanager
def _on(model: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """``model`` on ``device`` for the block, back where it was after (a no-op when already there)."""
    home = model_device(model)
    if home == device:
        yield model
        return
    model.to(device)
    try:
        yield model
    finally:
        model.to(home)


def _settings(batches: Sequence[int], prompt_tokens: int, new_tokens: int, repeats: int, mode: str,
              model: nn.Module) -> dict[str, Any]:  # fmt: skip
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    return {"batches": list(batches), "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
            "repeats": repeats, "mode": mode, "dtype": str(dtype).removeprefix("torch.")}  # fmt: skip


def _device_step(device: torch.device, dtype: torch.dtype) -> tuple[int, str]:
    """The width granularity of ``device`` without a new sweep: ``SHEAR_WIDTH_GRANULARITY``, else the
    cached sweep a ``--target`` run left (:mod:`shear.io.width_cache`), else the tensor-core tile on
    CUDA and :data:`DEFAULT_GRANULARITY` elsewhere, said so."""
    pinned = pinned_granularity()
    if pinned is not None:
        return pinned, f"pinned by {GRANULARITY_ENV}"
    table = read_width_table(cache_key(device, dtype)) if device.type in ("cpu", "cuda") else None
    if table is not None:
        return table.granularity, "the device's cached width sweep"
    if device.type == "cuda":
        return TENSOR_CORE_MULTIPLE, "tensor-core tile (the device's width sweep has not run)"
    return DEFAULT_GRANULARITY, "default (the device's width sweep has not run)"


def _where(model: nn.Module, device: str | torch.device | None) -> torch.device:
    return torch.device(device) if device is not None else model_device(model)


def measure_speed(
    model: nn.Module,
    *,
    device: str | torch.device | None = None,
    batches: Sequence[int] = (1, 8),
    prompt_tokens: int = 32,
    new_tokens: int = 8,
    repeats: int = 2,
    mode: str = "eager",
) -> SpeedResult:
    """Tokens/s of one causal LM on ``device`` (default: where its weights are; moved there for the
    measurement and back after): prefill and decode per batch size, medians of ``repeats`` after a
    warm-up. The defaults are cheap enough to run in every prune; raise them for a benchmark."""
    where = _where(model, device)
    with _on(model, where):
        load = load_average() if where.type == "cpu" else None
        probes = speed_probes(model, where, batches=batches, prompt_tokens=prompt_tokens, new_tokens=new_tokens,
                              repeats=repeats, mode=mode)  # fmt: skip
        rates = {p.name: p.measure() for p in probes}
        return SpeedResult(device_name(where), base_param_count(model), rates, load,
                           _settings(batches, prompt_tokens, new_tokens, repeats, mode, model))  # fmt: skip


def compare_speed(
    dense: nn.Module,
    pruned: nn.Module,
    *,
    device: str | torch.device | None = None,
    batches: Sequence[int] = (1, 8),
    prompt_tokens: int = 32,
    new_tokens: int = 8,
    repeats: int = 2,
    granularity: int | None = None,
    mode: str = "eager",
) -> SpeedComparison:
    """Time ``dense`` and ``pruned`` on one device (default: the dense model's), each measurement of
    both in turn, and return the :class:`SpeedComparison`. ``granularity`` is the width multiple the
    target's kernels want (default: the device's width granularity as ``--target`` found it, see
    :func:`_device_step`); ``mode`` adds the static-cache compiled decode (``"static"`` or ``"both"``),
    which compiles each model (tens of seconds)."""
    where = _where(dense, device)
    g, source = (int(granularity), "given") if granularity is not None else _device_step(where, model_dtype(dense))
    kw: dict[str, Any] = dict(batches=batches, prompt_tokens=prompt_tokens, new_tokens=new_tokens,
                              repeats=repeats, mode=mode)  # fmt: skip
    result = SpeedComparison(
        rows=[], device=device_name(where), dense_params=base_param_count(dense),
        pruned_params=base_param_count(pruned), granularity=g, granularity_source=source,
        slow_widths=slow_widths(pruned, g, reference=dense), target=where.type,
        settings=_settings(batches, prompt_tokens, new_tokens, repeats, mode, dense),
    )
    with _on(dense, where), _on(pruned, where):
        result.load_average = load_average() if where.type == "cpu" else None
        for d, p in zip(speed_probes(dense, where, **kw), speed_probes(pruned, where, **kw)):
            result.add(d.name, d.measure(), p.measure())
    return result
