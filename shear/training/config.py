"""The settings of one training run, checked when built.

:class:`TrainConfig` is a frozen dataclass: a bad value fails at construction with a
:class:`~shear.errors.TrainingError` that names the field and the fix, never halfway into a run.

Example:
    >>> cfg = TrainConfig(steps=100, lr=1e-4, scheduler="cosine", warmup_steps=10)
    >>> cfg.batch_size * cfg.grad_accum
    4
    >>> TrainConfig(steps=0)
    Traceback (most recent call last):
    ...
    shear.errors.TrainingError: TrainConfig.steps must be an int >= 1, got 0; set it to the number of optimizer steps
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from shear.errors import TrainingError

__all__ = ["TrainConfig", "SCHEDULERS", "RESUME_KEYS"]

SCHEDULERS = ("constant", "linear", "cosine")
"""Learning-rate schedules :class:`TrainConfig` accepts (each with linear warmup)."""

RESUME_KEYS = (
    "steps", "lr", "weight_decay", "batch_size", "grad_accum", "seq_len", "warmup_steps", "scheduler",
    "max_grad_norm", "seed", "bf16", "loss_chunk_tokens",
)
"""Fields that must match a checkpoint's for an exact resume (the others only say where and how often
to checkpoint, or, ``gradient_checkpointing``, how much memory the same steps take: a run that ran out
of memory may resume with it on)."""


def _int(name: str, value: Any, low: int, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise TrainingError(f"TrainConfig.{name} must be an int >= {low}, got {value!r}; {fix}")


def _float(name: str, value: Any, *, positive: bool, fix: str) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise TrainingError(f"TrainConfig.{name} must be a finite number {bound}, got {value!r}; {fix}")


@dataclass(frozen=True)
class TrainConfig:
    """Optimizer, schedule, batching, precision and checkpointing of a LoRA training run."""

    steps: int
    """Optimizer steps to run (each consumes ``grad_accum`` micro-batches)."""
    lr: float = 2e-4
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    batch_size: int = 4
    """Rows per micro-batch (per process under data parallelism)."""
    grad_accum: int = 1
    """Micro-batches whose gradients are summed before one optimizer step."""
    seq_len: int = 256
    """Tokens per row of a :class:`~shear.training.batches.TokenBatches` stream."""
    warmup_steps: int = 0
    """Steps of linear warmup from 0 to ``lr``."""
    scheduler: str = "constant"
    """``"constant"``, ``"linear"`` (decay to 0) or ``"cosine"`` (decay to 0) after warmup."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this; ``None`` disables clipping."""
    seed: int = 0
    """Seeds torch, python ``random`` and numpy at the start of a fresh run."""
    bf16: bool | None = None
    """bf16 autocast: ``None`` = on CUDA when the device supports bf16, fp32 elsewhere (CPU)."""
    gradient_checkpointing: bool | str = "auto"
    """Recompute activations in the backward pass (non-reentrant) to save memory; ``"auto"`` turns it on
    when a step's predicted activations exceed half the memory available on the model's device
    (:func:`~shear.training.peak_memory.auto_checkpointing`) and says so in ``TrainResult.warnings``.
    The steps are the same either way."""
    loss_chunk_tokens: int | str | None = "auto"
    """Compute the causal-LM loss at most this many tokens at a time (fewer for vocabularies above 32k:
    at most 8M logits per chunk, :func:`~shear.kernels.losses.chunk_tokens`), never holding the full logits (for
    transformers LLaMA/Mistral/Qwen/GPT-2/OPT/Phi-3 heads; others and custom ``loss_fn`` use the full
    logits). ``None`` computes the full logits. ``"auto"`` chunks by 256 tokens when a step's full
    logits (fp32, with their gradient) would take more than an eighth of the memory available on the
    model's device (:func:`~shear.training.peak_memory.auto_loss_chunking`), and computes them whole
    otherwise: chunking recomputes the head in backward, which a 1B model with a 128k vocabulary
    pays in every step (32 chunks of 65 tokens at 8 x 256). The loss is the same either way (fp32 rounding)."""
    checkpoint_dir: str | None = None
    """Where ``step-<n>/`` checkpoints go; required when ``checkpoint_every > 0``."""
    checkpoint_every: int = 0
    """Write a checkpoint every this many steps (and at the last step); 0 disables checkpoints."""
    resume: bool = True
    """Resume from the latest checkpoint in ``checkpoint_dir`` when there is one; it must have been written
    by the same run (config, starting weights, data, run options, shear version), else a
    :class:`~shear.errors.CheckpointError` names what differs. ``False`` starts over and replaces them."""
    log_every: int = 10
    """Report loss and tokens/s to the progress callback every this many steps."""

    def __post_init__(self) -> None:
        _int("steps", self.steps, 1, "set it to the number of optimizer steps")
        _float("lr", self.lr, positive=True, fix="a typical LoRA rate is 1e-4 to 3e-4")
        _float("weight_decay", self.weight_decay, positive=False, fix="use 0.0 to disable weight decay")
        _int("batch_size", self.batch_size, 1, "rows per micro-batch")
        _int("grad_accum", self.grad_accum, 1, "use 1 to step after every micro-batch")
        _int("seq_len", self.seq_len, 2, "a causal LM needs at least 2 tokens per row")
        _int("warmup_steps", self.warmup_steps, 0, "use 0 for no warmup")
        if self.warmup_steps > self.steps:
            raise TrainingError(
                f"TrainConfig.warmup_steps={self.warmup_steps} exceeds steps={self.steps}; "
                "lower warmup_steps or raise steps"
            )
        if self.scheduler not in SCHEDULERS:
            raise TrainingError(f"TrainConfig.scheduler must be one of {SCHEDULERS}, got {self.scheduler!r}")
        if self.max_grad_norm is not None:
            _float("max_grad_norm", self.max_grad_norm, positive=True, fix="use None to disable clipping")
        _int("seed", self.seed, 0, "any non-negative int")
        if self.bf16 not in (None, True, False):
            raise TrainingError(f"TrainConfig.bf16 must be True, False or None (auto), got {self.bf16!r}")
        if not isinstance(self.gradient_checkpointing, bool) and self.gradient_checkpointing != "auto":
            raise TrainingError(
                f"TrainConfig.gradient_checkpointing must be True, False or 'auto', got {self.gradient_checkpointing!r}"
            )
        if self.loss_chunk_tokens is not None and self.loss_chunk_tokens != "auto":
            _int("loss_chunk_tokens", self.loss_chunk_tokens, 1, "use None for the full-logits loss, or 'auto'")
        if not isinstance(self.resume, bool):
            raise TrainingError(f"TrainConfig.resume must be a bool, got {self.resume!r}")
        _int("checkpoint_every", self.checkpoint_every, 0, "use 0 to disable checkpoints")
        if self.checkpoint_every > 0 and not self.checkpoint_dir:
            raise TrainingError(
                f"TrainConfig.checkpoint_every={self.checkpoint_every} needs a checkpoint_dir; "
                "set checkpoint_dir, or checkpoint_every=0"
            )
        if self.checkpoint_dir is not None and not isinstance(self.checkpoint_dir, str):
            raise TrainingError(f"TrainConfig.checkpoint_dir must be a str path, got {self.checkpoint_dir!r}")
        _int("log_every", self.log_every, 1, "report every this many steps")

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-able dict (stored in every checkpoint)."""
        return asdict(self)

    def resume_mismatch(self, saved: dict[str, Any]) -> list[str]:
        """Fields of :data:`RESUME_KEYS` whose value differs from ``saved`` (a checkpoint's config)."""
        mine = self.to_dict()
        return [f"{k}: checkpoint {saved.get(k)!r}, now {mine[k]!r}" for k in RESUME_KEYS if saved.get(k) != mine[k]]
