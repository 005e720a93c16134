"""Which positions of each graph value's dimensions survive erasure: what size rules read.

A size rule (the ``size`` facet of :func:`shear.graph.ops.specs.register_op`) gets a :class:`LiveDims`
and one graph node, and rewrites the node's size constants from the surviving positions.

Example:
    >>> import torch
    >>> from shear.graph.analysis import DimAnalysis
    >>> a = DimAnalysis()
    >>> sp = a.spaces.new(4, "x")
    >>> live = LiveDims(a, {sp: torch.tensor([False, True, False, False])})   # structure 1 erased
    >>> live.keep_space(sp).tolist()
    [True, False, True, True]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from shear.errors import GraphError
from shear.graph.analysis import DimAnalysis, Dims

__all__ = ["LiveDims"]


@dataclass
class LiveDims:
    """Which positions of each graph value's dimensions survive erasure.

    ``dead`` maps a leaf space to a bool mask over its structures (True: erased). :meth:`keep` gives
    a bool mask over the positions of one dimension of a node's value (``None`` when nothing dies).
    """

    analysis: DimAnalysis
    dead: dict[int, torch.Tensor]
    symbols: dict[torch.fx.Node, Any] = field(default_factory=dict)
    """Graph node of a computed size (``bsz * 4``) -> its symbolic value (``4*s0``), read before the
    analysis ran: reading sizes as ints specialises the program's symbols to the example's sizes."""
    _cache: dict[int, torch.Tensor | None] = field(default_factory=dict)

    def keep_space(self, sp: int | None) -> torch.Tensor | None:
        if sp is None:
            return None
        root = self.analysis.spaces.find(sp)
        if root not in self._cache:
            keep = torch.ones(self.analysis.spaces.size(root), dtype=torch.bool)
            for leaf, occs in self.analysis.spaces.expand(root).items():
                dead = self.dead.get(leaf)
                if dead is None or not bool(dead.any()):
                    continue
                for occ in occs:
                    covered = occ >= 0
                    keep[covered] &= ~dead[occ[covered]]
            self._cache[root] = None if bool(keep.all()) else keep
        return self._cache[root]

    def dims(self, node: Any, index: int | None = None) -> Dims:
        value = self.analysis.values.get(node) if isinstance(node, torch.fx.Node) else None
        if not value:
            return []
        if isinstance(value[0], list):
            if index is None:
                raise GraphError(f"node {node.name} is a tuple; name the element")
            return list(value[index])
        return list(value)

    def keep(self, node: Any, dim: int, index: int | None = None) -> torch.Tensor | None:
        dims = self.dims(node, index)
        if not -len(dims) <= dim < len(dims):
            return None
        return self.keep_space(dims[dim])

    def size(self, node: Any, dim: int, old: int, index: int | None = None) -> int:
        """The new size of a dimension whose old size is ``old``."""
        keep = self.keep(node, dim, index)
        return old if keep is None else int(keep.sum())
