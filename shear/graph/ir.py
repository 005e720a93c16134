"""The IR: nodes (LoRA composites collapsed into one node), node groups, overlaps, pruning groups.

A :class:`Graph` is what :func:`shear.graph.trace` returns. It prints as stable text
(:func:`format_graph`, also the golden files' form), draws with graphviz (:mod:`shear.graph.draw`)
and checks its own invariants with :meth:`Graph.check`.

Example:
    >>> import shear, torch                                             # doctest: +SKIP
    >>> g = shear.trace(model, {"input_ids": torch.zeros(1, 8, dtype=torch.long)})  # doctest: +SKIP
    >>> [p.name for p in g.prunable_groups][:2]                          # doctest: +SKIP
    ['model.layers.0.self_attn/head', 'model.layers.0.mlp/channel']
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from shear.errors import GraphError
from shear.graph.analysis import Diagnostic
from shear.graph.groups import PruningGroup, Role
from shear.graph.pins import pin_kinds

__all__ = ["IRNode", "NodeGroup", "LoraComposite", "Overlap", "Graph", "format_graph", "format_groups", "format_nodes", "format_structure"]


@dataclass(eq=False)
class IRNode:
    """One op of the IR; identity-hashed. A LoRA linear is a single node of op ``lora_linear``."""

    name: str
    op: str
    module: str
    inputs: tuple[str, ...]
    shape: tuple[int, ...] | None
    params: tuple[str, ...] = ()
    composite: str | None = None
    """Name of the composite module this node stands for (e.g. a peft ``lora.Linear``)."""


@dataclass(frozen=True, eq=False)
class NodeGroup:
    """Ops that share one space (``basic``) or make one composed operator (``composed``)."""

    id: int
    kind: str
    """``basic`` or ``composed``."""
    name: str
    modules: tuple[str, ...]
    ops: tuple[str, ...]
    pruning_groups: tuple[int, ...] = ()
    """Pruning groups this node group owns (basic) or whose slices it holds (composed)."""


@dataclass(frozen=True)
class LoraComposite:
    """A LoRA linear seen as one operator: frozen base W (+ bias) plus trainable A, B and scaling."""

    module: str
    base: str
    """Module name of the base layer (``<module>.base_layer``)."""
    adapters: tuple[str, ...]
    lora_a: tuple[str, ...]
    """Weight names of lora_A per adapter."""
    lora_b: tuple[str, ...]
    scaling: tuple[float, ...]
    rank: tuple[int, ...]


@dataclass(frozen=True)
class Overlap:
    """A composed node group whose output (or input) side also belongs to a basic node group."""

    composed: int
    basic: int
    side: str
    """``output`` (base W rows, bias, lora_B rows) or ``input`` (base W columns, lora_A columns)."""
    slices: tuple[str, ...]


@dataclass(eq=False)
class Graph:
    """The traced model: IR nodes, node groups, LoRA composites, overlaps and pruning groups."""

    model_class: str
    nodes: list[IRNode]
    pruning_groups: tuple[PruningGroup, ...]
    node_groups: tuple[NodeGroup, ...]
    composites: tuple[LoraComposite, ...]
    overlaps: tuple[Overlap, ...]
    diagnostics: tuple[Diagnostic, ...]
    shapes: dict[str, tuple[int, ...]]
    """Full shape of every parameter and buffer the groups refer to."""
    buffers: frozenset[str] = field(default_factory=frozenset)
    trace_seconds: float = 0.0
    group_seconds: float = 0.0

    @property
    def prunable_groups(self) -> tuple[PruningGroup, ...]:
        return tuple(g for g in self.pruning_groups if g.prunable)

    def group(self, name: str) -> PruningGroup:
        for g in self.pruning_groups:
            if g.name == name:
                return g
        raise GraphError(f"no pruning group named {name!r}; see print(graph) for the names")

    def num_structures(self) -> int:
        return sum(g.size for g in self.prunable_groups)

    def __str__(self) -> str:
        return format_graph(self)

    def check(self) -> None:
        """Verify IR invariants; raises :class:`GraphError` with the graph summary on failure.

        * every member refers to a known tensor and dim, and its indices are in range;
        * within a member, no flat index belongs to two structures;
        * no (tensor, dim, index) is claimed by two prunable groups;
        * every prunable group has a primary member.
        """
        owner: dict[tuple[str, int], dict[int, str]] = {}
        problems: list[str] = []
        for g in self.pruning_groups:
            if g.prunable and not any(m.role is Role.PRIMARY for m in g.members):
                problems.append(f"{g.name}: prunable without a primary member")
            for m in g.members:
                shape = self.shapes.get(m.param)
                if shape is None or m.dim >= len(shape):
                    problems.append(f"{g.name}: unknown tensor/dim {m.param}[{m.dim}]")
                    continue
                flat = m.positions.reshape(-1)
                if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= shape[m.dim]):
                    problems.append(f"{g.name}: {m.param}[{m.dim}] index out of range {shape[m.dim]}")
                if torch.unique(flat).numel() != flat.numel():
                    problems.append(f"{g.name}: {m.param}[{m.dim}] has an index in two structures")
                if not g.prunable or g.kind == "block":  # a block overlaps the widths inside it by design
                    continue
                claimed = owner.setdefault((m.param, m.dim), {})
                for idx in flat.tolist():
                    prev = claimed.get(idx)
                    if prev is not None and prev != g.name:
                        problems.append(f"{m.param}[{m.dim}][{idx}] claimed by {prev} and {g.name}")
                        break
                    claimed[idx] = g.name
        if problems:
            head = "\n  ".join(problems[:20])
            raise GraphError(f"IR invariants violated ({len(problems)}):\n  {head}\n{self.summary()}")

    def summary(self) -> str:
        n = len(self.prunable_groups)
        return (
            f"Graph({self.model_class}: {len(self.nodes)} nodes, {len(self.pruning_groups)} pruning groups "
            f"({n} prunable, {self.num_structures()} structures), {len(self.composites)} LoRA composites, "
            f"{len(self.diagnostics)} diagnostics)"
        )


# -- the IR's stable text form (golden files) -------------------------------------------------



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
