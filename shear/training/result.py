"""What a training run reports: per-step losses, throughput, peak memory, warnings.

Example:
    >>> log = StepLog(step=10, steps=100, loss=2.5, lr=2e-4, tokens_per_s=1500.0)
    >>> log.describe()
    'step 10/100 loss 2.5000 lr 2.00e-04 1500 tok/s'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from shear.training.peak_memory import MemoryStats

__all__ = ["TrainResult", "StepLog"]


@dataclass(frozen=True)
class StepLog:
    """One progress report (every ``log_every`` steps and at the last step)."""

    step: int
    steps: int
    loss: float
    lr: float
    tokens_per_s: float

    def describe(self) -> str:
        """A one-line summary for a progress bar or log."""
        return (
            f"step {self.step}/{self.steps} loss {self.loss:.4f} lr {self.lr:.2e} "
            f"{self.tokens_per_s:.0f} tok/s"
        )


@dataclass
class TrainResult:
    """The outcome of :func:`~shear.training.loop.train`.

    ``losses`` has the mean token loss of every step of the run, resumed steps included;
    ``tokens`` counts the (non-padding) input tokens of all steps over all ranks; ``wall_s`` and
    ``tokens_per_s`` cover the steps this process ran. ``peak_memory_bytes`` is
    ``memory.peak_bytes``: CUDA ``max_memory_allocated`` on GPU, peak process RSS on CPU (see
    :mod:`~shear.training.peak_memory`; ``memory.method`` says which).
    """

    steps: int
    losses: list[float]
    tokens: int
    wall_s: float
    tokens_per_s: float
    peak_memory_bytes: int
    memory: MemoryStats
    warnings: list[str] = field(default_factory=list)
    resumed_from: Path | None = None
    """The checkpoint directory this run continued from, or None for a fresh run."""
    resumed_step: int = 0
    """The step of that checkpoint (0 for a fresh run)."""
