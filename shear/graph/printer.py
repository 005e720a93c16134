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

__all__ = ["format_graph", "format_groups", "format_nodes"]


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
