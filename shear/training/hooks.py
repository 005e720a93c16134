"""Hooks into the training loop, and the state they see.

A :class:`TrainHook` is called at the start, right after every optimizer step (after
``optimizer.step()``, ``zero_grad()`` and ``scheduler.step()``), and at the end. Hooks may edit
weights in place (frozen base weights included), zero LoRA rows, re-initialise adapters and reset
optimizer state: :class:`TrainState` exposes the model, the optimizer and the scheduler. A hook with
state of its own returns it from ``state_dict`` (tensors, numbers, strings, lists and dicts of them)
so that checkpoints carry it and a resumed run continues exactly.

Example:
    >>> class ShrinkEveryStep(TrainHook):
    ...     def __init__(self) -> None:
    ...         self.edits = 0
    ...     def after_optimizer_step(self, state: TrainState) -> None:
    ...         self.edits += 1          # e.g. scale some weights of state.model here
    ...     def state_dict(self) -> dict:
    ...         return {"edits": self.edits}
    ...     def load_state_dict(self, state: dict) -> None:
    ...         self.edits = state["edits"]
    >>> ShrinkEveryStep().state_dict()
    {'edits': 0}
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from shear.training.config import TrainConfig

__all__ = ["TrainHook", "TrainState"]


@dataclass
class TrainState:
    """What hooks see. ``model`` is the unwrapped model (no DDP/accelerate wrapper; same parameters);
    under FSDP2 it is the sharded copy the loop trains, whose parameters are ``DTensor`` shards (edit
    them through :mod:`shear.model.dtensor`, every rank alike), and :meth:`unsharded` gives a plain
    model with the whole current weights for reading.

    ``optimizer`` is the plain torch AdamW (``optimizer.state[param]`` holds its moments),
    ``scheduler`` its LR schedule, ``step`` the optimizer steps done so far, ``losses`` the mean token
    loss of every step so far, ``rank``/``world_size`` the data-parallel position.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    config: TrainConfig
    step: int = 0
    losses: list[float] = field(default_factory=list)
    tokens: int = 0
    rank: int = 0
    world_size: int = 1
    accelerator: Any = None
    batches: Any = None
    source: nn.Module | None = None
    """Under FSDP2: the caller's plain model, which :meth:`unsharded` fills with the current weights."""

    @contextmanager
    def unsharded(self) -> Iterator[nn.Module]:
        """A plain model holding the current whole weights, to read (score, evaluate): ``model`` itself,
        or under FSDP2 the caller's model with every shard gathered into it (a collective: every rank
        enters it). Edits made to it are not written back to the shards."""
        if self.source is None:
            yield self.model
            return
        from shear.training.fsdp import write_back

        write_back(self.model, self.source)
        was_training = self.source.training
        self.source.train(self.model.training)
        try:
            yield self.source
        finally:
            self.source.train(was_training)

    @property
    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        """``(name, param)`` of the parameters being trained."""
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]


class TrainHook:
    """Base class of training hooks: every method is a no-op; override the ones you need."""

    def on_train_start(self, state: TrainState) -> None:
        """Called once before the first step (also when resuming, after the state is restored)."""

    def after_optimizer_step(self, state: TrainState) -> None:
        """Called after every optimizer step; ``state.step`` already counts it."""

    def on_train_end(self, state: TrainState) -> None:
        """Called once after the last step."""

    def state_dict(self) -> dict[str, Any]:
        """State to checkpoint (tensors and plain data); empty for stateless hooks."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
