"""Stamp the pruning groups of a two-block trace onto a model with many identical blocks.

Tracing a 126-layer model only to learn that every layer has the same groups wastes time and
memory. :func:`stamp_layers` takes the graph of the *same* architecture traced with two blocks and
writes the groups of ``n`` blocks:

* a group whose members all live in block 0 (an MLP's channels, one attention layer's kv-head
  families) is a **per-block** group: it must have a twin in block 1 (the same members with the
  block index changed, the same size, kind, status and norms), or the blocks are not identical and
  stamping refuses (:class:`~shear.errors.GraphError`); it is copied once per block;
* any other group (the residual width, RoPE's head_dim factor shared by all blocks, the embedding)
  is **global**: its block-1 members must repeat its block-0 members, and it gets those members
  once per block, plus its members outside the blocks once.

Why two blocks, not one: only the second block tells a per-block group from a global one that
happens to touch block 0, and shows that consecutive blocks agree.

Members are sorted by ``(tensor name, dim)`` as discovery sorts them, and the index tables
(``positions``) are shared between the copies, so stamping 126 layers costs little memory. Group
ids follow the template's order, each per-block group expanded into ``n`` consecutive ids (a group
that precedes or follows another in the template still does). The stamped graph holds groups and
shapes only: ``nodes``, node groups and overlaps describe the traced template, not the stamped model.

Example:
    >>> import torch, transformers as tf, shear
    >>> cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    ...                      num_key_value_heads=2, vocab_size=32)
    >>> with torch.device("meta"):
    ...     two = tf.LlamaForCausalLM(cfg)
    >>> g = stamp_layers(shear.trace(two, {"input_ids": torch.zeros(1, 4, dtype=torch.long)}), "model.layers", 6)
    >>> sum(1 for p in g.prunable_groups if p.name.endswith("mlp/channel"))
    6
"""

from __future__ import annotations

import re
from dataclasses import replace

from shear.errors import GraphError
from shear.graph.groups import Member, NormRescale, PruningGroup
from shear.graph.ir import Graph

__all__ = ["stamp_layers", "block_index"]


def block_index(name: str, prefix: str) -> int | None:
    """The block a tensor or module name belongs to under ``prefix`` (``model.layers``), else None.

    Example:
        >>> block_index("model.layers.12.mlp.up_proj.weight", "model.layers"), block_index("lm_head.weight", "model.layers")
        (12, None)
    """
    head = prefix + "."
    if not name.startswith(head):
        return None
    idx, _, _ = name[len(head):].partition(".")
    return int(idx) if idx.isdigit() else None


def _rename(name: str, prefix: str, src: int, dst: int) -> str:
    head = f"{prefix}.{src}"
    if name == head or name.startswith(head + ".") or name.startswith(head + "/"):
        return f"{prefix}.{dst}" + name[len(head):]
    return name


def _rename_member(m: Member, prefix: str, src: int, dst: int) -> Member:
    return Member(_rename(m.param, prefix, src, dst), m.dim, m.role, m.positions, is_buffer=m.is_buffer)


def _rename_norm(n: NormRescale, prefix: str, src: int, dst: int) -> NormRescale:
    return NormRescale(_rename(n.module, prefix, src, dst), n.width)


def _same_member(a: Member, b: Member) -> bool:
    return (a.param, a.dim, a.role, a.is_buffer) == (b.param, b.dim, b.role, b.is_buffer) and bool(
        a.positions.shape == b.positions.shape and (a.positions == b.positions).all()
    )


def _same_members(a: tuple[Member, ...], b: tuple[Member, ...]) -> bool:
    key = lambda m: (m.param, m.dim)  # noqa: E731
    return len(a) == len(b) and all(_same_member(x, y) for x, y in zip(sorted(a, key=key), sorted(b, key=key)))


def _blocks_of(g: PruningGroup, prefix: str) -> set[int | None]:
    return {block_index(m.param, prefix) for m in g.members}


def _sorted(members: list[Member]) -> tuple[Member, ...]:
    return tuple(sorted(members, key=lambda m: (m.param, m.dim)))


def _twin_name(name: str, prefix: str) -> str:
    return re.sub(rf"^{re.escape(prefix)}\.0(?=[./]|$)", f"{prefix}.1", name)


def _block_copy(g: PruningGroup, prefix: str, b: int) -> PruningGroup:
    """Group ``g`` of block 0 as it is in block ``b`` (id 0: numbered later)."""
    return PruningGroup(
        id=0, name=_rename(g.name, prefix, 0, b),
        members=_sorted([_rename_member(m, prefix, 0, b) for m in g.members]),
        size=g.size, kind=g.kind, prunable=g.prunable,
        reasons=tuple(_rename(r, prefix, 0, b) for r in g.reasons),
        norms=tuple(_rename_norm(x, prefix, 0, b) for x in g.norms),
        modules=tuple(_rename(x, prefix, 0, b) for x in g.modules),
    )


