"""How many structures of each group ``shear plan`` and ``shear stream-prune`` remove.

``--ratio`` means the same in every command: the share of the **parameters** removed, as
``shear prune --ratio`` and ``lhspg{ratio=...}`` remove it (:class:`~shear.kernels.allocation.ParamBudget`
over the groups of ``kinds``, MLP channels by default, in the target's width steps and layout).
``--group-ratio`` is the other meaning, explicit: the share of **every** prunable group's structures
(``round(ratio * size)`` each, as ``magnitude{ratio=...}`` prunes). Both work on shapes alone, so a
meta-device skeleton of a 405B config is counted without a weight.

Which structures go is not decided here (:mod:`shear.scale.scores` picks the lowest-norm ones); the
parameter count after erasure depends only on the counts.

Example:
    >>> counts, text = structure_counts(src, ratio=0.2, target=None)            # doctest: +SKIP
    >>> text                                                                     # doctest: +SKIP
    'ratio 0.2: share of the parameters, from the channel groups (as shear prune --ratio 0.2)'
"""

from __future__ import annotations

from collections.abc import Sequence

from shear.errors import PipelineError
from shear.graph.groups import GROUP_KINDS, PruningGroup
from shear.kernels.allocation import ParamBudget, structure_count
from shear.model.target import Target, layout_selection, round_steps, step_of
from shear.passes.options import require_number

__all__ = ["structure_counts", "check_ratios", "DEFAULT_KINDS"]

DEFAULT_KINDS: tuple[str, ...] = ("channel",)
"""Group kinds a parameter ratio prunes by default: those ``lhspg`` (``shear prune``) prunes."""


def check_ratios(
    where: str, ratio: float | None, group_ratio: float | None, kinds: Sequence[str] | None
) -> tuple[float | None, float | None, tuple[str, ...]]:
    """``(ratio, group_ratio, kinds)`` checked: one of the two ratios (``ratio`` 0.2 when neither is
    given), each in (0, 1), and known group kinds (default: :data:`DEFAULT_KINDS` for ``ratio``,
    every kind for ``group_ratio``). A :class:`~shear.errors.PipelineError` names the fix."""
    if ratio is not None and group_ratio is not None:
        raise PipelineError(
            f"{where}: give ratio (share of the parameters) or group_ratio (share of every group), not both"
        )
    if ratio is None and group_ratio is None:
        ratio = 0.2
    for name, value in (("ratio", ratio), ("group_ratio", group_ratio)):
        if value is not None:
            require_number(where, name, value, low=0.0, high=1.0, open_low=True, open_high=True)
    chosen = tuple(kinds) if kinds else (DEFAULT_KINDS if ratio is not None else GROUP_KINDS)
    unknown = sorted(set(chosen) - set(GROUP_KINDS))
    if unknown:
        raise PipelineError(f"{where}: unknown group kinds {unknown}; use some of {', '.join(GROUP_KINDS)} (e.g. channel,head)")
    return ratio, group_ratio, chosen


def structure_counts(
    model: object,
    groups: Sequence[PruningGroup],
    *,
    ratio: float | None,
    group_ratio: float | None = None,
    kinds: Sequence[str] = DEFAULT_KINDS,
    target: Target | None = None,
    round_to: int = 0,
    tolerance: float = 0.005,
) -> dict[int, int]:
    """Group id -> structures to remove, for every prunable group of ``kinds`` (checked ratios:
    :func:`check_ratios`). ``round_to`` > 0 overrides the target's steps."""
    prunable = [g for g in groups if g.prunable and g.kind in kinds]
    steps = round_steps(target, prunable, round_to)
    if group_ratio is not None:
        return {g.id: structure_count(g.size, group_ratio, step_of(steps, g.id)) for g in prunable}
    if not prunable:
        raise PipelineError(f"no prunable groups of kinds {list(kinds)}; allow more kinds (e.g. channel,head)")
    assert ratio is not None
    selection, equal = layout_selection(target, "auto")
    budget = ParamBudget(model, prunable)  # type: ignore[arg-type]
    counts = budget.counts(ratio, {}, selection=selection, round_to=steps, tolerance=tolerance, equal=equal)
    return {g.id: counts.get(g.id, 0) for g in prunable}
