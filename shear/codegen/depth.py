"""Erasing whole blocks: decoder-layer branches out, layers with no branch left out, the config rewritten.

A ``block`` pruning group (:mod:`shear.model.branches`) is removable when its primary slices (the
branch's output projection rows, bias and ``lora_B`` rows) are exactly zero: the masked branch adds
zero to the residual stream. Erasing it

1. puts a :class:`~shear.model.blocks.RemovedBranch` (zero out, the cache slot kept in step) in the
   branch's place and an identity in place of the norm that fed only the branch; LoRA adapters on
   the branch's projections go with it;
2. drops every layer that has no branch left (it computes ``x + 0 + 0``), renumbers the ``layer_idx``
   of the layers after it (the generation cache is indexed by it), and rewrites the transformers
   config: ``num_hidden_layers``, every per-layer list (``layer_types``, ...), ``max_window_layers``,
   and :data:`~shear.model.blocks.REMOVED_BLOCKS_FIELD` for layers that lost one branch only.

The width structures are sliced first (:func:`shear.codegen.module_tree.apply_plan` runs this
last), so a plan's tensor names still refer to the layers as traced.

Example:
    >>> import torch
    >>> zero_blocks(TensorTable(torch.nn.Linear(2, 2)), [])
    {}
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from shear.codegen.hf_config import hf_base_model
from shear.errors import GraphError
from shear.graph.groups import PruningGroup
from shear.model.blocks import (
    REMOVED_BLOCKS_FIELD,
    BranchSlot,
    branch_layout,
    decoder_blocks,
    remove_branch,
    removed_blocks,
)
from shear.model.tensors import TensorTable, nonzero_structures

__all__ = ["BLOCK_KIND", "zero_blocks", "chosen_blocks", "check_blocks", "remove_blocks", "PER_LAYER_LISTS", "PER_LAYER_COUNTS"]

BLOCK_KIND = "block"

PER_LAYER_LISTS: tuple[str, ...] = ("layer_types", "no_rope_layers")
"""Config fields holding one entry per layer: the dropped layers' entries go."""

PER_LAYER_COUNTS: tuple[str, ...] = ("max_window_layers",)
"""Config fields that count layers from the bottom (Qwen2's full-attention layers): rewritten to the
number of kept layers below the old count."""


def zero_blocks(table: TensorTable, groups: Iterable[PruningGroup]) -> dict[int, tuple[str, ...]]:
    """Group id -> modules (branch, norm, output projection) of every prunable ``block`` group whose
    primary slices are all exactly zero."""
    return {
        g.id: g.modules for g in groups
        if g.prunable and g.kind == BLOCK_KIND and not bool(nonzero_structures(table, g).any())
    }


def chosen_blocks(groups: Iterable[PruningGroup], removed: Mapping[int, torch.Tensor]) -> dict[int, tuple[str, ...]]:
    """Group id -> modules of the ``block`` groups that ``removed`` (group id -> structure indices) names."""
    return {
        g.id: g.modules for g in groups
        if g.prunable and g.kind == BLOCK_KIND and g.id in removed and len(removed[g.id])
    }


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, attr = name.rpartition(".")
    try:
        return (model.get_submodule(parent) if parent else model), attr
    except AttributeError:
        raise GraphError(f"block names module {name!r}, which the model does not have; re-run discover-groups") from None


def _todo(model: nn.Module, blocks: list[tuple[str, ...]]) -> tuple[list[tuple[nn.Module, BranchSlot, int]], list[int]]:
    """(layer, slot, layer index) per block, and the layers left with no branch; refuses a block that
    is not a branch, and erasing every layer."""
    slots = {s.attr: s for s in branch_layout(model)}
    layers = decoder_blocks(model)
    index = {id(layer): i for i, layer in enumerate(layers)}
    todo = []
    for modules in blocks:
        layer, attr = _parent(model, modules[0])
        if id(layer) not in index or attr not in slots:
            raise GraphError(f"block {modules[0]} is not a branch of a decoder layer of {type(model).__name__}")
        todo.append((layer, slots[attr], index[id(layer)]))
    after = [set(kinds) for kinds in removed_blocks(model)]
    for _, slot, i in todo:
        after[i].add(slot.kind)
    gone = [i for i, kinds in enumerate(after) if len(kinds) == len(slots)]
    if len(gone) == len(layers):
        raise GraphError(
            f"erasing these blocks would remove all {len(layers)} decoder layers of {type(model).__name__}; "
            "keep at least one branch (prune a smaller ratio)"
        )
    return todo, gone


def check_blocks(model: nn.Module, blocks: Iterable[tuple[str, ...]]) -> None:
    """Raise :class:`~shear.errors.GraphError` now, before anything is sliced, when :func:`remove_blocks`
    would refuse ``blocks``."""
    blocks = list(blocks)
    if blocks:
        _todo(model, blocks)


def remove_blocks(model: nn.Module, blocks: Iterable[tuple[str, ...]]) -> int:
    """Erase the branches named by ``blocks`` (each a block group's ``modules``) from ``model`` in place;
    drop the layers left with no branch and rewrite the config. Returns the number of layers dropped."""
    blocks = list(blocks)
    if not blocks:
        return 0
    todo, gone = _todo(model, blocks)
    for layer, slot, i in todo:
        remove_branch(layer, slot, i)
    layers = decoder_blocks(model)
    for i in reversed(gone):
        del layers[i]
    _renumber(layers)
    _rewrite_config(model, len(gone) + len(layers), gone)
    return len(gone)


def _renumber(layers: nn.ModuleList) -> None:
    """Every ``layer_idx`` inside layer ``j`` becomes ``j`` (attention modules, erased branches)."""
    for j, layer in enumerate(layers):
        for m in layer.modules():
            if isinstance(getattr(m, "layer_idx", None), int):
                setattr(m, "layer_idx", j)  # noqa: B010 - an attribute of transformers' modules, not declared on nn.Module


def _rewrite_config(model: nn.Module, before: int, gone: list[int]) -> None:
    base = hf_base_model(model)
    config = getattr(base, "config", None)
    if config is None:
        return
    kept = [i for i in range(before) if i not in set(gone)]
    if gone:
        for key in PER_LAYER_LISTS:
            value = getattr(config, key, None)
            if isinstance(value, (list, tuple)) and len(value) == before:
                setattr(config, key, type(value)(value[i] for i in kept))
        for key in PER_LAYER_COUNTS:
            value = getattr(config, key, None)
            if isinstance(value, int) and not isinstance(value, bool):
                setattr(config, key, sum(1 for i in kept if i < value))
        config.num_hidden_layers = len(kept)
    partial = removed_blocks(model)
    if any(partial):
        setattr(config, REMOVED_BLOCKS_FIELD, [list(kinds) for kinds in partial])
    elif hasattr(config, REMOVED_BLOCKS_FIELD):
        delattr(config, REMOVED_BLOCKS_FIELD)
