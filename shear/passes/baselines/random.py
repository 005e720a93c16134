"""The ``random`` pass: zero a random fraction of the structures of every prunable group.

The sanity baseline (any pruner should beat it) and the driver of the erasure fuzz tests: it
zeroes the *primary* slices (producer rows, bias, lora_B rows) of ``round(ratio * size)``
structures per group, chosen with a seeded generator; ``erase`` then removes exactly those.
At least one structure of each group stays.

Example:
    >>> p = Random(ratio=0.3, seed=0)                      # or the pipeline string "random{ratio=0.3,seed=0}"
    >>> p.name
    'random'
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch

from shear.errors import PipelineError
from shear.graph.groups import GROUP_KINDS, PruningGroup
from shear.graph.ir import Graph
from shear.kernels.allocation import structure_count
from shear.model.target import round_steps, step_of
from shear.model.tensors import TensorTable, zero_structures
from shear.passes.base import Context, Pass, PassResult, register_pass
from shear.passes.options import require_number

__all__ = ["Random", "choose_structures", "zero_random", "MAX_SEED"]

MAX_SEED = 2**64 - 1
"""The largest seed a torch generator takes."""


def _check(ratio: object, seed: object, round_to: object, kinds: tuple[str, ...] | None) -> None:
    """Options that cannot work, refused before any weight is touched (names the option and the fix)."""
    require_number("random", "ratio", ratio, low=0.0, high=1.0, open_high=True)
    require_number("random", "seed", seed, integer=True, low=0, high=MAX_SEED)
    if not isinstance(round_to, Mapping):
        require_number("random", "round_to", round_to, integer=True, low=0)
    if kinds is not None:
        unknown = sorted(set(kinds) - set(GROUP_KINDS))
        if unknown or not kinds:
            raise PipelineError(
                f"random: kinds {list(kinds)} {'names unknown group kinds ' + str(unknown) if unknown else 'is empty'}; "
                f"use some of {', '.join(GROUP_KINDS)} (e.g. kinds=[channel,head])"
            )


def choose_structures(group: PruningGroup, ratio: float, generator: torch.Generator, round_to: int = 1) -> torch.Tensor:
    """Sorted indices of ``round(ratio * size)`` random structures of ``group`` (at most size -
    ``group.min_keep``: an MoE layer keeps its router's top-k experts).

    With ``round_to > 1`` the number of structures *kept* is rounded to a multiple of it (when the
    group has at least that many), so that pruned widths stay friendly to vectorised kernels.
    """
    n = min(structure_count(group.size, ratio, round_to), group.size - group.min_keep)
    if n <= 0:
        return torch.zeros(0, dtype=torch.long)
    return torch.randperm(group.size, generator=generator)[:n].sort().values


def zero_random(
    model: torch.nn.Module,
    groups: tuple[PruningGroup, ...],
    ratio: float,
    seed: int,
    round_to: int | Mapping[int, int] = 1,
    kinds: tuple[str, ...] | None = None,
) -> dict[int, torch.Tensor]:
    """Zero ``ratio`` of the structures of every prunable group of ``model`` in place; return the choice.
    ``round_to`` may give each group id its own step (:func:`shear.model.target.round_steps`)."""
    _check(ratio, seed, round_to, kinds)
    gen = torch.Generator().manual_seed(seed)
    table = TensorTable(model)
    chosen: dict[int, torch.Tensor] = {}
    for g in groups:
        if not g.prunable or (kinds is not None and g.kind not in kinds):
            continue
        idx = choose_structures(g, ratio, gen, step_of(round_to, g.id))
        zero_structures(table, g, idx)
        chosen[g.id] = idx
    return chosen


@register_pass
@dataclass(frozen=True)
class Random(Pass):
    """Zero a random ``ratio`` of the structures of every prunable pruning group."""

    name: ClassVar[str] = "random"
    prunes: ClassVar[bool] = True
    requires: ClassVar[tuple[type, ...]] = (Graph,)
    ensures: ClassVar[tuple[str, ...]] = ("random",)

    ratio: float = 0.3
    """Fraction of each group's structures to zero, in [0, 1)."""
    seed: int = 0
    """Seed of the generator that picks the structures."""
    round_to: int = 0
    """Round each group's kept count to a multiple of this (e.g. 8 for fast kernels); 1 = exact ratio;
    0 = the run's target (:mod:`shear.model.target`; 1 without one)."""
    kinds: tuple[str, ...] = GROUP_KINDS
    """Group kinds to prune; ``kinds=[channel,head]`` keeps the residual width."""

    def __post_init__(self) -> None:
        _check(self.ratio, self.seed, self.round_to, self.kinds)

    def run(self, ctx: Context) -> PassResult:
        groups = ctx.get(Graph).pruning_groups
        steps = round_steps(ctx.options.target, groups, self.round_to)
        chosen = zero_random(ctx.model, groups, self.ratio, self.seed, steps, self.kinds)
        ctx.put(chosen, "random")
        n = sum(int(v.numel()) for v in chosen.values())
        return PassResult(
            changed=n > 0,
            message=f"zeroed {n} structures in {len(chosen)} prunable groups (ratio {self.ratio}, seed {self.seed})",
            stats={"structures": n, "groups": len(chosen)},
        )
