"""Stable text form of the IR (used for golden files): pruning groups, node groups, overlaps.

Example:
    >>> import torch, shear
    >>> g = shear.trace(torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2)),
    ...                 torch.randn(1, 4))
    >>> print(format_groups(g).splitlines()[0])
    pruning groups: 1 prunable of 3, 6 structures
"""

from __future__ import annotations

from shear.graph.ir import Graph
from shear.graph.pins import pin_kinds

__all__ = ["format_graph", "format_groups", "format_nodes", "format_structure"]


def format_groups(g: Graph) -> str:
    lines = [
        f"pruning groups: {len(g.prunable_groups)} prunable of {len(g.pruning_groups)}, "
        f"{g.num_structures()} structures"
    ]
    for p in g.pruning_groups:
        state = "prunable" if p.prunable else "pinned: " + "; ".join(p.reasons)
        lines.append(f"  G{p.id} {p.name} [{p.kind} x{p.size}] {state}")
        for m in p.members:
            lines.append(f"      {m.role.value:9s} {m.param}[{m.dim}] k={m.k}")
        for n in p.norms:
            lines.append(f"      rescale   {n.module} (width {n.width})")
    return "\n".join(lines)


def format_nodes(g: Graph) -> str:
    lines = [f"nodes: {len(g.nodes)}"]
    for n in g.nodes:
        shape = "x".join(str(s) for s in n.shape) if n.shape is not None else "-"
        if n.composite:
            lines.append(f"  {n.name} = lora_linear[{', '.join(n.params)}] : {shape}")
        else:
            params = f" params={','.join(n.params)}" if n.params else ""
            lines.append(f"  {n.name} = {n.op}({', '.join(n.inputs)}) : {shape}{params}  # {n.module}")
    return "\n".join(lines)


def format_graph(g: Graph, nodes: bool = False) -> str:
    """The whole IR as text: header, node groups, overlaps, pruning groups, diagnostics."""
    out = [g.summary()]
    out.append(f"node groups: {len(g.node_groups)}")
    for ng in g.node_groups:
        if ng.kind == "composed" or g.pruning_groups[ng.pruning_groups[0]].prunable:
            out.append(f"  N{ng.id} {ng.kind} {ng.name}: {', '.join(ng.modules)} -> G{list(ng.pruning_groups)}")
    if g.overlaps:
        out.append(f"overlaps: {len(g.overlaps)}")
        for o in g.overlaps:
            out.append(f"  N{o.composed} & N{o.basic} ({o.side}): {', '.join(o.slices)}")
    out.append(format_groups(g))
    if g.diagnostics:
        out.append(f"diagnostics: {len(g.diagnostics)}")
        for d in g.diagnostics:
            out.append(f"  [{d.kind}] {d.module or '<root>'}: {d.message}")
    if nodes:
        out.append(format_nodes(g))
    return "\n".join(out)


def format_structure(g: Graph) -> str:
    """What pruning depends on, and nothing an upstream release may rename: the golden-file form.

    Node groups, overlaps and pruning groups by name (not by id), sorted; each pruning group with
    its kind, size, members, norm rescales, and, when pinned, the *kinds* of its pin reasons
    (``shear.graph.pins``); LoRA composites; diagnostics by kind and module. Left out: the aten
    nodes themselves, their count and ids, and the wording of reasons, which change with torch and
    transformers releases while the groups stay the same.

    Example:
        >>> import torch, shear
        >>> g = shear.trace(torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2)),
        ...                 torch.randn(1, 4))
        >>> print(format_structure(g).splitlines()[0])
        Sequential: 3 pruning groups (1 prunable, 6 structures), 0 LoRA composites
    """
    pg = {p.id: p.name for p in g.pruning_groups}
    ng = {n.id: n.name for n in g.node_groups}
    out = [
        f"{g.model_class}: {len(g.pruning_groups)} pruning groups ({len(g.prunable_groups)} prunable, "
        f"{g.num_structures()} structures), {len(g.composites)} LoRA composites"
    ]
    shown = [n for n in g.node_groups if n.kind == "composed" or g.pruning_groups[n.pruning_groups[0]].prunable]
    out.append(f"node groups: {len(shown)} shown of {len(g.node_groups)}")
    for n in sorted(shown, key=lambda n: (n.kind, n.name)):
        targets = ", ".join(sorted(pg[i] for i in n.pruning_groups))
        out.append(f"  {n.kind} {n.name}: {', '.join(sorted(n.modules))} -> {targets}")
    out.append(f"overlaps: {len(g.overlaps)}")
    for o in sorted(g.overlaps, key=lambda o: (ng[o.composed], ng[o.basic], o.side)):
        out.append(f"  {ng[o.composed]} & {ng[o.basic]} ({o.side}): {', '.join(sorted(o.slices))}")
    out.append(f"pruning groups: {len(g.prunable_groups)} prunable of {len(g.pruning_groups)}")
    for p in sorted(g.pruning_groups, key=lambda p: p.name):
        state = "prunable" if p.prunable else "pinned: " + ", ".join(pin_kinds(p.reasons))
        out.append(f"  {p.name} [{p.kind} x{p.size}] {state}")
        for m in sorted(p.members, key=lambda m: (m.param, m.dim)):
            out.append(f"      {m.role.value:9s} {m.param}[{m.dim}] k={m.k}")
        for r in sorted(p.norms, key=lambda r: r.module):
            out.append(f"      rescale   {r.module} (width {r.width})")
    out.append(f"LoRA composites: {len(g.composites)}")
    for c in sorted(g.composites, key=lambda c: c.module):
        out.append(f"  {c.module}: adapters {', '.join(c.adapters)} rank {', '.join(map(str, c.rank))}")
    kinds = sorted({(d.kind, d.module or "<root>") for d in g.diagnostics})
    out.append(f"diagnostics: {len(kinds)}")
    out.extend(f"  [{k}] {m}" for k, m in kinds)
    return "\n".join(out)
