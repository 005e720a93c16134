"""Knowledge distribution's protected groups under a ``protect_cap``: whole while the others keep
enough, then at most ``cap`` times the others' kept share, the target still met."""

from __future__ import annotations

import pytest
import torch

import shear
from shear.errors import KernelError
from shear.kernels.allocation import ParamBudget
from shear.zoo import load_tiny_llama


@pytest.fixture(scope="module")
def mlp_budget() -> tuple[ParamBudget, list[int], dict[int, torch.Tensor]]:
    model = load_tiny_llama().model
    graph = shear.trace(model, (torch.arange(16).view(1, 16),))
    groups = [g for g in graph.pruning_groups if g.prunable and g.kind == "channel"]
    assert len(groups) == 4  # one MLP channel group per layer
    gen = torch.Generator().manual_seed(0)
    return ParamBudget(model, groups), [g.id for g in groups], {g.id: torch.rand(g.size, generator=gen) for g in groups}


def _kept(budget: ParamBudget, counts: dict[int, int], gid: int) -> float:
    return 1 - counts.get(gid, 0) / budget.groups[gid].size


@pytest.mark.parametrize("target", [0.1, 0.35])
def test_cap_binds_only_when_the_others_keep_too_little(mlp_budget, target: float) -> None:
    budget, ids, scores = mlp_budget
    whole = budget.counts(target, scores, eligible=ids, protected=[ids[0]])  # the paper: kept whole
    capped = budget.counts(target, scores, eligible=ids, protected=[ids[0]], protect_cap=1.5)
    for counts in (whole, capped):
        assert abs(budget.reduction(counts) - target) <= 0.005
    assert whole.get(ids[0], 0) == 0
    others = _kept(budget, whole, ids[1])
    if others * 1.5 >= 1:  # the others keep two thirds or more: the cap does not bind
        assert target == 0.1 and capped == whole
    else:  # it binds: the protected group keeps 1.5x the others' share, the others keep more than before
        assert capped[ids[0]] > 0
        assert _kept(budget, capped, ids[0]) == pytest.approx(1.5 * _kept(budget, capped, ids[1]), abs=2 / budget.groups[ids[0]].size)
        assert _kept(budget, capped, ids[1]) > others


def test_cap_is_ignored_by_global_selection_and_checked(mlp_budget) -> None:
    budget, ids, scores = mlp_budget
    counts = budget.counts(0.3, scores, eligible=ids, selection="global", protected=[ids[0]], protect_cap=1.5)
    assert counts.get(ids[0], 0) == 0 and abs(budget.reduction(counts) - 0.3) <= 0.005
    with pytest.raises(KernelError, match="protect_cap must be at least 1"):
        budget.counts(0.3, scores, eligible=ids, protected=[ids[0]], protect_cap=0.5)


def test_lhspg_rejects_a_cap_below_one() -> None:
    from shear.errors import PipelineError
    from shear.passes.lorashear.lhspg import LHSPG

    with pytest.raises(PipelineError, match="protect_cap must be at least 1"):
        LHSPG(protect_cap=0.9)
