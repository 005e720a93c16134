"""``round_to`` with global selection: per-layer widths stay uneven but every kept count is a
multiple of it (llama.cpp's quantizer stores rows whose length is not a multiple of 32 in f16)."""

from __future__ import annotations

import pytest
import torch

import shear
from shear.kernels.allocation import ParamBudget
from shear.zoo import load_tiny_llama


@pytest.mark.parametrize("round_to", [1, 32])
def test_global_selection_keeps_multiples_of_round_to(round_to: int) -> None:
    model = load_tiny_llama().model
    ids = torch.randint(0, 2048, (1, 16), generator=torch.Generator().manual_seed(0))
    groups = [
        g for g in shear.trace(model, (ids,)).pruning_groups if g.prunable and g.kind in ("channel", "head")
    ]
    gen = torch.Generator().manual_seed(0)
    scores = {g.id: torch.rand(g.size, generator=gen) for g in groups}
    budget = ParamBudget(model, groups)
    counts = budget.counts(0.2, scores, selection="global", round_to=round_to)
    kept = [g.size - counts[g.id] for g in groups if g.kind == "channel"]
    assert len(set(kept)) > 1, "global selection leaves the layers uneven"
    assert abs(budget.reduction(counts) - 0.2) <= 0.005
    if round_to > 1:
        assert all(k % round_to == 0 for k in kept), kept
    else:
        assert any(k % 32 for k in kept)
