"""The ``taylor`` pass: LLM-Pruner's first-order structured baseline.

On calibration windows from ``ctx.data`` it takes the gradient of the next-token loss w.r.t. the
effective weights (LoRA folded in), scores each structure by ``Σ |W ⊙ G|`` over each member's
slices combined across members by ``aggregate`` (LLM-Pruner's element-wise first-order importance,
summed per group), and zeroes the lowest ``ratio`` of the structures of every prunable group (at
least one stays; ``round_to`` as in ``random``), of the group kinds in ``kinds``. ``erase`` then
removes them. ``taylor{kinds=[channel]}`` with one ratio is LLM-Pruner's MLP baseline: the same
count of channels cut from every MLP, whatever the model calls its projections. The scores go to
``ctx.get("taylor")`` (group id -> float ``[size]``) and the choice to ``ctx.get("taylor-pruned")``
(group id -> sorted indices).

Example:
    >>> Taylor(ratio=0.3).name                  # pipeline string: "taylor{ratio=0.3}"
    'taylor'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from shear.data.text import calibration_ids
from shear.errors import PipelineError
from shear.graph.groups import GROUP_KINDS, PruningGroup
from shear.graph.ir import Graph
from shear.kernels.allocation import structure_count, zero_to_budget
from shear.kernels.saliency import taylor_importance
from shear.model.target import layout_selection, round_steps, step_of
from shear.model.tensors import TensorTable, zero_structures
from shear.passes.base import Context, Pass, PassResult, register_pass
from shear.passes.options import require_number

__all__ = ["Taylor", "zero_lowest"]


def zero_lowest(
    model: torch.nn.Module,
    groups: tuple[PruningGroup, ...],
    scores: dict[int, torch.Tensor],
    ratio: float,
    round_to: int | dict[int, int] = 1,
) -> dict[int, torch.Tensor]:
    """Zero the lowest-scoring ``ratio`` of the structures of every scored prunable group; return the choice."""
    if not 0.0 <= ratio < 1.0:
        raise PipelineError(f"taylor: ratio must be in [0, 1), got {ratio}")
    table = TensorTable(model)
    chosen: dict[int, torch.Tensor] = {}
    for g in groups:
        if not g.prunable or g.id not in scores:
            continue
        n = min(structure_count(g.size, ratio, step_of(round_to, g.id)), g.size - g.min_keep)  # MoE: keep top-k
        idx = torch.sort(torch.argsort(scores[g.id], stable=True)[:n]).values
        zero_structures(table, g, idx)
        chosen[g.id] = idx
    return chosen


@register_pass
@dataclass(frozen=True)
class Taylor(Pass):
    """Zero the structures with the lowest first-order Taylor importance (LLM-Pruner), per group."""

    name: ClassVar[str] = "taylor"
    prunes: ClassVar[bool] = True
    requires: ClassVar[tuple[type, ...]] = (Graph,)
    ensures: ClassVar[tuple[str, ...]] = ("taylor", "taylor-pruned")

    ratio: float = 0.3
    """Fraction of each prunable group's structures to zero, in [0, 1)."""
    aggregate: Literal["sum", "mean", "max"] = "sum"
    """How the per-member importances of a structure combine."""
    samples: int = 16
    """Calibration windows."""
    seq_len: int = 128
    """Tokens per calibration window."""
    seed: int = 0
    """Seed of the calibration window choice."""
    batch_size: int = 4
    """Windows per forward/backward pass."""
    round_to: int = 0
    """Round each group's kept count to a multiple of this (e.g. 8 for fast kernels); 1 = exact ratio;
    0 = the run's target (:mod:`shear.model.target`; 1 without one)."""
    params: float = 0.0
    """When > 0: remove this share of the model's parameters instead (kv-head families and channels,
    counted as ``lhspg`` counts them), the same number of structures per group LHSPG would remove."""
    kinds: tuple[str, ...] = GROUP_KINDS
    """Group kinds to score and prune; ``kinds=[channel]`` prunes MLP channels only (LLM-Pruner's MLP
    baseline). With ``params`` the budget counts channels and kv-head families of these kinds."""

    def __post_init__(self) -> None:
        require_number("taylor", "ratio", self.ratio, low=0.0, high=1.0, open_high=True)
        require_number("taylor", "params", self.params, low=0.0, high=1.0, open_high=True)
        require_number("taylor", "round_to", self.round_to, integer=True, low=0)
        unknown = set(self.kinds) - set(GROUP_KINDS)
        if unknown or not self.kinds:
            raise PipelineError(f"taylor: kinds must be some of {list(GROUP_KINDS)}, got {list(self.kinds)}")
        if self.params > 0 and not {"channel", "head"} & set(self.kinds):
            raise PipelineError("taylor: a parameter budget (params=...) counts channels and heads; add one to kinds")

    def run(self, ctx: Context) -> PassResult:
        graph = ctx.get(Graph)
        ids = calibration_ids(ctx, self.name, self.samples, self.seq_len, self.seed)
        groups = tuple(g for g in graph.pruning_groups if g.kind in self.kinds)
        scores = taylor_importance(
            ctx.model,
            groups,
            ids,
            composites=graph.composites,
            aggregate=self.aggregate,
            batch_size=self.batch_size,
        )
        steps = round_steps(ctx.options.target, groups, self.round_to)
        if self.params > 0:
            budget_kinds = tuple(k for k in ("channel", "head") if k in self.kinds)
            selection, equal = layout_selection(ctx.options.target, "auto")
            chosen = zero_to_budget(
                ctx.model, groups, scores, self.params, kinds=budget_kinds, round_to=steps, selection=selection, equal=equal
            )
        else:
            chosen = zero_lowest(ctx.model, groups, scores, self.ratio, steps)
        ctx.put(scores, "taylor")
        ctx.put(chosen, "taylor-pruned")
        n = sum(int(v.numel()) for v in chosen.values())
        target = f"{self.params:.0%} of parameters" if self.params else f"ratio {self.ratio}"
        return PassResult(
            changed=n > 0,
            message=f"zeroed {n} structures in {len(chosen)} prunable groups by first-order Taylor ({target})",
            stats={"structures": n, "groups": len(chosen)},
        )
