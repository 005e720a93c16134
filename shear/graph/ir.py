"""The IR: nodes (LoRA composites collapsed into one node), node groups, overlaps, pruning groups.

A :class:`Graph` is what :func:`shear.graph.trace` returns. It prints as stable text
(:mod:`shear.graph.printer`), draws with graphviz (:mod:`shear.graph.draw`) and checks its own
invariants with :meth:`Graph.check`.

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

__all__ = ["IRNode", "NodeGroup", "LoraComposite", "Overlap", "Graph"]


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
        from shear.graph.printer import format_graph

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
                if not g.prunable:
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
