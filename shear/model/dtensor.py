"""Read and edit tensors that may be FSDP2 shards (``DTensor``) as if they were whole.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``) every parameter is a ``DTensor`` sharded on dim 0:
each rank holds a block of rows, and a structure of a pruning group (a row set, a column) can span
ranks. The kernels that edit weights between optimizer steps (LHSPG's decay and projection, lora_B
row resets, LoRA merges, optimizer-moment resets) go through these two functions, which keep them
correct on shards and leave plain tensors exactly as they were:

* :func:`gather` — the whole tensor (an all-gather for a ``DTensor``; the tensor itself otherwise);
* :func:`writable` — a context that yields the whole tensor to edit in place and, for a ``DTensor``,
  writes each rank's block of the result back into its shard on exit (no communication: every rank
  computed the same whole tensor).

Every rank must make the same calls in the same order (each :func:`gather` is a collective).
Correct first: a kernel gathers each weight it touches, whole. Memory for one weight at a time.

Example:
    >>> import torch
    >>> t = torch.ones(3, 2)
    >>> with writable(t) as w:          # a plain tensor: w is t, edited in place
    ...     _ = w[1].zero_()
    >>> gather(t).sum().item()
    4.0
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["is_sharded", "gather", "writable", "scatter"]


def is_sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (an FSDP2 shard, or any other placement)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def gather(t: torch.Tensor) -> torch.Tensor:
    """The whole of ``t`` as a plain tensor: ``t.full_tensor()`` for a ``DTensor`` (collective), else ``t``."""
    if is_sharded(t):
        return t.detach().full_tensor()  # type: ignore[attr-defined]
    return t


@torch.no_grad()
def scatter(t: torch.Tensor, whole: torch.Tensor) -> None:
    """Write ``whole`` (``t``'s global shape, the same on every rank) into ``t``: each rank its own block."""
    if not is_sharded(t):
        t.copy_(whole)
        return
    from torch.distributed.tensor import distribute_tensor

    part = distribute_tensor(whole.to(t.dtype), t.device_mesh, t.placements, src_data_rank=None)  # type: ignore[attr-defined]
    t.to_local().copy_(part.to_local())  # type: ignore[attr-defined]


@contextmanager
def writable(t: torch.Tensor) -> Iterator[torch.Tensor]:
    """Yield ``t`` whole for in-place edits; a ``DTensor`` gets the edited whole written back into its shards."""
    if not is_sharded(t):
        yield t
        return
    whole = gather(t).clone()
    yield whole
    scatter(t, whole)
