"""Parameter budgets over whole blocks, alone or together with widths (``kinds=[channel,block]``).

A ``block`` group (:mod:`shear.model.branches`) has one structure whose members cover every tensor of
its branch whole, so :class:`~shear.kernels.allocation.ParamBudget` counts a removed block exactly:
its tensors drop to zero size whatever widths were also cut from them. What differs from widths is
the choice, since a block is removed whole or not at all:

* :func:`choose_blocks` (depth only): rank the removal *units* (a block, or a whole layer's blocks
  with ``whole_layers``: every layer then stays identical, so stock loaders rebuild the model) by
  saliency per parameter, lowest first, and take each unit that brings the removed share closer to
  the target. Blocks come in a few sizes, so the result is the nearest reachable share, not within
  a tolerance.
* :func:`joint_counts` (depth and width under one budget): for ``j`` in a few evenly spaced counts of
  the lowest-ranked units that fit the budget (0, the width-only plan, among them), the widths outside the chosen blocks
  take the rest of the budget (``width_counts``, the caller's ``ParamBudget.counts``), and
  ``evaluate`` measures each candidate (the calibration loss of the model with those structures
  zeroed); the lowest wins. The split between depth and width is thus measured, never guessed, and
  the width-only plan is one of the candidates.

Example:
    >>> budget = ParamBudget(model, graph.prunable_groups)                          # doctest: +SKIP
    >>> counts = choose_blocks(budget, 0.2, block_scores, [g.id for g in blocks])   # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from shear.errors import KernelError
from shear.graph.groups import PruningGroup
from shear.kernels.allocation import ParamBudget
from shear.model.tensors import TensorTable

__all__ = ["DEPTH_CANDIDATES", "DepthTrial", "choose_blocks", "joint_counts", "ranked_units", "zeroed_for_trial"]

DEPTH_CANDIDATES = 6
"""How many depth/width splits :func:`joint_counts` measures (evenly spaced block counts, 0 included)."""


@dataclass(frozen=True)
class DepthTrial:
    """One candidate split of a joint budget and what it measured."""

    blocks: int
    """Blocks removed."""
    depth_share: float
    """Share of the model's parameters the removed blocks hold."""
    loss: float
    """What ``evaluate`` returned (the calibration loss of the one-shot candidate)."""


def ranked_units(
    budget: ParamBudget, scores: Mapping[int, torch.Tensor], blocks: Sequence[int],
    layers: Mapping[int, int] | None = None,
) -> list[list[int]]:
    """Removal units, cheapest first: each block alone, or (``layers``: block id -> layer index) the
    blocks of one layer together; ranked by summed saliency per parameter removed."""
    units: dict[int, list[int]] = {}
    for gid in blocks:
        units.setdefault(layers[gid] if layers is not None else gid, []).append(gid)

    def key(unit: list[int]) -> float:
        removed = budget.total - budget.params_after({g: 1 for g in unit})
        return sum(float(scores[g].float().sum()) for g in unit) / max(removed, 1)

    return sorted(units.values(), key=key)


def choose_blocks(
    budget: ParamBudget, target: float, scores: Mapping[int, torch.Tensor], blocks: Sequence[int],
    *, layers: Mapping[int, int] | None = None, keep_layers: int = 1,
) -> dict[int, int]:
    """Blocks to remove (group id -> 1) whose removed share is nearest ``target``: units in
    :func:`ranked_units` order, each taken when it brings the share closer. At least ``keep_layers``
    whole units stay when ``layers`` groups blocks into layers."""
    if not 0.0 < target < 1.0:
        raise KernelError(f"target ratio must be in (0, 1), got {target}")
    units = ranked_units(budget, scores, blocks, layers)
    if not units:
        raise KernelError("no prunable blocks are eligible; nothing can reach the target")
    if layers is not None:
        units = units[: max(len(units) - keep_layers, 0)]
    chosen: dict[int, int] = {}
    for unit in units:
        trial = {**chosen, **{g: 1 for g in unit}}
        if abs(budget.reduction(trial) - target) < abs(budget.reduction(chosen) - target):
            chosen = trial
    return chosen


@contextmanager
def zeroed_for_trial(model: nn.Module, groups: Mapping[int, PruningGroup], chosen: Mapping[int, torch.Tensor]) -> Iterator[None]:
    """Within the block, the primary slices of structures ``chosen[g]`` of each group are zero; they are
    put back afterwards (bit for bit)."""
    table = TensorTable(model)
    saved: list[tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]] = []
    with torch.no_grad():
        for gid, idx in chosen.items():
            if len(idx) == 0:
                continue
            for m in groups[gid].primary:
                t = table.get(m.param)
                flat = m.positions[torch.as_tensor(idx, dtype=torch.long)].flatten().to(t.device)
                saved.append((t, m.dim, flat, t.index_select(m.dim, flat).clone()))
        for t, dim, flat, _ in saved:
            t.index_fill_(dim, flat, 0)
    try:
        yield
    finally:
        with torch.no_grad():
            for t, dim, flat, old in reversed(saved):
                t.index_copy_(dim, flat, old)


def joint_counts(
    budget: ParamBudget,
    target: float,
    block_scores: Mapping[int, torch.Tensor],
    blocks: Sequence[int],
    width_counts: Callable[[float, list[int]], dict[int, int]],
    inner: Mapping[int, Sequence[int]],
    widths: Sequence[int],
    evaluate: Callable[[dict[int, int]], float],
    *,
    layers: Mapping[int, int] | None = None,
    tolerance: float = 0.005,
    candidates: int = DEPTH_CANDIDATES,
) -> tuple[dict[int, int], list[DepthTrial]]:
    """One budget over blocks and widths: the measured best of a few depth/width splits.

    ``width_counts(t, eligible)`` gives width counts removing the share ``t`` from the groups
    ``eligible`` (a :meth:`ParamBudget.counts` with the caller's options); ``inner[b]`` lists the width
    groups inside block ``b`` (they go with it and take no budget); ``evaluate(counts)`` measures a
    candidate, lower is better. Returns the counts of the winner and every trial, in order.
    """
    if not 0.0 < target < 1.0:
        raise KernelError(f"target ratio must be in (0, 1), got {target}")
    units = ranked_units(budget, block_scores, blocks, layers)
    if layers is not None:
        units = units[:-1]  # one layer stays
    prefix: list[dict[int, int]] = [{}]
    for unit in units:
        step = {**prefix[-1], **{g: 1 for g in unit}}
        if budget.reduction(step) <= target + tolerance:  # a unit too large is skipped, a smaller one may fit
            prefix.append(step)
    picks = sorted({round(i * (len(prefix) - 1) / max(candidates - 1, 1)) for i in range(candidates)})
    trials: list[DepthTrial] = []
    best: tuple[float, dict[int, int]] | None = None
    for j in picks:
        depth = prefix[j]
        share = budget.reduction(depth)
        gone = {w for b in depth for w in inner.get(b, ())}
        rest = target - share
        if rest > tolerance:
            try:
                counts = {**width_counts(rest, [w for w in widths if w not in gone]), **depth}
            except KernelError:
                continue  # the widths left cannot take the rest of the budget
        else:
            counts = dict(depth)
        loss = evaluate(counts)
        trials.append(DepthTrial(len(depth), share, loss))
        if best is None or loss < best[0]:
            best = (loss, counts)
    if best is None:
        raise KernelError(
            f"no split of the {target:.1%} budget between {len(blocks)} blocks and {len(widths)} width groups is "
            "reachable; lower the ratio or allow more group kinds"
        )
    return best[1], trials