def _global_stamp(g: PruningGroup, prefix: str, n: int) -> PruningGroup:
    """A group running through the blocks (the residual width): its members outside the blocks, and
    its block-0 members once per block; a :class:`GraphError` when blocks 0 and 1 differ in it."""
    first = [m for m in g.members if block_index(m.param, prefix) == 0]
    second = [m for m in g.members if block_index(m.param, prefix) == 1]
    outside = [m for m in g.members if block_index(m.param, prefix) is None]
    if not _same_members(tuple(_rename_member(m, prefix, 0, 1) for m in first), tuple(second)):
        raise GraphError(
            f"stamp_layers: global group {g.name} runs through blocks 0 and 1 differently; the blocks differ, "
            "so stamping cannot describe this model. Trace the full model instead (shear.plan(..., layers='all'))"
        )
    members = outside + [_rename_member(m, prefix, 0, b) for b in range(n) for m in first]
    norms_out = [x for x in g.norms if block_index(x.module, prefix) is None]
    norms_in = [x for x in g.norms if block_index(x.module, prefix) == 0]
    norms = [_rename_norm(x, prefix, 0, b) for b in range(n) for x in norms_in] + norms_out
    mods_out = [x for x in g.modules if block_index(x, prefix) is None]
    mods_in = [x for x in g.modules if block_index(x, prefix) == 0]
    modules = mods_out + [_rename(x, prefix, 0, b) for b in range(n) for x in mods_in]
    return replace(g, id=0, members=_sorted(members), norms=tuple(norms), modules=tuple(modules))


def stamp_layers(template: Graph, prefix: str, n: int) -> Graph:
    """The groups of a model with ``n`` identical blocks under ``prefix``, from a two-block ``template``.

    Raises :class:`GraphError` when the template does not have exactly blocks 0 and 1, or when
    they differ (a group of block 0 without a twin in block 1), naming the group.
    """
    if n < 1:
        raise GraphError(f"stamp_layers: need at least one block, got {n}")
    blocks = {b for g in template.pruning_groups for b in _blocks_of(g, prefix) if b is not None}
    if blocks != {0, 1}:
        raise GraphError(
            f"stamp_layers: the template must be traced with exactly 2 blocks under {prefix!r}, found blocks "
            f"{sorted(blocks)}; build the model with num_hidden_layers=2 (or trace the full model)"
        )
    by_name = {g.name: g for g in template.pruning_groups}
    local1: set[int] = set()
    stamped: list[tuple[int, int, PruningGroup]] = []  # (template id, block, group)
    for g in template.pruning_groups:
        where = _blocks_of(g, prefix)
        if where == {1}:
            local1.add(g.id)
    for g in template.pruning_groups:
        where = _blocks_of(g, prefix)
        if where == {1}:
            continue
        if where == {0}:
            twin = by_name.get(_twin_name(g.name, prefix))
            want = tuple(_rename_member(m, prefix, 0, 1) for m in g.members)
            if (
                twin is None or twin.id not in local1 or twin.size != g.size or twin.kind != g.kind
                or twin.prunable != g.prunable or not _same_members(want, twin.members)
            ):
                raise GraphError(
                    f"stamp_layers: group {g.name} of block 0 has no identical twin in block 1 (looked for "
                    f"{_twin_name(g.name, prefix)!r}); the blocks differ, so stamping cannot describe this model. "
                    "Trace the full model instead (shear.plan(..., layers='all'))"
                )
            local1.discard(twin.id)
            stamped += [(g.id, b, _block_copy(g, prefix, b)) for b in range(n)]
            continue
        stamped.append((g.id, -1, _global_stamp(g, prefix, n)))
    if local1:
        names = sorted(by_name[g.name].name for g in template.pruning_groups if g.id in local1)
        raise GraphError(
            f"stamp_layers: groups of block 1 without a twin in block 0: {names[:3]}; the blocks differ. "
            "Trace the full model instead (shear.plan(..., layers='all'))"
        )
    stamped.sort(key=lambda t: (t[0], t[1]))
    groups = tuple(replace(g, id=i, node_group=-1) for i, (_, _, g) in enumerate(stamped))
    shapes: dict[str, tuple[int, ...]] = {}
    for name, shape in template.shapes.items():
        at = block_index(name, prefix)
        if at is None:
            shapes[name] = shape
        elif at == 0:
            shapes.update({_rename(name, prefix, 0, k): shape for k in range(n)})
    buffers = frozenset(
        _rename(x, prefix, 0, k) for x in template.buffers for k in (range(n) if block_index(x, prefix) == 0 else (0,))
        if block_index(x, prefix) != 1
    )
    return Graph(
        model_class=template.model_class,
        nodes=[],
        pruning_groups=groups,
        node_groups=(),
        composites=(),
        overlaps=(),
        diagnostics=template.diagnostics,
        shapes=shapes,
        buffers=buffers,
        trace_seconds=template.trace_seconds,
        group_seconds=template.group_seconds,
    )
