"""What the ``knowledge-distribution`` pass produces (LoRAShear's Algorithm 3): the perplexity deviation
of every analysed node group, their ranking, and the pruning groups to keep; shared by the pass
(:mod:`shear.passes.lorashear.knowledge`) and its cache (:mod:`shear.passes.lorashear.knowledge_cache`).

Example:
    >>> marked_count(0.1, 30), marked_count(0.1, 5)
    (3, 1)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from shear.errors import PassError
from shear.model.facts import strip_peft_prefix
from shear.passes.base import register_analysis

__all__ = ["NodeGroupDeviation", "KnowledgeDistribution", "marked_count"]


@dataclass(frozen=True)
class NodeGroupDeviation:
    """What pruning one node group did to perplexity."""

    node_group: int
    name: str
    kind: str
    """``basic`` or ``composed``."""
    pruning_groups: tuple[int, ...]
    """Pruning groups marked unprunable when this node group ranks in the top ``gamma``."""
    structures: int
    """Structures zeroed for the measurement (summed over its pruning groups)."""
    ppl: float
    deviation: float
    """``ppl - base ppl`` (``inf`` when perplexity was not finite)."""
    relative: float
    """``ppl / base ppl - 1``."""
    unprunable: bool = False


@dataclass(frozen=True)
class KnowledgeDistribution:
    """Result of Algorithm 3: per node group deviation, the ranking, and the groups to keep."""

    base_ppl: float
    base_ppl_by_source: dict[str, float]
    entries: tuple[NodeGroupDeviation, ...]
    """One per analysed node group, in network order (the order of their modules in the model)."""
    ranking: tuple[int, ...]
    """Node group ids, largest deviation first."""
    unprunable_node_groups: frozenset[int]
    unprunable_groups: frozenset[int]
    """Pruning group ids that pruning passes (LHSPG) must skip."""
    ratio: float
    gamma: float
    proxy: str
    figures: tuple[Path, ...] = field(default=())

    def __post_init__(self) -> None:
        ids = [e.node_group for e in self.entries]
        if sorted(ids) != sorted(self.ranking) or len(set(ids)) != len(ids):
            raise PassError("KnowledgeDistribution: ranking must order exactly the analysed node groups")
        if not self.unprunable_node_groups <= set(ids):
            raise PassError("KnowledgeDistribution: unprunable node groups must be analysed ones")

    def with_gamma(self, gamma: float) -> KnowledgeDistribution:
        """The same measurement with the top ``gamma`` of the ranking (rounded up) marked unprunable:
        gamma only reads the ranking, so a cached result serves every gamma.

        Example:
            >>> kd.with_gamma(0.2).unprunable_node_groups >= kd.unprunable_node_groups   # doctest: +SKIP
            True
        """
        marked = frozenset(self.ranking[: marked_count(gamma, len(self.ranking))])
        entries = tuple(replace(e, unprunable=e.node_group in marked) for e in self.entries)
        return replace(
            self,
            entries=entries,
            unprunable_node_groups=marked,
            unprunable_groups=frozenset(g for e in entries if e.unprunable for g in e.pruning_groups),
            gamma=gamma,
        )

    def entry(self, node_group: int) -> NodeGroupDeviation:
        for e in self.entries:
            if e.node_group == node_group:
                return e
        raise PassError(f"KnowledgeDistribution: node group {node_group} was not analysed; analysed: {[e.node_group for e in self.entries]}")

    def table(self) -> str:
        """A Markdown table of the node groups, most sensitive first."""
        lines = [
            f"base perplexity {self.base_ppl:.3f}; ratio {self.ratio}, proxy {self.proxy}, gamma {self.gamma}",
            "",
            "| rank | node group | kind | structures | ppl | Δppl | Δ% | unprunable |",
            "|---:|---|---|---:|---:|---:|---:|:---:|",
        ]
        for rank, ng in enumerate(self.ranking, 1):
            e = self.entry(ng)
            lines.append(
                f"| {rank} | {strip_peft_prefix(e.name)} | {e.kind} | {e.structures} | {e.ppl:.3f} | "
                f"{e.deviation:+.3f} | {100 * e.relative:+.1f} | {'yes' if e.unprunable else ''} |"
            )
        return "\n".join(lines)


def marked_count(gamma: float, analysed: int) -> int:
    """Node groups the top ``gamma`` fraction of ``analysed`` ones is, rounded up."""
    return min(analysed, math.ceil(gamma * analysed - 1e-9))


register_analysis("knowledge-distribution", KnowledgeDistribution)
