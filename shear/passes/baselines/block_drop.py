"""The ``block-drop`` pass: one-shot depth pruning, the baseline for removing whole blocks.

Each attention and MLP branch of each decoder layer is a ``block`` structure
(:mod:`shear.model.branches`, added to the graph here). On calibration windows from ``ctx.data`` the
pass measures every block's saliency (:mod:`shear.kernels.block_saliency`: the loss increase when it
is skipped, or how far it moves the residual stream), then zeroes the output projections of the
lowest-ranked blocks, by saliency per parameter, until the removed share of parameters is nearest
``ratio`` (:func:`~shear.kernels.depth_budget.choose_blocks`, counted by the same
:class:`~shear.kernels.allocation.ParamBudget` as every pass). ``erase`` then removes those branches,
and layers left with none. ``layers=true`` removes whole layers only (ShortGPT): every layer stays
identical and stock ``from_pretrained`` loads the result. Scores go to ``ctx.get("block-drop")``
(group id -> ``[1]``).

Example:
    >>> BlockDrop(ratio=0.2).name      # pipeline string: "block-drop{ratio=0.2,layers=true}"
    'block-drop'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from shear.data.text import calibration_ids
from shear.graph.ir import Graph
from shear.kernels.allocation import ParamBudget
from shear.kernels.block_saliency import block_saliency
from shear.kernels.depth_budget import choose_blocks
from shear.model.branches import branch_of, with_block_groups
from shear.model.tensors import TensorTable, zero_structures
from shear.passes.base import Context, Pass, PassResult, register_pass
from shear.passes.options import require_number

__all__ = ["BlockDrop"]


@register_pass
@dataclass(frozen=True)
class BlockDrop(Pass):
    """Zero the least salient attention/MLP blocks (or whole layers) up to a share of the parameters."""

    name: ClassVar[str] = "block-drop"
    prunes: ClassVar[bool] = True
    kinds: ClassVar[tuple[str, ...]] = ("block",)
    requires: ClassVar[tuple[type, ...]] = (Graph,)
    ensures: ClassVar[tuple[str, ...]] = ("block-drop",)

    ratio: float = 0.2
    """Share of the model's parameters (tied once, adapters not counted) to remove; blocks come whole,
    so the result is the nearest reachable share."""
    layers: bool = False
    """Remove whole layers only (both blocks of a layer): the result keeps identical layers and loads
    in stock ``from_pretrained``."""
    measure: Literal["loss", "residual"] = "loss"
    """Block saliency: ``loss`` (the loss increase when the block is skipped, one forward pass per
    block) or ``residual`` (how far the block moves the residual stream, one pass for all)."""
    samples: int = 8
    """Calibration windows."""
    seq_len: int = 128
    """Tokens per calibration window."""
    batch_size: int = 4
    """Windows per forward pass."""
    seed: int = 0
    """Seed of the calibration window choice."""

    def __post_init__(self) -> None:
        require_number(self.name, "ratio", self.ratio, low=0.0, high=1.0, open_low=True, open_high=True)
        for opt in ("samples", "seq_len", "batch_size"):
            require_number(self.name, opt, getattr(self, opt), integer=True, low=1)

    def run(self, ctx: Context) -> PassResult:
        graph = with_block_groups(ctx.get(Graph), ctx.model)
        ctx.put(graph)
        blocks = [g for g in graph.prunable_groups if g.kind == "block"]
        branches = {g.id: branch_of(ctx.model, g) for g in blocks}
        ids = calibration_ids(ctx, self.name, self.samples, self.seq_len, self.seed)
        with ctx.progress(total=len(blocks) if self.measure == "loss" else None, description=self.name) as bar:
            scores = block_saliency(
                ctx.model, {g: (b.module, b.norm) for g, b in branches.items()}, ids,
                measure=self.measure, batch_size=self.batch_size, progress=bar.advance,
            )
        budget = ParamBudget(ctx.model, blocks)
        layers = {g: b.layer for g, b in branches.items()} if self.layers else None
        chosen = choose_blocks(budget, self.ratio, scores, [g.id for g in blocks], layers=layers)
        table = TensorTable(ctx.model)
        by_id = {g.id: g for g in blocks}
        for gid in chosen:
            zero_structures(table, by_id[gid], torch.zeros(1, dtype=torch.long))
        ctx.put(scores, self.name)
        reduction = budget.reduction(chosen)
        what = sorted(f"{branches[g].layer}.{branches[g].kind}" for g in chosen)
        return PassResult(
            changed=bool(chosen),
            message=(
                f"zeroed {len(chosen)} of {len(blocks)} blocks by {self.measure} saliency: -{reduction:.1%} of "
                f"{budget.total:,} parameters once erased (target {self.ratio:.0%}); {', '.join(what) or 'none'}"
            ),
            stats={"blocks": len(chosen), "reduction": reduction, "params_after": budget.params_after(chosen)},
        )
