"""The random pass: how many structures, which slices, determinism, errors."""

from __future__ import annotations

import pytest
import torch
from hand_groups import llama_groups, tiny_llama

from shear.errors import PipelineError
from shear.model.tensors import TensorTable, nonzero_structures
from shear.passes.base import PASS_REGISTRY, Context
from shear.passes.baselines.random import Random, zero_random


class _G:
    def __init__(self, groups: tuple) -> None:
        self.pruning_groups = groups


def test_zeroes_primary_slices_of_the_chosen_structures() -> None:
    model = tiny_llama()
    groups = tuple(llama_groups(model))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    chosen = zero_random(model, groups, 0.25, seed=0)
    table = TensorTable(model)
    for g in groups:
        assert chosen[g.id].numel() == min(round(0.25 * g.size), g.size - 1)
        alive = nonzero_structures(table, g)
        assert (~alive).nonzero().flatten().tolist() == chosen[g.id].tolist()
    # secondary slices (norm weights, consumer columns) are untouched
    assert torch.equal(model.model.norm.weight, before["model.norm.weight"])


def test_seeded_and_deterministic() -> None:
    groups = tuple(llama_groups(tiny_llama()))
    a = zero_random(tiny_llama(), groups, 0.3, seed=7)
    b = zero_random(tiny_llama(), groups, 0.3, seed=7)
    c = zero_random(tiny_llama(), groups, 0.3, seed=8)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_keeps_one_structure_per_group() -> None:
    model = tiny_llama()
    groups = tuple(llama_groups(model))
    chosen = zero_random(model, groups, 0.99, seed=0)
    assert all(chosen[g.id].numel() == g.size - 1 for g in groups)


def test_pass_protocol_and_registry() -> None:
    model = tiny_llama()
    ctx = Context(model=model)
    ctx.results["graph"] = _G(tuple(llama_groups(model)))
    result = Random(ratio=0.3, seed=0).run(ctx)
    assert result.changed and result.message.startswith("zeroed ")
    assert PASS_REGISTRY["random"] is Random and "random" in ctx.results


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_error_ratio_out_of_range(ratio: float) -> None:
    model = tiny_llama()
    with pytest.raises(PipelineError, match=r"random: ratio must be in \[0, 1\)"):
        zero_random(model, tuple(llama_groups(model)), ratio, seed=0)


def test_round_to_keeps_multiples() -> None:
    model = tiny_llama()
    groups = tuple(llama_groups(model))
    chosen = zero_random(model, groups, 0.3, seed=0, round_to=8)
    for g in groups:
        kept = g.size - chosen[g.id].numel()
        assert kept % 8 == 0 or g.size < 8


def test_random_kinds_keeps_the_residual_width() -> None:
    from models import build

    import shear

    model, x = build("llama")
    small = shear.compile(model, "discover-groups,random{ratio=0.5,kinds=[channel,head]},erase", example_inputs=x)
    assert small.config.hidden_size == model.config.hidden_size
    assert small.model.embed_tokens.weight.shape == model.model.embed_tokens.weight.shape
    assert small.shear_report.params_after < small.shear_report.params_before
