"""Tensors of a model by name, and the masks pruning groups put on them.

:class:`TensorTable` maps every parameter and buffer name (tied aliases included) to one canonical
name, so ``lm_head.weight`` and ``model.embed_tokens.weight`` of a tied LLaMA are one tensor, sliced
once and re-bound everywhere. :func:`zero_structures` zeroes the primary slices of chosen structures
(what the ``random`` pass and LHSPG leave behind); :func:`nonzero_structures` is the erase test.

Example:
    >>> import torch
    >>> from shear.graph.groups import Member, PruningGroup, Role
    >>> lin = torch.nn.Linear(2, 4)
    >>> g = PruningGroup(0, "out", (Member("weight", 0, Role.PRIMARY, torch.arange(4).view(4, 1)),
    ...                             Member("bias", 0, Role.PRIMARY, torch.arange(4).view(4, 1))), 4)
    >>> zero_structures(lin, g, torch.tensor([1, 3]))
    >>> nonzero_structures(TensorTable(lin), g).tolist()
    [True, False, True, False]
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from shear.errors import GraphError
from shear.graph.groups import Member, PruningGroup
from shear.model.experts import route_around_absent_experts

__all__ = ["TensorTable", "drop_indices", "nonzero_structures", "zero_structures"]


class TensorTable:
    """Every parameter and buffer of a model by name; tied aliases share one canonical name."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.canonical: dict[str, str] = {}
        """Any name -> the first name the tensor was seen under."""
        self.locations: dict[str, list[tuple[nn.Module, str]]] = {}
        """Canonical name -> every (module, attribute) that holds the tensor."""
        self.tensors: dict[str, torch.Tensor] = {}
        self.is_param: dict[str, bool] = {}
        by_id: dict[int, str] = {}
        for mod_name, mod in model.named_modules(remove_duplicate=False):
            for kind, store in (("param", mod._parameters), ("buffer", mod._buffers)):
                for attr, t in store.items():
                    if t is None:
                        continue
                    name = f"{mod_name}.{attr}" if mod_name else attr
                    canon = by_id.setdefault(id(t), name)
                    self.canonical[name] = canon
                    locs = self.locations.setdefault(canon, [])
                    if not any(m is mod and a == attr for m, a in locs):
                        locs.append((mod, attr))
                    self.tensors[canon] = t
                    self.is_param[canon] = kind == "param"

    def resolve(self, name: str) -> str:
        """Canonical name of ``name``; raises GraphError naming it when the model has no such tensor."""
        try:
            return self.canonical[name]
        except KeyError:
            raise GraphError(
                f"pruning group names tensor {name!r}, which the model does not have; "
                "was the model changed after tracing? Re-run discover-groups"
            ) from None

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[self.resolve(name)]

    def replace(self, canon: str, new: torch.Tensor) -> None:
        """Bind ``new`` at every location of ``canon`` (a Parameter keeps its class and requires_grad)."""
        old = self.tensors[canon]
        if self.is_param[canon]:
            new = type(old)(new, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else new
        for mod, attr in self.locations[canon]:
            if self.is_param[canon]:
                mod._parameters[attr] = new  # type: ignore[assignment]
            else:
                mod._buffers[attr] = new
        self.tensors[canon] = new


_BLOCK_ELEMENTS = 1 << 22


def _nonzero_along(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Bool ``[t.shape[dim]]``: whether any element of each index along ``dim`` is non-zero (NaN counts).

    Read in blocks of rows of at most 4M elements: a whole ``ne(0)`` mask of a 128k-vocabulary
    embedding (and its transposed copy) would be half the size of a small 16-bit model."""
    if t.shape[dim] == 0:
        return torch.zeros(0, dtype=torch.bool)
    t = t.detach()
    dim = dim % t.dim()
    out = torch.zeros(t.shape[dim], dtype=torch.bool, device=t.device)
    per = max(1, _BLOCK_ELEMENTS // max(1, t[:1].numel()))
    for i in range(0, t.shape[0], per):
        block = t[i : i + per].ne(0)
        if dim == 0:
            out[i : i + per] = block.reshape(block.shape[0], -1).any(dim=1)
        else:
            out |= block.movedim(dim, 0).reshape(t.shape[dim], -1).any(dim=1)
    return out.cpu()


def nonzero_structures(table: TensorTable, group: PruningGroup, members: Iterable[Member] | None = None) -> torch.Tensor:
    """Bool ``[group.size]``: True where some primary slice of the structure is not exactly zero."""
    alive = torch.zeros(group.size, dtype=torch.bool)
    for m in group.primary if members is None else members:
        t = table.get(m.param)
        if m.dim >= t.dim() or int(m.positions.max()) >= t.shape[m.dim]:
            raise GraphError(
                f"group {group.name}: member {m.param}[dim {m.dim}] indexes past the tensor's shape "
                f"{tuple(t.shape)}; re-run discover-groups on the current model"
            )
        alive |= _nonzero_along(t, m.dim)[m.positions].any(dim=1)
    return alive


def zero_structures(model: nn.Module | TensorTable, group: PruningGroup, indices: torch.Tensor) -> None:
    """Zero the primary slices of structures ``indices`` of ``group`` in place (weights, bias, lora_B).

    Zeroing an ``expert`` (its router row) gives the model's routers the absent-expert hook
    (:func:`shear.model.experts.route_around_absent_experts`)."""
    table = model if isinstance(model, TensorTable) else TensorTable(model)
    indices = torch.as_tensor(indices, dtype=torch.long)
    if indices.numel() == 0:
        return
    if group.kind == "expert":  # a zero router row must mean "absent", not "logit 0"
        route_around_absent_experts(table.model)
    with torch.no_grad():
        for m in group.primary:
            t = table.get(m.param)
            t.index_fill_(m.dim, m.positions[indices].flatten().to(t.device), 0)


def drop_indices(t: torch.Tensor, dims: dict[int, torch.Tensor]) -> torch.Tensor:
    """``t`` without the flat indices ``dims[d]`` along each dimension ``d`` (a new tensor)."""
    new = t.detach()
    for dim, idx in sorted(dims.items()):
        keep = torch.ones(new.shape[dim], dtype=torch.bool)
        keep[idx] = False
        new = new.index_select(dim, keep.nonzero().flatten().to(new.device))
    return new
