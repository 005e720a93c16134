"""Discovery (LoRAShear Algorithm 2): composed node groups, basic node groups, overlaps, and G.

After the dimension analysis every tensor dimension is a tree over *leaf* spaces. Discovery

1. recognises composed operators (LoRA linears) and pins their rank space (never pruned unless
   asked);
2. resolves means over channel spaces: an RMS-style norm gets a rescale record, anything else pins;
3. turns each leaf space that touches parameters into a :class:`PruningGroup` with the exact
   ``[size, k]`` index table of every parameter/buffer dimension it runs through;
4. forms basic node groups (ops sharing a leaf space) and composed node groups (one per LoRA
   linear), and records their overlaps instead of merging them.

Example:
    >>> import torch, shear
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.GELU(), torch.nn.Linear(6, 4))
    >>> g = shear.trace(net, torch.randn(2, 4))
    >>> [(m.param, m.dim, m.role.value) for m in g.prunable_groups[0].members]
    [('0.weight', 0, 'primary'), ('0.bias', 0, 'primary'), ('2.weight', 1, 'secondary')]
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import torch
import torch.fx
from torch import nn

from shear.graph.analysis import DimAnalysis
from shear.graph.expert_groups import expert_groups
from shear.graph.groups import Member, NormRescale, PruningGroup, Role
from shear.graph.ir import Graph, IRNode, LoraComposite, NodeGroup, Overlap
from shear.graph.modules.composites import find_lora_composites
from shear.graph.modules.norms import find_rms_norm
from shear.graph.ops.registry import op_name, traced_size

__all__ = ["discover"]

LORA_RANK_REASON = "LoRA rank (not a prunable space unless asked)"
INNER_FACTOR_REASON = "inner factor of prunable structures (a head's head_dim): goes only with whole heads"
_SKIP_OPS = {"aten._assert_tensor_metadata.default", "aten.sym_size.int", "aten._assert_scalar.default"}


def _module_of_param(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def _owner(module: str, composites: list[LoraComposite]) -> str:
    for c in composites:
        if module == c.module or module.startswith(c.module + "."):
            return c.module
    return module


def _resolve_reductions(model: nn.Module, a: DimAnalysis) -> dict[int, list[NormRescale]]:
    modules = dict(model.named_modules())
    norms: dict[int, list[NormRescale]] = defaultdict(list)
    for sp, module, op in a.reductions:
        if a.spaces.is_pinned(sp):
            continue
        m = modules.get(module)
        rule = find_rms_norm(m) if m is not None else None
        if rule is None:
            kind = type(m).__name__ if m is not None else "?"
            a.spaces.pin(
                sp,
                f"{op} over channels in {module or '<root>'} ({kind}) changes after pruning; "
                "if it is an RMS norm, declare it with shear.graph.register_rms_norm",
            )
            continue
        width = a.spaces.size(sp)
        for leaf in set(a.spaces.leaves(sp)):
            rec = NormRescale(module, width)
            if rec not in norms[leaf]:
                norms[leaf].append(rec)
    return norms


def _member_positions(occs: list[torch.Tensor], size: int) -> torch.Tensor | None:
    idx_parts, pos_parts = [], []
    for occ in occs:
        pos = torch.nonzero(occ >= 0).flatten()
        idx_parts.append(occ[pos])
        pos_parts.append(pos)
    idx, pos = torch.cat(idx_parts), torch.cat(pos_parts)
    if torch.unique(pos).numel() != pos.numel():
        return None
    counts = torch.bincount(idx, minlength=size)
    k = int(counts[0])
    if k == 0 or bool((counts != k).any()):
        return None
    order = torch.argsort(idx * (int(pos.max()) + 1) + pos)
    return pos[order].view(size, k)


def _spans_rows(m: Member) -> bool:
    """A structure covers a run of adjacent rows of ``m`` (a head's ``head_dim`` rows), not only
    scattered single rows (a fused gate/up projection's channel ``i`` is rows ``i`` and ``i + h``)."""
    first = m.positions[0]
    return m.k > 1 and bool((first[1:] - first[:-1] == 1).any())


def _common_prefix(names: list[str]) -> str:
    if not names:
        return ""
    parts = [n.split(".") for n in names]
    out = []
    for xs in zip(*parts):
        if len(set(xs)) != 1:
            break
        out.append(xs[0])
    return ".".join(out)


def discover(model: nn.Module, ep: torch.export.ExportedProgram, a: DimAnalysis) -> Graph:
    """Build the :class:`Graph` from an exported program and its dimension analysis."""
    composites = find_lora_composites(model)
    for c in composites:
        for name in c.lora_a:
            sp = a.state_dims.get((name, 0))
            if sp is not None:
                a.spaces.pin(sp, LORA_RANK_REASON)
    norms = _resolve_reductions(model, a)
    a.spaces.pin_inner_factors(INNER_FACTOR_REASON)
    shapes = {ref.name: ref.shape for ref in a.state.values()}
    buffers = frozenset(ref.name for ref in a.state.values() if ref.is_buffer)
    members = _leaf_members(a, buffers)
    groups, leaf_of_group = _pruning_groups(model, a, members, composites, norms)
    groups, leaf_of_group = expert_groups(model, groups, leaf_of_group, shapes)  # MoE: from the module table
    nodes, leaf_ops = _ir_nodes(ep, a, composites, set(leaf_of_group))
    node_groups = [
        NodeGroup(gi, "basic", g.name, g.modules, tuple(leaf_ops.get(leaf_of_group[gi], ())), (gi,))
        for gi, g in enumerate(groups)
    ]
    groups = [_with_node_group(g, g.id) for g in groups]
    overlaps = _composite_node_groups(composites, groups, node_groups)
    return Graph(
        model_class=type(model).__name__,
        nodes=nodes,
        pruning_groups=tuple(groups),
        node_groups=tuple(node_groups),
        composites=tuple(composites),
        overlaps=tuple(overlaps),
        diagnostics=tuple(a.diagnostics),
        shapes=shapes,
        buffers=buffers,
    )


def _leaf_members(a: DimAnalysis, buffers: frozenset[str]) -> dict[int, list[Member]]:
    """Leaf space -> the tensor dims it indexes (pins a leaf whose layout is not uniform)."""
    members: dict[int, list[Member]] = defaultdict(list)
    bad: dict[int, str] = {}
    for (name, dim), sp in sorted(a.state_dims.items()):
        is_buffer = name in buffers
        role = a.roles.get((name, dim))
        if role is None:
            a.spaces.pin(sp, f"no rule gives {name}[{dim}] a role (e.g. a kernel or an unused tensor)")
            role = Role.SECONDARY if is_buffer else Role.PRIMARY
        for leaf, occs in a.spaces.expand(sp).items():
            pos = _member_positions(occs, a.spaces.size(leaf))
            if pos is None:
                bad[leaf] = f"non-uniform layout in {name}[{dim}]"
                continue
            members[leaf].append(Member(name, dim, role, pos, is_buffer=is_buffer))
    for leaf, why in bad.items():
        a.spaces.pin(leaf, why)
    return members


def _pruning_groups(
    model: nn.Module, a: DimAnalysis, members: dict[int, list[Member]], composites: list[LoraComposite],
    norms: dict[int, list[NormRescale]],
) -> tuple[list[PruningGroup], list[int]]:
    """One pruning group per leaf with members (kind, prunability, unique name); and each group's leaf."""
    groups: list[PruningGroup] = []
    used_names: dict[str, int] = {}
    leaf_of_group: list[int] = []
    for leaf in sorted(members):
        ms = tuple(members[leaf])
        primary_mods = sorted({_owner(_module_of_param(m.param), composites) for m in ms if m.role is Role.PRIMARY})
        all_mods = sorted({_owner(_module_of_param(m.param), composites) for m in ms})
        pinned = a.spaces.is_pinned(leaf)
        has_primary = any(m.role is Role.PRIMARY for m in ms)
        reasons = a.spaces.pin_reasons(leaf) if pinned else (() if has_primary else ("no producing parameter",))
        kind = "channel"
        if any(m.role is Role.PRIMARY and _spans_rows(m) for m in ms):
            kind = "head"
        elif len(primary_mods) >= 3 and all(m.k == 1 for m in ms if m.role is Role.PRIMARY):
            kind = "residual"
        prefix = _common_prefix(primary_mods or all_mods) or type(model).__name__
        groups.append(
            PruningGroup(
                id=len(groups),
                name=f"{prefix}/{kind}",
                members=ms,
                size=a.spaces.size(leaf),
                kind=kind,
                prunable=not pinned and has_primary,
                reasons=tuple(reasons),
                norms=tuple(norms.get(leaf, ())),
                modules=tuple(primary_mods + [m for m in all_mods if m not in primary_mods]),
            )
        )
        leaf_of_group.append(leaf)
    # a shared name goes to the prunable group first, then "#1", "#2", ... in leaf order
    for g in sorted(groups, key=lambda g: (not g.prunable, g.id)):
        n = used_names.get(g.name, 0)
        used_names[g.name] = n + 1
        if n:
            groups[g.id] = dataclasses.replace(g, name=f"{g.name}#{n}")
    return groups, leaf_of_group


def _ir_nodes(
    ep: torch.export.ExportedProgram, a: DimAnalysis, composites: list[LoraComposite], leaves: set[int]
) -> tuple[list[IRNode], dict[int, list[str]]]:
    """The IR nodes (each LoRA composite collapsed into one ``lora_linear``), and per leaf in
    ``leaves`` the labels of the nodes that touch it."""
    nodes: list[IRNode] = []
    comp_nodes: dict[str, IRNode] = {}
    leaf_ops: dict[int, list[str]] = defaultdict(list)
    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
        opn = op_name(node.target)
        if opn in _SKIP_OPS:
            continue
        module = a.module_of(node)
        owner = _owner(module, composites)
        is_comp = any(owner == c.module for c in composites)
        val = node.meta.get("val")
        shape = tuple(traced_size(s) for s in val.shape) if isinstance(val, torch.Tensor) else None
        params = tuple(a.state[x].name for x in node.all_input_nodes if x in a.state)
        if is_comp:
            ir = comp_nodes.get(owner)
            if ir is None:
                ir = IRNode(owner, "lora_linear", owner, (), shape, (), composite=owner)
                comp_nodes[owner] = ir
                nodes.append(ir)
            ir.params = tuple(dict.fromkeys(ir.params + params))
            ir.shape = shape or ir.shape
            label = owner
        else:
            inputs = tuple(x.name for x in node.all_input_nodes)
            nodes.append(IRNode(node.name, opn, module, inputs, shape, params))
            label = node.name
        for sp in a.node_spaces.get(node, ()):
            for leaf in set(a.spaces.leaves(sp)):
                if leaf in leaves and label not in leaf_ops[leaf]:
                    leaf_ops[leaf].append(label)
    return nodes, leaf_ops


def _composite_node_groups(
    composites: list[LoraComposite], groups: list[PruningGroup], node_groups: list[NodeGroup]
) -> list[Overlap]:
    """Append one ``composed`` node group per LoRA composite to ``node_groups``; return where each
    overlaps the prunable groups (output rows: primary; input columns: secondary)."""
    overlaps: list[Overlap] = []
    for c in composites:
        cid = len(node_groups)
        touched = tuple(
            g.id for g in groups if any(m.param.startswith(c.module + ".") for m in g.members) and g.prunable
        )
        node_groups.append(
            NodeGroup(cid, "composed", c.module, (c.base, *(f"{c.module}.lora_A.{k}" for k in c.adapters),
                      *(f"{c.module}.lora_B.{k}" for k in c.adapters)), (c.module,), touched)
        )
        for g in groups:
            if not g.prunable:
                continue
            for side, role in (("output", Role.PRIMARY), ("input", Role.SECONDARY)):
                sl = tuple(
                    f"{m.param}[{m.dim}]" for m in g.members if m.role is role and m.param.startswith(c.module + ".")
                )
                if sl:
                    overlaps.append(Overlap(cid, g.id, side, sl))
    return overlaps


def _with_node_group(g: PruningGroup, node_group: int) -> PruningGroup:
    return dataclasses.replace(g, node_group=node_group)

