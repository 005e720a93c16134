"""Data parallelism for the training loop: DDP (through accelerate or plain torch.distributed) or FSDP2.

:func:`detect_parallel` looks at what launched the process: an ``accelerate.Accelerator`` passed
in (``accelerate launch``, or ``torchrun`` + ``Accelerator()``), else an initialised
``torch.distributed`` process group (``torchrun``), else a single process. The :class:`Parallel` it
returns wraps the model and optimizer, runs backward, skips gradient sync on all but the last
micro-batch, clips, sums numbers over ranks and waits at barriers. There is no launcher here.

The strategy is ``"ddp"`` (replicated weights, gradients all-reduced) unless FSDP2 is asked for:
``parallel="fsdp"`` (``train(..., parallel=...)``), else the environment: ``SHEAR_PARALLEL=fsdp``, or
``ACCELERATE_USE_FSDP=true`` as ``accelerate launch --config_file configs/accelerate_fsdp2.yaml``
sets it. FSDP needs a process group: under a launcher (``RANK``/``WORLD_SIZE`` set) one is
initialised here (nccl on CUDA, else gloo); a plain process gets a :class:`DistributedError`. Under
FSDP the training loop trains a sharded copy (:mod:`~shear.training.fsdp`); an accelerator
then only says where this process is, shear applies ``fully_shard`` itself.

Example:
    >>> par = detect_parallel(None)        # a plain python process
    >>> par.rank, par.world_size, par.is_main, par.strategy
    (0, 1, True, 'ddp')
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from shear.errors import DistributedError

__all__ = ["Parallel", "detect_parallel", "requested_strategy", "STRATEGIES"]

STRATEGIES = ("ddp", "fsdp")
"""``ddp``: every rank holds the whole model, gradients are all-reduced. ``fsdp``: FSDP2, every
parameter sharded over the ranks (``torch.distributed.fsdp.fully_shard``)."""


@dataclass
class Parallel:
    """The data-parallel position of this process and the operations the loop needs."""

    rank: int = 0
    world_size: int = 1
    accelerator: Any = None
    device: torch.device | None = None
    strategy: str = "ddp"
    """``"ddp"`` or ``"fsdp"`` (see :data:`STRATEGIES`)."""

    @property
    def sharded(self) -> bool:
        """FSDP2: the loop trains a sharded copy of the model."""
        return self.strategy == "fsdp"

    @property
    def is_main(self) -> bool:
        """Whether this process writes checkpoints and shows progress (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """More than one process takes part."""
        return self.world_size > 1

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, Any]:
        """``(model to call, optimizer to step)``: wrapped for gradient sync when distributed (under FSDP
        the model is the sharded copy already and both come back as they are)."""
        if self.sharded:
            return model, optimizer
        if self.accelerator is not None:
            return tuple(self.accelerator.prepare(model, optimizer))  # type: ignore[return-value]
        if not self.distributed:
            return model, optimizer
        device_ids = [self.device] if self.device is not None and self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids), optimizer

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()`` (through the accelerator when there is one)."""
        if self.accelerator is not None and not self.sharded:
            self.accelerator.backward(loss)
        else:
            loss.backward()

    @contextmanager
    def no_sync(self, model: nn.Module, skip: bool) -> Iterator[None]:
        """Within the block gradients are not synchronised across ranks (when ``skip``)."""
        if not skip or not self.distributed:
            yield
            return
        if self.sharded:
            from shear.training.fsdp import gradient_sync

            with gradient_sync(model, enabled=False):
                yield
            return
        ctx = self.accelerator.no_sync(model) if self.accelerator is not None else getattr(model, "no_sync", nullcontext)()
        with ctx:
            yield

    def clip(self, params: Sequence[torch.Tensor], max_norm: float) -> None:
        """Clip the global gradient norm of ``params`` to ``max_norm``."""
        if self.sharded:
            _clip_sharded(params, max_norm)
        elif self.accelerator is not None:
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


def requested_strategy(parallel: str | None = None) -> str:
    """``parallel`` if given, else ``fsdp`` when ``SHEAR_PARALLEL=fsdp`` or ``ACCELERATE_USE_FSDP`` is true, else ``ddp``."""
    if parallel is None:
        parallel = os.environ.get("SHEAR_PARALLEL", "").strip().lower() or None
    if parallel is None:
        use_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "").strip().lower() in ("1", "true", "yes")
        parallel = "fsdp" if use_fsdp else "ddp"
    if parallel not in STRATEGIES:
        raise DistributedError(
            f"unknown parallel strategy {parallel!r} (from train(parallel=...) or SHEAR_PARALLEL); use one of {STRATEGIES}"
        )
    return parallel


def _launched() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def _init_group() -> None:
    """Initialise the default process group from a launcher's environment (nccl on CUDA, else gloo)."""
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")


def _fsdp(accelerator: Any) -> Parallel:
    if accelerator is None and dist.is_available() and not dist.is_initialized() and _launched():
        _init_group()
    if not (dist.is_available() and dist.is_initialized()):
        raise DistributedError(
            "parallel='fsdp' (FSDP2) needs an initialised torch.distributed process group, and this process has "
            "none; launch it with `torchrun --nproc_per_node N ...` or `accelerate launch --config_file "
            "configs/accelerate_fsdp2.yaml ...`, or call torch.distributed.init_process_group() first; "
            "for one process drop parallel='fsdp' (and SHEAR_PARALLEL / ACCELERATE_USE_FSDP)"
        )
    device = None
    if accelerator is not None:
        device = torch.device(accelerator.device)
    elif dist.get_backend() == "nccl" and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    return Parallel(rank=dist.get_rank(), world_size=dist.get_world_size(), accelerator=accelerator,
                    device=device, strategy="fsdp")


def detect_parallel(accelerator: Any = None, parallel: str | None = None) -> Parallel:
    """The :class:`Parallel` for this process (see the module doc for the order of detection).

    Raises :class:`DistributedError` when FSDP is asked for without a process group.
    """
    if requested_strategy(parallel) == "fsdp":
        return _fsdp(accelerator)
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


@torch.no_grad()
def _clip_sharded(params: Sequence[torch.Tensor], max_norm: float) -> None:
    """``clip_grad_norm_`` over FSDP2 shards: the squared norms of the local blocks summed over ranks."""
    from shear.model.dtensor import is_sharded

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    local = [g.to_local() if is_sharded(g) else g for g in grads]  # type: ignore[attr-defined]
    sq = torch.zeros((), dtype=torch.float32, device=local[0].device)
    for g in local:
        sq += g.detach().float().pow(2).sum()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sq)
    coef = torch.clamp(max_norm / (sq.sqrt() + 1e-6), max=1.0)
    for g in local:
        g.mul_(coef.to(g.device, g.dtype))
