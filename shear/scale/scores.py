"""Structured magnitude saliency streamed from safetensors shards, one tensor in memory at a time.

It chooses exactly what the ``magnitude`` pass chooses in memory
(:func:`~shear.passes.baselines.magnitude.prune_lowest_norm`): in every prunable group, the
``structure_count(size, ratio)`` structures (or ``counts[group]``, the per-group counts of a
parameter ratio: :mod:`shear.scale.counts`) with the lowest L2 norm over all their parameter slices. The pass walks the groups in order and zeroes each group's choice
before scoring the next, so a group that shares a tensor with an earlier one (an MLP channel group
reads ``down_proj`` columns after the residual group zeroed some of its rows) sees those zeros.
Here the groups are put into *levels*: a group's level is one more than the highest level of the
earlier groups it shares a tensor with. Each level is one pass over the tensors it needs, with the
choices of lower levels zeroed in a copy of each tensor as it is read. For LLaMA-style models that
is two passes: the residual width, then every block's MLP channels and kv-head families.

Per structure, each member's sum of squares is kept and summed in member order, as
:func:`shear.passes.baselines.magnitude.structure_norms` sums them, so the scores are bit-identical for
tensors up to :data:`~shear.scale.memory.CHUNK_ELEMENTS` elements; larger tensors are reduced in
slabs (float64, so the order only moves the last bits).

Example:
    >>> chosen = stream_magnitude(ckpt, src, ratio=0.2)                   # doctest: +SKIP
    >>> {src.graph.pruning_groups[g].name: len(i) for g, i in chosen.items()}  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from shear.errors import CheckpointError
from shear.graph.groups import Member, PruningGroup
from shear.kernels.allocation import structure_count
from shear.model.tensors import TensorTable
from shear.scale.memory import CHUNK_ELEMENTS
from shear.scale.shards import ShardedCheckpoint
from shear.scale.source import ModelSource

__all__ = ["TensorKeys", "tensor_keys", "member_sumsq", "group_levels", "stream_magnitude"]


@dataclass(frozen=True)
class TensorKeys:
    """Canonical tensor name of the model -> its key in the checkpoint, and what the checkpoint lacks."""

    table: TensorTable
    key: dict[str, str]
    """Canonical name -> checkpoint key (the canonical name or one of its tied aliases)."""
    extra: tuple[str, ...]
    """Checkpoint tensors the model does not have (left out of the output)."""


def tensor_keys(ckpt: ShardedCheckpoint, src: ModelSource) -> TensorKeys:
    """Match the meta model's persistent tensors with the checkpoint's; a missing one is an error."""
    table = TensorTable(src.model)
    persistent: set[str] = set()
    for mod_name, mod in src.model.named_modules(remove_duplicate=False):
        prefix = f"{mod_name}." if mod_name else ""
        persistent.update(prefix + k for k, v in mod._parameters.items() if v is not None)
        persistent.update(prefix + k for k, v in mod._buffers.items() if v is not None and k not in mod._non_persistent_buffers_set)
    aliases: dict[str, list[str]] = {}
    for name, canon in table.canonical.items():
        if name in persistent:
            aliases.setdefault(canon, []).append(name)
    key: dict[str, str] = {}
    missing = []
    for canon, names in aliases.items():
        found = next((n for n in [canon, *names] if n in ckpt.tensors), None)
        if found is None:
            missing.append(canon)
        else:
            key[canon] = found
    if missing:
        raise CheckpointError(
            f"{ckpt.root}: the checkpoint lacks {len(missing)} tensors the config's model has (e.g. {missing[0]!r}); "
            "a shard is missing from the index or config.json belongs to another model"
        )
    known = {n for names in aliases.values() for n in names}
    extra = tuple(sorted(n for n in ckpt.tensors if n not in known))
    return TensorKeys(table, key, extra)


def member_sumsq(t: torch.Tensor, m: Member, size: int, chunk: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """Float64 ``[size]``: sum of squares of each structure's slice of ``t`` along ``m.dim``.

    The formula of :func:`shear.passes.baselines.magnitude.structure_norms`; a 2-D tensor over ``chunk``
    elements is reduced in slabs along its other dimension.
    """
    pos = m.positions.flatten().to(t.device)

    def reduce(x: torch.Tensor) -> torch.Tensor:
        picked = x.index_select(m.dim, pos)
        return picked.movedim(m.dim, 0).reshape(size, -1).double().pow(2).sum(dim=1)

    if t.numel() <= chunk or t.dim() != 2:
        return reduce(t).cpu()
    other = 1 - m.dim
    step = max(1, chunk // max(1, t.shape[m.dim]))
    total = torch.zeros(size, dtype=torch.float64)
    for start in range(0, t.shape[other], step):
        total += reduce(t.narrow(other, start, min(step, t.shape[other] - start))).cpu()
    return total


def _scored(table: TensorTable, g: PruningGroup) -> list[tuple[int, str, Member]]:
    """(member index, canonical tensor, member) of the parameter members, as structure_norms reads them."""
    out = []
    for j, m in enumerate(g.members):
        if m.is_buffer:
            continue
        canon = table.resolve(m.param)
        if table.is_param.get(canon, False):
            out.append((j, canon, m))
    return out


def group_levels(table: TensorTable, groups: list[PruningGroup]) -> dict[int, int]:
    """Group id -> level: 0, or one more than the highest level of an earlier group sharing a tensor."""
    users: dict[str, list[int]] = {}
    level: dict[int, int] = {}
    for g in groups:
        canons = {c for _, c, _ in _scored(table, g)}
        deps = [h for c in canons for h in users.get(c, ())]
        level[g.id] = 1 + max(level[h] for h in deps) if deps else 0
        for c in canons:
            users.setdefault(c, []).append(g.id)
    return level


def stream_magnitude(
    ckpt: ShardedCheckpoint, src: ModelSource, ratio: float, *, round_to: int = 1, keys: TensorKeys | None = None,
    chunk: int = CHUNK_ELEMENTS, on_tensor: Callable[[str], None] | None = None, counts: Mapping[int, int] | None = None,
) -> dict[int, torch.Tensor]:
    """Group id -> sorted indices of the structures ``magnitude{ratio}`` removes, read from ``ckpt``;
    with ``counts``, that many of each group it names (and no other group)."""
    keys = keys or tensor_keys(ckpt, src)
    table = keys.table
    groups = sorted((g for g in src.graph.pruning_groups if g.prunable and (counts is None or counts.get(g.id, 0) > 0)),
                    key=lambda g: g.id)  # fmt: skip
    level = group_levels(table, groups)
    rank = {name: i for i, name in enumerate(ckpt.order())}
    chosen: dict[int, torch.Tensor] = {}
    for lv in range(max(level.values(), default=-1) + 1):
        current = [g for g in groups if level[g.id] == lv]
        need: dict[str, list[tuple[PruningGroup, int, Member]]] = {}
        for g in current:
            for j, canon, m in _scored(table, g):
                need.setdefault(canon, []).append((g, j, m))
        zeroing: dict[str, list[tuple[Member, torch.Tensor]]] = {}
        for g in groups:
            idx = chosen.get(g.id)
            if idx is None or not idx.numel():
                continue
            for m in g.primary:
                canon = table.resolve(m.param)
                if canon in need:
                    zeroing.setdefault(canon, []).append((m, idx))
        parts: dict[int, dict[int, torch.Tensor]] = {g.id: {} for g in current}
        for canon in sorted(need, key=lambda c: rank[keys.key[c]]):
            t = ckpt.read(keys.key[canon])
            if canon in zeroing:
                t = t.clone()
                for m, idx in zeroing[canon]:
                    t.index_fill_(m.dim, m.positions[idx].flatten(), 0)
            for g, j, m in need[canon]:
                parts[g.id][j] = member_sumsq(t, m, g.size, chunk)
            del t
            if on_tensor is not None:
                on_tensor(canon)
        for g in current:
            sq = torch.zeros(g.size, dtype=torch.float64)
            for j, _, _ in _scored(table, g):
                sq += parts[g.id][j]
            n = counts[g.id] if counts is not None else structure_count(g.size, ratio, round_to)
            chosen[g.id] = torch.sort(sq.sqrt(), stable=True).indices[:n].sort().values
    return chosen
