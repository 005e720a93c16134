"""FSDP2 for the training loop: shard a working copy of the model, train it, write the result back.

:func:`shard_copy` deep-copies the model and applies ``torch.distributed.fsdp.fully_shard`` to every
transformer block (the classes in ``_no_split_modules``, else the members of the longest
``nn.ModuleList``) and then to the root, on a 1-D mesh over all ranks. Every parameter of the copy
becomes a ``DTensor`` sharded on dim 0: frozen base weights and trainable LoRA adapters alike
(FSDP2 shards per parameter, so frozen and trainable weights share a block). The caller's model is
not wrapped: :func:`write_back` gathers every parameter into it when training ends, so the passes
after training see a plain model of the original class.

Why a copy: ``fully_shard`` changes the module's class and parameters in place, with no public way
back; later passes (erase, codegen, merge) need the plain module tree. The copy costs one extra
host copy of the weights while ``fully_shard`` moves them, which it frees as it shards.

Example:
    >>> dist.init_process_group("gloo")             # under torchrun            # doctest: +SKIP
    >>> sharded = shard_copy(model, fsdp_mesh(None))                            # doctest: +SKIP
    >>> type(sharded).__name__                                                  # doctest: +SKIP
    'FSDPPeftModel'
    >>> write_back(sharded, model)                  # after training it         # doctest: +SKIP
    >>> [type(b).__name__ for b in transformer_blocks(torch.nn.Sequential(torch.nn.ModuleList([torch.nn.ReLU()])))]
    ['ReLU']
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from shear.model.blocks import block_path, decoder_blocks
from shear.model.dtensor import gather

__all__ = ["fsdp_mesh", "transformer_blocks", "shard_copy", "write_back", "gradient_sync"]


def fsdp_mesh(device: torch.device | None) -> Any:
    """A 1-D ``DeviceMesh`` over every rank of the default process group, on ``device``'s type."""
    from torch.distributed.device_mesh import init_device_mesh

    kind = device.type if device is not None else "cpu"
    return init_device_mesh(kind, (dist.get_world_size(),))


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules to shard one by one: a decoder LLM's blocks (:func:`shear.model.blocks.decoder_blocks`,
    the one answer to where they are), else, for any other model, the members of its longest ModuleList."""
    if block_path(model) is not None:
        return list(decoder_blocks(model))
    lists = [list(m) for m in model.modules() if isinstance(m, nn.ModuleList)]
    return max(lists, key=len) if lists else []


def shard_copy(model: nn.Module, mesh: Any) -> nn.Module:
    """A deep copy of ``model`` with FSDP2 applied per transformer block and at the root."""
    from torch.distributed.fsdp import fully_shard

    sharded = copy.deepcopy(model)
    for block in transformer_blocks(sharded):
        fully_shard(block, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    return sharded


@torch.no_grad()
def write_back(sharded: nn.Module, model: nn.Module) -> None:
    """Copy every parameter of ``sharded`` (gathered whole) into the same-named one of ``model``.

    A collective: every rank calls it, and every rank's ``model`` ends with the same weights.
    """
    mine = dict(model.named_parameters())
    for name, p in sharded.named_parameters():
        whole = gather(p)
        mine[name].copy_(whole.to(mine[name].device))


@contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Within the block FSDP2 reduce-scatters gradients only when ``enabled`` (off: they accumulate)."""
    setter = getattr(model, "set_requires_gradient_sync", None)
    if enabled or setter is None:
        yield
        return
    setter(False)
    try:
        yield
    finally:
        setter(True)
