"""Block structures: a decoder layer's attention branch and MLP branch as removable pruning groups.

A residual branch adds its output projection's result into the residual stream, so the traced graph
already says where the branches are: the output projections are the producers (primary, dim 0
members) of the residual width's pruning group. :func:`block_groups` turns each into a pruning
group of kind ``block`` with one structure:

* **primary**: every row of the output projection (its bias, and its LoRA ``lora_B`` rows): all
  zero, the branch adds exactly zero, which is what the masked model computes;
* **secondary**: every other parameter of the branch and the weight of the norm that feeds only it,
  whole (dim 0, all rows), so :class:`~shear.kernels.allocation.ParamBudget` counts a removed
  block's parameters exactly (the tensors drop to zero size whatever widths were cut from them).

A block overlaps the width groups inside it (heads, MLP channels) and the residual width: it is a
structure of structures. Erasing it (:mod:`shear.codegen.depth`) puts a
:class:`~shear.model.blocks.RemovedBranch` in its place; both branches of a layer gone, the layer
goes. Only LLaMA-family layers have branches (:data:`~shear.model.blocks.BRANCH_LAYOUTS`); any other
model is refused with a :class:`~shear.errors.ModelError` that says why.

Block groups are added to a graph on demand (:func:`with_block_groups`): a pass that prunes blocks
adds them, and every other pass sees the graph it always saw.

Example:
    >>> graph = with_block_groups(shear.trace(model, ids), model)             # doctest: +SKIP
    >>> [g.name for g in graph.pruning_groups if g.kind == "block"][:2]        # doctest: +SKIP
    ['model.layers.0.self_attn/block', 'model.layers.0.mlp/block']
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from shear.errors import GraphError
from shear.graph.groups import Member, PruningGroup, Role
from shear.graph.ir import Graph
from shear.model.blocks import BranchSlot, RemovedBranch, branch_layout, decoder_blocks
from shear.model.facts import is_lora_param

__all__ = ["Branch", "block_groups", "with_block_groups", "branch_of", "inner_groups"]


@dataclass(frozen=True)
class Branch:
    """One residual branch of one decoder layer, by qualified module names of the traced model."""

    layer: int
    """Index of the decoder layer."""
    kind: str
    """``attention`` or ``mlp``."""
    module: str
    """The branch module (``model.layers.3.self_attn``)."""
    norm: str
    """The norm that feeds only this branch (``model.layers.3.input_layernorm``)."""


def _layer_names(model: nn.Module) -> dict[str, int]:
    """Qualified name (in ``model.named_modules()``) of every decoder layer -> its index."""
    ids = {id(layer): i for i, layer in enumerate(decoder_blocks(model))}
    return {name: ids[id(m)] for name, m in model.named_modules() if id(m) in ids}


def _branches(model: nn.Module) -> dict[str, Branch]:
    """Branch module name -> :class:`Branch`, for every branch still present (not erased)."""
    layout: tuple[BranchSlot, ...] = branch_layout(model)
    out: dict[str, Branch] = {}
    for name, i in _layer_names(model).items():
        layer = model.get_submodule(name)
        for slot in layout:
            if not isinstance(getattr(layer, slot.attr, None), RemovedBranch):
                out[f"{name}.{slot.attr}"] = Branch(i, slot.kind, f"{name}.{slot.attr}", f"{name}.{slot.norm}")
    return out


def _whole(name: str, shape: tuple[int, ...], role: Role) -> Member:
    return Member(name, 0, role, torch.arange(shape[0]).view(1, -1))


def block_groups(model: nn.Module, graph: Graph) -> tuple[PruningGroup, ...]:
    """One ``block`` pruning group per attention and MLP branch of ``model`` traced as ``graph``.

    The output projections come from the graph (the producers of the residual width); a branch
    whose output the graph does not show adding into the residual stream gets a pinned group that
    says so, and a layer layout shear does not know raises :class:`~shear.errors.ModelError`.
    """
    branches = _branches(model)
    outputs: dict[str, list[Member]] = {}
    for g in graph.pruning_groups:
        if g.kind != "residual":
            continue
        for m in g.primary:
            owner = next((b for b in branches if m.param.startswith(b + ".")), None)
            if owner is not None and m.dim == 0 and not m.is_buffer:
                outputs.setdefault(owner, []).append(m)
    if not outputs:
        raise GraphError(
            f"{graph.model_class}: no branch output adds into a residual width in the traced graph (the residual "
            "space has no producers inside the decoder layers), so there are no blocks to remove; "
            "trace the model with its decoder layers (print(graph) shows the residual group)"
        )
    groups: list[PruningGroup] = []
    start = len(graph.pruning_groups)
    for name, branch in branches.items():
        if name not in outputs:  # listed, not silently left out: print(graph) shows why it stays
            groups.append(PruningGroup(
                id=start + len(groups), name=f"{name}/block", members=(), size=1, kind="block", prunable=False,
                reasons=("its output does not add into the residual width of the traced graph",),
                modules=(name, branch.norm), min_keep=0,
            ))
            continue
        primary = {m.param for m in outputs[name]}
        members = [_whole(p, graph.shapes[p], Role.PRIMARY) for p in sorted(primary)]
        params = [n for n, _ in model.get_submodule(name).named_parameters()]
        norm = [n for n, _ in model.get_submodule(branch.norm).named_parameters()]
        members += [
            _whole(f"{name}.{n}", graph.shapes[f"{name}.{n}"], Role.SECONDARY)
            for n in params if f"{name}.{n}" not in primary and not is_lora_param(n)
        ]
        members += [_whole(f"{branch.norm}.{n}", graph.shapes[f"{branch.norm}.{n}"], Role.SECONDARY) for n in norm]
        output = sorted({m.param.rsplit(".", 1)[0] for m in outputs[name] if not is_lora_param(m.param)})
        groups.append(PruningGroup(
            id=start + len(groups), name=f"{name}/block", members=tuple(members), size=1, kind="block",
            modules=(name, branch.norm, *output), min_keep=0,
        ))
    return tuple(groups)


def with_block_groups(graph: Graph, model: nn.Module) -> Graph:
    """``graph`` with the block groups of ``model`` appended (``graph`` itself when it has them)."""
    if any(g.kind == "block" for g in graph.pruning_groups):
        return graph
    return dataclasses.replace(graph, pruning_groups=graph.pruning_groups + block_groups(model, graph))


def branch_of(model: nn.Module, group: PruningGroup) -> Branch:
    """The :class:`Branch` a ``block`` group stands for in ``model`` (names as traced)."""
    if group.kind != "block":
        raise GraphError(f"group {group.name} is a {group.kind} group, not a block")
    found = _branches(model).get(group.modules[0])
    if found is None:
        raise GraphError(
            f"block {group.name}: {group.modules[0]} is not a branch of the model (erased already, or the model "
            "changed since tracing); re-run discover-groups"
        )
    return found


def inner_groups(block: PruningGroup, groups: tuple[PruningGroup, ...] | list[PruningGroup]) -> list[int]:
    """Ids of the prunable (non-block) ``groups`` whose primary slices all lie inside ``block``'s branch:
    the heads or MLP channels that go with the block, so a budget must not count them twice."""
    prefix = block.modules[0] + "."
    return [
        g.id for g in groups
        if g.prunable and g.kind != "block" and g.primary and all(m.param.startswith(prefix) for m in g.primary)
    ]
