"""A dispatch mode that makes CPU tests see the device bugs only a GPU used to show.

On a GPU, an op that mixes a CUDA tensor with a CPU one (other than a 0-dim scalar), or hands a CPU
``torch.Generator`` to a CUDA kernel, raises; on the CPU, or on the meta device, many of these pass
silently. :class:`DeviceCheck` raises for them on any device, and records the ops that read a value
back to the host (``.item()``, ``bool(t)``, ``nonzero``, boolean indexing, ``unique``): each of those
is a host sync on a GPU.

Example:
    >>> import torch
    >>> w = torch.empty(2, 2, device="meta")
    >>> with DeviceCheck():
    ...     w.uniform_(generator=torch.Generator())
    Traceback (most recent call last):
    ...
    AssertionError: aten.uniform_.default draws on meta with a cpu generator
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["DeviceCheck"]

aten = torch.ops.aten

_MOVES = {aten._to_copy.default, aten.copy_.default, aten.to.device, aten.to.dtype_layout, aten.lift_fresh.default}
"""Ops that legitimately take a tensor from one device to another."""

_SYNCS = {
    aten._local_scalar_dense.default,  # .item(), float(t), bool(t)
    aten.nonzero.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
}
"""Ops whose result a GPU must finish computing before the host can go on."""


class DeviceCheck(TorchDispatchMode):
    """Raise on mixed-device ops and foreign generators; record host syncs in :attr:`syncs`."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if func not in _MOVES:
            devices = {t.device.type for t in tensors if not (t.device.type == "cpu" and t.dim() == 0)}
            assert len(devices) <= 1, f"{func} mixes devices {sorted(devices)}"
        gen = kwargs.get("generator")
        if gen is not None and tensors and gen.device.type != tensors[0].device.type:
            raise AssertionError(f"{func} draws on {tensors[0].device.type} with a {gen.device.type} generator")
        bool_index = func is aten.index.Tensor and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in tree_leaves(args[1:])
        )
        if func in _SYNCS or bool_index:
            self.syncs.append(str(func))
        return func(*args, **kwargs)
