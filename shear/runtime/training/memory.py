"""Peak memory of a training run, and the byte counts it is compared with.

On CUDA the peak is ``torch.cuda.max_memory_allocated`` (reset at the start). On CPU it is the
process's peak resident set size: on Linux the kernel's high-water mark ``VmHWM`` is reset at the
start (``echo 5 > /proc/self/clear_refs``) and read at the end, an exact peak; where that is not
possible, the lifetime ``ru_maxrss`` of :mod:`resource` (an upper bound: it may predate the run).
:attr:`MemoryStats.method` says which. CPU figures include the interpreter and libraries, so compare
``peak_bytes - baseline_bytes`` (what training added) rather than the raw peak.

Example:
    >>> import torch
    >>> with PeakMemory(torch.device("cpu")) as meter:
    ...     x = torch.ones(1 << 20)
    >>> meter.stats.peak_bytes >= meter.stats.baseline_bytes
    True
    >>> tensor_bytes([torch.ones(4, 4)])
    64
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import torch
from torch import nn

__all__ = ["MemoryStats", "PeakMemory", "tensor_bytes", "lora_state_bytes", "frozen_bytes", "current_rss_bytes"]


@dataclass(frozen=True)
class MemoryStats:
    """Peak and starting memory of a run, in bytes, and how they were measured."""

    peak_bytes: int
    baseline_bytes: int
    method: str
    """``"cuda_max_allocated"``, ``"linux_vmhwm"`` or ``"ru_maxrss"``."""

    @property
    def added_bytes(self) -> int:
        """Peak above the start: activations, gradients, optimizer state, temporaries."""
        return max(0, self.peak_bytes - self.baseline_bytes)


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def current_rss_bytes() -> int:
    """Resident set size of this process now (0 where it cannot be read)."""
    rss = _status_kb("VmRSS")
    if rss is not None:
        return rss
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        return 0


def _ru_maxrss_bytes() -> int:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(kb if sys.platform == "darwin" else kb * 1024)


class PeakMemory:
    """Context manager measuring peak memory on ``device`` while its block runs (see module doc)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stats = MemoryStats(0, 0, "none")
        self._method = ""
        self._baseline = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._method, self._baseline = "cuda_max_allocated", torch.cuda.memory_allocated(self.device)
            return self
        self._baseline = current_rss_bytes()
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self._method = "linux_vmhwm" if _status_kb("VmHWM") is not None else "ru_maxrss"
        except OSError:
            self._method = "ru_maxrss"
        return self

    def read(self) -> MemoryStats:
        """The statistics so far (also valid inside the block)."""
        if self._method == "cuda_max_allocated":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self._method == "linux_vmhwm":
            peak = _status_kb("VmHWM") or 0
        else:
            peak = _ru_maxrss_bytes()
        return MemoryStats(int(peak), int(self._baseline), self._method)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stats = self.read()


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes held by ``tensors``, each distinct storage counted once."""
    seen: set[int] = set()
    total = 0
    for t in tensors:
        key = t.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


def frozen_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and buffers that do not train."""
    return tensor_bytes([p for p in model.parameters() if not p.requires_grad] + list(model.buffers()))


def lora_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Bytes of the trainable parameters, their gradients (same size) and the optimizer's state.

    Without an optimizer AdamW's two fp32 moments per parameter are assumed.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    total = 2 * tensor_bytes(params)
    if optimizer is None:
        return total + sum(2 * p.numel() * 4 for p in params)
    state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    return total + tensor_bytes(state)
