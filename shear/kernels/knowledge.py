"""The measurement of LoRAShear's knowledge distribution (Algorithm 3), free of any pass machinery:
which node groups are perturbed, which slices each perturbation zeroes, and the perturb-evaluate-restore
step that puts every weight back bit for bit. The pass is :mod:`shear.passes.lorashear.knowledge`.

Example:
    >>> round(pooled_perplexity({"a": 10.0, "b": 40.0}), 6)
    20.0
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from shear.errors import KernelError
from shear.graph.groups import PruningGroup
from shear.graph.ir import Graph, NodeGroup
from shear.kernels.allocation import structure_count
from shear.kernels.saliency import SaliencyScores
from shear.model.tensors import TensorTable

__all__ = [
    "pooled_perplexity", "Perturbation", "network_order", "Chooser", "analysed_node_groups", "perturbations",
    "measure_perturbed",
]  # fmt: skip


def pooled_perplexity(by_source: dict[str, float]) -> float:
    """Geometric mean of per-source perplexities (``exp`` of the mean per-source NLL)."""
    if not by_source:
        return float("nan")
    vals = list(by_source.values())
    if any(not math.isfinite(v) or v <= 0 for v in vals):
        return float("inf")
    return math.exp(sum(math.log(v) for v in vals) / len(vals))


@dataclass(frozen=True)
class Perturbation:
    """The primary slices one node group's measurement zeroes: (tensor, dim, flat indices)."""

    node_group: NodeGroup
    pruning_groups: tuple[int, ...]
    slices: tuple[tuple[torch.Tensor, int, torch.Tensor], ...]
    structures: int


def network_order(model: nn.Module, graph: Graph) -> dict[int, tuple[float, int]]:
    position = {name: i for i, (name, _) in enumerate(model.named_modules())}
    out = {}
    for ng in graph.node_groups:
        pos = [position[m] for m in ng.modules if m in position]
        out[ng.id] = (float(min(pos)) if pos else math.inf, ng.id)
    return out


class Chooser:
    """Which structures of a pruning group a measurement zeroes: the lowest by ``proxy``'s scores, or a
    seeded random draw per (node group, pruning group)."""

    def __init__(self, proxy: str, scores: SaliencyScores | None, seed: int) -> None:
        self.proxy, self.scores, self.seed = proxy, scores, seed

    def __call__(self, group: PruningGroup, n: int, node_group: int) -> torch.Tensor:
        if n <= 0:
            return torch.zeros(0, dtype=torch.long)
        if self.proxy == "random":
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + node_group * 1009 + group.id)
            return torch.randperm(group.size, generator=gen)[:n].sort().values
        assert self.scores is not None
        if group.id not in self.scores.by_group:
            raise KernelError(f"knowledge-distribution: the {self.proxy} scores have no entry for group {group.name}")
        return self.scores.lowest_in(group.id, n)


def analysed_node_groups(
    graph: Graph, ratio: float, include: str, kinds: tuple[str, ...]
) -> list[tuple[NodeGroup, list[tuple[PruningGroup, list[Any], int]]]]:
    """The node groups a measurement perturbs, each with (pruning group, primary members it zeroes,
    structures) per owned group; from the graph alone (no scores), so a cached result can be checked."""
    groups = {g.id: g for g in graph.pruning_groups}
    composites = {c.module: c for c in graph.composites}
    out: list[tuple[NodeGroup, list[tuple[PruningGroup, list[Any], int]]]] = []
    for ng in graph.node_groups:
        if include != "all" and ng.kind != include:
            continue
        owned: list[tuple[PruningGroup, list[Any], int]] = []
        for gid in ng.pruning_groups:
            g = groups.get(gid)
            if g is None or not g.prunable or g.kind not in kinds:
                continue
            if ng.kind == "composed":
                comp = composites.get(ng.name)
                prefix = f"{comp.module if comp is not None else ng.name}."
                members = [m for m in g.primary if m.param.startswith(prefix)]
            else:
                members = list(g.primary)
            n = structure_count(g.size, ratio)
            if members and n > 0:
                owned.append((g, members, n))
        if owned:
            out.append((ng, owned))
    return out


def perturbations(
    graph: Graph, table: TensorTable, ratio: float, choose: Chooser, include: str, kinds: tuple[str, ...]
) -> list[Perturbation]:
    out: list[Perturbation] = []
    for ng, owned in analysed_node_groups(graph, ratio, include, kinds):
        slices: list[tuple[torch.Tensor, int, torch.Tensor]] = []
        count = 0
        for g, members, n in owned:
            idx = choose(g, n, ng.id)
            for m in members:
                t = table.get(m.param)
                slices.append((t, m.dim, m.positions[idx].flatten().to(t.device)))
            count += int(idx.numel())
        out.append(Perturbation(ng, tuple(g.id for g, _, _ in owned), tuple(slices), count))
    return out


def measure_perturbed(
    model: nn.Module, p: Perturbation, evaluate: Any
) -> dict[str, float]:
    """Zero the perturbation's slices, evaluate, restore them bit for bit (checked)."""
    saved = [(t, dim, idx, t.detach().index_select(dim, idx).clone()) for t, dim, idx in p.slices]
    try:
        with torch.no_grad():
            for t, dim, idx, _ in saved:
                t.index_fill_(dim, idx, 0)
        return dict(evaluate(model))
    finally:
        with torch.no_grad():
            for t, dim, idx, values in reversed(saved):
                t.index_copy_(dim, idx, values)
            for t, dim, idx, values in saved:
                now = t.detach().index_select(dim, idx)
                if not torch.equal(now.view(torch.uint8) if now.is_floating_point() else now,
                                   values.view(torch.uint8) if values.is_floating_point() else values):
                    raise KernelError(
                        f"knowledge-distribution: weights of node group {p.node_group.name} were not restored "
                        "exactly after the measurement"
                    )
