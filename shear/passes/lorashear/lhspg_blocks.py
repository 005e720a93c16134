"""LHSPG over whole blocks: ``lhspg{kinds=[block]}`` and the joint ``lhspg{kinds=[channel,block]}``.

The paper's progressive idea applied to depth. A block (an attention or MLP branch,
:mod:`shear.model.branches`) is one structure whose primary slices are its output projection's rows
(and ``lora_B`` rows), so LHSPG's decay (:class:`~shear.kernels.lhspg.StructureViews`) shrinks the
branch's whole contribution linearly to exactly zero over a period while LoRA moves its knowledge
into the rest of the model. What this module adds to the pass:

* the block groups, added to the graph (and to the context, so ``erase`` sees them);
* block saliency (:func:`~shear.kernels.block_saliency.block_saliency`: the calibration loss
  increase when the block is skipped), next to the width saliency of the other kinds;
* one parameter budget: blocks alone by :func:`~shear.kernels.depth_budget.choose_blocks`, blocks
  and widths by :func:`~shear.kernels.depth_budget.joint_counts`, which measures a few depth/width
  splits one-shot and keeps the best (its trials go to ``ctx.get("lhspg-depth")``); ``selection``
  ``shared`` (a stock ``from_pretrained`` target) removes whole layers only;
* the schedule: the chosen blocks form one pool that moves to the redundant set progressively, the
  lowest-scored of the pool first, ``round(B * (p + 1) / P)`` of the ``B`` blocks by period ``p``.

Example (``shear.compile(model, "lhspg{ratio=0.2,kinds=[channel,block]},erase", data=data)``):
    >>> check_block_kinds(("channel", "block"))
    >>> check_block_kinds(("block", "residual"))
    Traceback (most recent call last):
    ...
    shear.errors.PipelineError: lhspg: kinds=[block] with residual is not supported: ...
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from shear.data.text import TextData
from shear.errors import PipelineError
from shear.graph.ir import Graph
from shear.kernels.allocation import ParamBudget
from shear.kernels.block_saliency import block_saliency, calibration_loss
from shear.kernels.depth_budget import DepthTrial, choose_blocks, joint_counts, zeroed_for_trial
from shear.model.branches import Branch, branch_of, inner_groups, with_block_groups
from shear.passes.base import Context, register_analysis

__all__ = ["DepthChoice", "DepthPlan", "check_block_kinds", "depth_plan"]


@dataclass
class DepthChoice:
    """What LHSPG chose for the blocks: which, and (joint budgets) the depth/width splits it measured."""

    blocks: list[str] = field(default_factory=list)
    """Names of the block groups removed."""
    trials: list[DepthTrial] = field(default_factory=list)


register_analysis("lhspg-depth", DepthChoice)


@dataclass
class DepthPlan:
    """The block side of one LHSPG run (see the module docstring)."""

    graph: Graph
    branches: dict[int, Branch]
    """Block group id -> its branch."""
    ids: torch.Tensor
    """Calibration windows of the block saliency and of the joint budget's trials."""
    choice: DepthChoice = field(default_factory=DepthChoice)
    scored: list[int] | None = None
    """Blocks scored from now on: all of them until the budget chose, then the chosen ones (the
    schedule only orders those), so a period's rescoring costs a forward pass per chosen block."""

    def scorer(self, width_score: Callable[[torch.nn.Module], dict[int, torch.Tensor]] | None) -> Callable[[torch.nn.Module], dict[int, torch.Tensor]]:
        """``model -> scores``: ``width_score``'s (None when only blocks are pruned) and the blocks'."""
        pairs = {g: (b.module, b.norm) for g, b in self.branches.items()}

        def score(model: torch.nn.Module) -> dict[int, torch.Tensor]:
            out = width_score(model) if width_score is not None else {}
            todo = pairs if self.scored is None else {g: pairs[g] for g in self.scored}
            if todo:
                out.update(block_saliency(model, todo, self.ids))
            return out

        return score

    def allocator(self, ctx: Context, budget: ParamBudget) -> Callable[..., dict[int, int]]:
        """A drop-in for ``budget.counts`` (same arguments) that also places blocks."""
        groups = {g.id: g for g in self.graph.pruning_groups}

        def allocate(target: float, scores: dict[int, torch.Tensor], *, eligible: list[int], selection: str, **kw: Any) -> dict[int, int]:
            blocks = [g for g in eligible if g in self.branches]
            widths = [g for g in eligible if g not in self.branches]
            layers = {g: self.branches[g].layer for g in blocks} if selection == "shared" else None
            if not widths:
                counts = choose_blocks(budget, target, scores, blocks, layers=layers)
            else:
                inner = {b: inner_groups(groups[b], list(groups.values())) for b in blocks}

                def widths_for(share: float, ids: list[int]) -> dict[int, int]:
                    return budget.counts(share, scores, eligible=ids, selection=selection, **kw)

                def evaluate(counts: dict[int, int]) -> float:
                    chosen = {g: scores[g].float().argsort()[:n] for g, n in counts.items() if n}
                    with zeroed_for_trial(ctx.model, groups, chosen):
                        return calibration_loss(ctx.model, self.ids)

                counts, self.choice.trials = joint_counts(
                    budget, target, scores, blocks, widths_for, inner, widths, evaluate, layers=layers,
                    tolerance=float(kw.get("tolerance", 0.005)),
                )
            self.scored = [g for g in counts if g in self.branches and counts[g]]
            self.choice.blocks = [groups[g].name for g in self.scored]
            ctx.put(self.choice)
            return counts

        return allocate

    def pools(self, counts: dict[int, int]) -> list[list[int]]:
        """The chosen blocks as one pool for :class:`~shear.passes.lorashear.lhspg.LhspgHook`."""
        pool = [g for g in counts if g in self.branches and counts[g]]
        return [pool] if pool else []


def check_block_kinds(kinds: tuple[str, ...]) -> None:
    """Refuse ``block`` together with ``residual`` (:class:`~shear.errors.PipelineError`, when the pass is built)."""
    if "block" in kinds and "residual" in kinds:
        raise PipelineError(
            "lhspg: kinds=[block] with residual is not supported: a removed block's projections also carry residual "
            "columns, so one budget would count them twice; prune blocks with channel and head"
        )


def depth_plan(ctx: Context, graph: Graph, kinds: tuple[str, ...], data: TextData, n: int, seq_len: int, seed: int) -> DepthPlan | None:
    """The block side of an LHSPG run with ``block`` in ``kinds`` (None without), its block groups
    added to ``graph`` and to ``ctx``; ``n`` calibration windows of ``seq_len`` tokens."""
    if "block" not in kinds:
        return None
    check_block_kinds(kinds)
    graph = with_block_groups(graph, ctx.model)
    ctx.put(graph)
    branches = {g.id: branch_of(ctx.model, g) for g in graph.prunable_groups if g.kind == "block"}
    return DepthPlan(graph, branches, data.calibration(n, seq_len, seed=seed))
