"""The ``discover-groups`` pass (LoRAShear Algorithm 2): trace the model and build the IR.

Stores the :class:`shear.graph.Graph` in the context (``ctx.graph``, ``ctx.get(Graph)``); every
pass that needs pruning groups declares ``requires = (Graph,)``. The pass manager runs it again
when a pass reports that the graph no longer describes the model (LoRA wrapping, erasure).

Example:
    >>> import torch
    >>> from shear.passes.base import Context
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> ctx = Context(model=net, example_inputs=torch.randn(1, 4))
    >>> DiscoverGroups().run(ctx).message
    '1 prunable pruning groups (8 structures) of 3; 0 LoRA composites'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from shear.errors import GraphError
from shear.graph.ir import Graph
from shear.graph.trace import trace
from shear.passes.base import Context, Pass, PassResult, register_pass

__all__ = ["DiscoverGroups"]


@register_pass
@dataclass(frozen=True)
class DiscoverGroups(Pass):
    """Trace the model into node groups, LoRA composites, overlaps and pruning groups."""

    name: ClassVar[str] = "discover-groups"
    reads_weights: ClassVar[bool] = False
    ensures: ClassVar[tuple[type, ...]] = (Graph,)

    require_prunable: bool = False
    """Raise if the model has no prunable structure (instead of a warning)."""

    def run(self, ctx: Context) -> PassResult:
        graph = trace(ctx.model, ctx.example_inputs)
        ctx.put(graph)
        n = len(graph.prunable_groups)
        if n == 0:
            msg = (
                f"{graph.model_class} has no prunable structure: every channel space is pinned "
                "(see print(graph) for the reasons per group)"
            )
            if self.require_prunable:
                raise GraphError(msg)
            ctx.warn(msg)
        for d in graph.diagnostics:
            ctx.warn(f"[{d.kind}] {d.module or '<root>'}: {d.message}")
        return PassResult(
            changed=False,
            message=(
                f"{n} prunable pruning groups ({graph.num_structures()} structures) of "
                f"{len(graph.pruning_groups)}; {len(graph.composites)} LoRA composites"
            ),
            stats={"groups": len(graph.pruning_groups), "prunable": n, "structures": graph.num_structures()},
        )
