"""The measurement of LoRAShear's knowledge distribution (Algorithm 3), free of any pass machinery:
which node groups are perturbed, which slices each perturbation zeroes, the perturb-evaluate-restore
step that puts every weight back bit for bit, and the evaluation of every validation source in one
forward per window batch. The pass is :mod:`shear.passes.lorashear.knowledge`.

A perturbation zeroes the primary slices (producer rows, bias, lora_B rows) of the chosen structures
of the pruning groups a node group owns or, for a LoRA composite, produces: what LHSPG leaves behind
when it removes those structures. Its :attr:`Perturbation.key` names those slices (canonical tensor,
dim, flat indices), read from the IR's pruning groups; node groups with equal keys (a gated MLP's
channel group and its gate/up composites, when the proxy picks the same structures) are one
measurement.

Example:
    >>> round(pooled_perplexity({"a": 10.0, "b": 40.0}), 6)
    20.0
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from shear.errors import KernelError
from shear.graph.groups import PruningGroup
from shear.graph.ir import Graph, NodeGroup
from shear.kernels.allocation import structure_count
from shear.kernels.losses import causal_lm_loss_sum, chunked_causal_lm_loss_sum, head_bypassed, output_head
from shear.kernels.saliency import SaliencyScores
from shear.model.devices import model_device
from shear.model.facts import logits_of
from shear.model.tensors import TensorTable

__all__ = [
    "pooled_perplexity", "Perturbation", "network_order", "Chooser", "analysed_node_groups", "perturbations",
    "measure_perturbed", "distinct", "source_perplexities",
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
    key: str = ""
    """Digest of the zeroed slices (canonical tensor name, dim, sorted flat indices): equal keys zero
    the same weights, so they are one measurement."""

    @property
    def measurement(self) -> str:
        """What names this perturbation's measurement: its key, else its node group."""
        return self.key or f"node-group-{self.node_group.id}"


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
    structures) per owned group; from the graph alone (no scores), so a cached result can be checked.
    A composite (LoRA linear) takes the pruning groups whose primary slices it holds (its output side)
    and zeroes all their primary slices: removing a structure is all or nothing."""
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
            members = list(g.primary)
            if ng.kind == "composed":
                comp = composites.get(ng.name)
                prefix = f"{comp.module if comp is not None else ng.name}."
                members = members if any(m.param.startswith(prefix) for m in members) else []
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
        named: list[tuple[str, int, bytes]] = []
        count = 0
        for g, members, n in owned:
            idx = choose(g, n, ng.id)
            for m in members:
                t = table.get(m.param)
                flat = m.positions[idx].flatten()
                slices.append((t, m.dim, flat.to(t.device)))
                named.append((table.resolve(m.param), m.dim, flat.sort().values.numpy().tobytes()))
            count += int(idx.numel())
        digest = hashlib.sha256()
        for name, dim, flat_bytes in sorted(set(named)):
            digest.update(f"{name}:{dim}:".encode() + flat_bytes + b";")
        out.append(Perturbation(ng, tuple(g.id for g, _, _ in owned), tuple(slices), count, digest.hexdigest()))
    return out


def distinct(todo: list[Perturbation]) -> dict[str, Perturbation]:
    """The first perturbation of each key, in order: the measurements to make.

    Example:
        >>> len(distinct([]))
        0
    """
    first: dict[str, Perturbation] = {}
    for p in todo:
        first.setdefault(p.measurement, p)
    return first


@torch.no_grad()
def source_perplexities(model: nn.Module, windows: Mapping[str, torch.Tensor], *, batch_size: int) -> dict[str, float]:
    """Per-source ``exp(mean next-token NLL)`` over ``[w, L]`` windows, every token scored; each forward
    holds ``batch_size`` windows of every source (one forward for all sources when each has at most
    ``batch_size`` windows), and the loss is summed per source.

    Example:
        >>> source_perplexities(model, {"a": ids[:2], "b": ids[2:4]}, batch_size=4)   # doctest: +SKIP
        {'a': 31.2, 'b': 18.9}
    """
    names = [n for n in windows if windows[n].numel()]
    if len({int(windows[n].shape[1]) for n in names}) > 1:
        raise KernelError(f"source_perplexities: the windows of {names} differ in length; give one seq_len")
    nll = dict.fromkeys(names, 0.0)
    count = dict.fromkeys(names, 0)
    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        depth = max((int(windows[n].shape[0]) for n in names), default=0)
        for i in range(0, depth, batch_size):
            parts = [(n, windows[n][i : i + batch_size]) for n in names if windows[n].shape[0] > i]
            batch = torch.cat([w for _, w in parts]).to(device)
            for (n, w), loss in zip(parts, _row_losses(model, batch, [len(w) for _, w in parts])):
                nll[n] += loss
                count[n] += w[:, 1:].numel()
    finally:
        model.train(was_training)
    return {n: math.exp(nll[n] / count[n]) if count[n] else float("nan") for n in names}


def _row_losses(model: nn.Module, batch: torch.Tensor, rows: list[int]) -> list[float]:
    """Summed NLL of consecutive row blocks of ``batch`` (``rows`` rows each), from one forward; the
    output head and the loss run per block (:func:`shear.kernels.losses.model_nll_sum`'s path)."""
    bounds = [(sum(rows[:k]), sum(rows[: k + 1])) for k in range(len(rows))]
    if output_head(model) is not None:
        with head_bypassed(model) as head:
            hidden = logits_of(model(input_ids=batch, use_cache=False))
        return [float(chunked_causal_lm_loss_sum(hidden[a:b], head, batch[a:b], chunk=1024)) for a, b in bounds]
    logits = logits_of(model(input_ids=batch, use_cache=False))
    return [float(causal_lm_loss_sum(logits[a:b], batch[a:b])) for a, b in bounds]


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
