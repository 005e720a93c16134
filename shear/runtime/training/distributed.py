"""Data parallelism for the training loop: through accelerate, or plain torch.distributed DDP.

:func:`detect_parallel` looks at what launched the process: an ``accelerate.Accelerator`` passed
in (``accelerate launch``, or ``torchrun`` + ``Accelerator()``), else an initialised
``torch.distributed`` process group (``torchrun``), else a single process. The :class:`Parallel` it
returns wraps the model and optimizer, runs backward, skips gradient sync on all but the last
micro-batch, clips, sums numbers over ranks and waits at barriers. There is no launcher here.

Example:
    >>> par = detect_parallel(None)        # a plain python process
    >>> par.rank, par.world_size, par.is_main
    (0, 1, True)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["Parallel", "detect_parallel"]


@dataclass
class Parallel:
    """The data-parallel position of this process and the operations the loop needs."""

    rank: int = 0
    world_size: int = 1
    accelerator: Any = None
    device: torch.device | None = None

    @property
    def is_main(self) -> bool:
        """Whether this process writes checkpoints and shows progress (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """More than one process takes part."""
        return self.world_size > 1

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, Any]:
        """``(model to call, optimizer to step)``: wrapped for gradient sync when distributed."""
        if self.accelerator is not None:
            return tuple(self.accelerator.prepare(model, optimizer))  # type: ignore[return-value]
        if not self.distributed:
            return model, optimizer
        device_ids = [self.device] if self.device is not None and self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids), optimizer

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()`` (through the accelerator when there is one)."""
        if self.accelerator is not None:
            self.accelerator.backward(loss)
        else:
            loss.backward()

    @contextmanager
    def no_sync(self, model: nn.Module, skip: bool) -> Iterator[None]:
        """Within the block gradients are not synchronised across ranks (when ``skip``)."""
        if not skip or not self.distributed:
            yield
            return
        ctx = self.accelerator.no_sync(model) if self.accelerator is not None else getattr(model, "no_sync", nullcontext)()
        with ctx:
            yield

    def clip(self, params: Sequence[torch.Tensor], max_norm: float) -> None:
        """Clip the global gradient norm of ``params`` to ``max_norm``."""
        if self.accelerator is not None:
            self.accelerator.clip_grad_norm_(params, max_norm)
        else:
            torch.nn.utils.clip_grad_norm_(params, max_norm)

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` summed over all ranks (itself in a single process)."""
        if not self.distributed:
            return value
        out = value.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()
        elif self.distributed:
            dist.barrier()


def detect_parallel(accelerator: Any = None) -> Parallel:
    """The :class:`Parallel` for this process (see the module doc for the order of detection)."""
    if accelerator is not None:
        return Parallel(
            rank=int(accelerator.process_index), world_size=int(accelerator.num_processes),
            accelerator=accelerator, device=torch.device(accelerator.device),
        )
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        device = None
        if dist.get_backend() == "nccl" and torch.cuda.is_available():
            device = torch.device("cuda", torch.cuda.current_device())
        return Parallel(rank=dist.get_rank(), world_size=dist.get_world_size(), device=device)
    return Parallel()
