"""Codegen against hand-written pruning groups: exactness, norm rescaling, overlaps, attributes, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from hand_groups import llama_groups, tiny_llama
from peft import LoraConfig, get_peft_model
from torch import nn

from shear.codegen.module_rules import RmsNormSpec, find_rms_norm, update_module_attributes
from shear.codegen.module_tree import apply_plan, codegen, plan_erasure
from shear.errors import GraphError, VerifyError
from shear.graph.groups import Member, NormRescale, PruningGroup, Role
from shear.passes.baselines.random import zero_random

LORA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lora(model: nn.Module) -> nn.Module:
    model = get_peft_model(model, LoraConfig(r=8, target_modules=LORA, lora_dropout=0.0, init_lora_weights=False))
    return model.eval()


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _ids(seed: int, batch: int = 2, seq: int = 11) -> torch.Tensor:
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.6])
@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("tie", [False, True])
def test_llama_erase_is_exact(ratio: float, lora: bool, tie: bool) -> None:
    model = tiny_llama(tie=tie)
    model = _lora(model) if lora else model
    groups = llama_groups(model)
    zero_random(model, tuple(groups), ratio, seed=1)
    masked_state = {k: v.clone() for k, v in model.state_dict().items()}
    small, report = codegen(model, groups, example_inputs=(_ids(0),))
    assert report.max_diff is not None and report.max_diff <= 1e-5
    for seed in (1, 2):
        ids = _ids(seed, batch=3, seq=13)
        assert (_logits(small, ids) - _logits(model, ids)).abs().max() <= 1e-5
    assert sum(p.numel() for p in small.parameters()) == report.plan.numel() == report.params_after
    assert report.params_after < report.params_before
    # the caller's model is untouched
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in masked_state.items())
    assert type(small) is type(model)


def test_generate_gives_the_same_tokens() -> None:
    model = tiny_llama()
    groups = llama_groups(model)
    zero_random(model, tuple(groups), 0.4, seed=3)
    small, _ = codegen(model, groups, example_inputs=(_ids(0),))
    prompt = _ids(7, batch=1, seq=5)
    a = model.generate(prompt, max_new_tokens=12, do_sample=False)
    b = small.generate(prompt, max_new_tokens=12, do_sample=False)
    assert torch.equal(a, b)


def test_rms_norm_rescale_is_exact_and_needed() -> None:
    """The masked model's zero channels count in the RMS mean: without rescaling the result is off."""
    model = tiny_llama()
    groups = [g for g in llama_groups(model) if g.kind == "residual"]
    zero_random(model, tuple(groups), 0.5, seed=0)
    ids = _ids(4)
    small, report = codegen(model, groups, example_inputs=(ids,))
    assert small.config.hidden_size == 32 and report.from_pretrained_compatible
    assert (_logits(small, ids) - _logits(model, ids)).abs().max() <= 1e-5
    d, d_new = 64, 32
    assert small.model.norm.variance_epsilon == pytest.approx(model.model.norm.variance_epsilon * d / d_new)
    assert small.config.rms_norm_eps == pytest.approx(model.config.rms_norm_eps * d / d_new)

    no_rescale = [PruningGroup(g.id, g.name, g.members, g.size, kind=g.kind) for g in groups]
    wrong, _ = codegen(model, no_rescale, verify=False)
    assert (_logits(wrong, ids) - _logits(model, ids)).abs().max() > 1e-3


def test_rms_norm_rescale_formula() -> None:
    norm = nn.RMSNorm(6, eps=1e-3)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2)
    x = torch.randn(4, 6)
    x[:, [1, 4]] = 0
    keep = [0, 2, 3, 5]
    small = copy.deepcopy(norm)
    small.weight = nn.Parameter(norm.weight.detach()[keep])
    find_rms_norm(norm).rescale(small, 6, 4)
    update_module_attributes(small)
    assert small.normalized_shape == (4,)
    torch.testing.assert_close(small(x[:, keep]), norm(x)[:, keep], rtol=0, atol=1e-6)


def test_gemma_style_offset_norm() -> None:
    class OffsetNorm(nn.Module):
        def __init__(self, d: int) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(d) * 0.1)
            self.eps = 1e-6

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1 + self.weight)

    norm = OffsetNorm(8)
    x = torch.randn(3, 8)
    x[:, :2] = 0
    small = copy.deepcopy(norm)
    small.weight = nn.Parameter(norm.weight.detach()[2:].clone())
    RmsNormSpec("eps", weight_offset=1.0).rescale(small, 8, 6)
    torch.testing.assert_close(small(x[:, 2:]), norm(x)[:, 2:], rtol=0, atol=1e-6)


def test_freeze_flags_lora_and_merge() -> None:
    model = _lora(tiny_llama())
    groups = llama_groups(model)
    zero_random(model, tuple(groups), 0.3, seed=2)
    small, _ = codegen(model, groups, example_inputs=(_ids(0),))
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    assert {n: p.requires_grad for n, p in small.named_parameters()} == flags
    assert any(flags.values()) and not all(flags.values())
    q = small.base_model.model.model.layers[0].self_attn.q_proj
    assert (q.in_features, q.out_features) == (q.base_layer.in_features, q.base_layer.out_features)
    assert q.lora_A["default"].in_features == q.in_features and q.lora_B["default"].out_features == q.out_features
    ids = _ids(9)
    expected = _logits(small, ids)
    merged = small.merge_and_unload()
    assert (_logits(merged, ids) - expected).abs().max() <= 1e-5
    # the adapters train: one step changes the loss
    small2, _ = codegen(model, groups, verify=False)
    opt = torch.optim.SGD([p for p in small2.parameters() if p.requires_grad], lr=0.1)
    loss = small2(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    assert small2(input_ids=ids, labels=ids).loss.item() != pytest.approx(loss.item())


def test_inplace_returns_the_same_object() -> None:
    model = tiny_llama()
    groups = llama_groups(model)
    zero_random(model, tuple(groups), 0.3, seed=0)
    n = sum(p.numel() for p in model.parameters())
    small, _ = codegen(model, groups, example_inputs=(_ids(0),), inplace=True)
    assert small is model and sum(p.numel() for p in model.parameters()) < n


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).eval()


def _rows(n: int, k: int = 1) -> torch.Tensor:
    return torch.arange(n * k).view(n, k)


def _channel_group(gid: int, size: int = 6) -> PruningGroup:
    r = _rows(size)
    return PruningGroup(gid, f"g{gid}", (Member("0.weight", 0, Role.PRIMARY, r), Member("0.bias", 0, Role.PRIMARY, r),
                                         Member("2.weight", 1, Role.SECONDARY, r)), size)


def test_overlapping_groups_erase_once_and_consistently() -> None:
    net = _mlp()
    with torch.no_grad():
        net[0].weight[[2, 3, 4]] = 0
        net[0].bias[[2, 3, 4]] = 0
    pairs = torch.tensor([[0, 1], [2, 3], [4, 5]])  # a coarser partition of the same space
    coarse = PruningGroup(1, "pairs", (Member("0.weight", 0, Role.PRIMARY, pairs),
                                       Member("2.weight", 1, Role.SECONDARY, pairs)), 3)
    plan = plan_erasure(net, [_channel_group(0), coarse])
    # channels 2, 3 are zero and so is their pair; channel 4 is zero but its pair (4, 5) is not: it stays
    assert plan.removed[0].tolist() == [2, 3] and plan.removed[1].tolist() == [1]
    assert plan.zero_kept[0].tolist() == [4]
    assert any("overlap" in m for m in plan.messages)
    assert plan.cuts["0.weight"][0].tolist() == [2, 3] and plan.cuts["2.weight"][1].tolist() == [2, 3]
    x = torch.randn(5, 4)
    small, _ = codegen(net, [_channel_group(0), coarse], example_inputs=x)
    assert small[0].out_features == 4 and small[2].in_features == 4


def test_disjoint_members_of_one_tensor_dim_are_merged() -> None:
    """A concat: two groups own disjoint halves of one consumer's input dim."""
    net = _mlp()
    with torch.no_grad():
        net[0].weight[[0, 5]] = 0
        net[0].bias[[0, 5]] = 0
    lo, hi = _rows(3), _rows(3) + 3
    g0 = PruningGroup(0, "lo", (Member("0.weight", 0, Role.PRIMARY, lo), Member("0.bias", 0, Role.PRIMARY, lo),
                                Member("2.weight", 1, Role.SECONDARY, lo)), 3)
    g1 = PruningGroup(1, "hi", (Member("0.weight", 0, Role.PRIMARY, hi), Member("0.bias", 0, Role.PRIMARY, hi),
                                Member("2.weight", 1, Role.SECONDARY, hi)), 3)
    small, rep = codegen(net, [g0, g1], example_inputs=torch.randn(2, 4))
    assert rep.plan.cuts["0.weight"][0].tolist() == [0, 5]
    assert small[0].weight.shape == (4, 4) and small[2].weight.shape == (3, 4)


def test_unprunable_groups_are_left_alone() -> None:
    net = _mlp()
    with torch.no_grad():
        net[0].weight[2] = 0
        net[0].bias[2] = 0
    g = _channel_group(0)
    pinned = PruningGroup(0, "pinned", g.members, g.size, prunable=False, reasons=("test",))
    plan = plan_erasure(net, [pinned])
    assert plan.empty


def test_min_keep() -> None:
    net = _mlp()
    with torch.no_grad():
        net[0].weight.zero_()
        net[0].bias.zero_()
    plan = plan_erasure(net, [_channel_group(0)])
    assert plan.removed[0].numel() == 5 and any("min_keep" in m for m in plan.messages)
    small, _ = codegen(net, [_channel_group(0)], example_inputs=torch.randn(3, 4), min_keep=0)
    assert small[0].out_features == 0 and small[2].in_features == 0


def test_no_zero_structures_is_a_no_op() -> None:
    net = _mlp()
    small, report = codegen(net, [_channel_group(0)], example_inputs=torch.randn(2, 4))
    assert small is net and report.plan.empty and report.params_after == report.params_before


def test_verify_names_the_first_diverging_module() -> None:
    model = tiny_llama()
    groups = [g for g in llama_groups(model) if g.kind == "residual"]
    zero_random(model, tuple(groups), 0.5, seed=0)
    bad = [PruningGroup(g.id, g.name, g.members, g.size, kind=g.kind) for g in groups]  # forgot the norms
    with pytest.raises(VerifyError, match=r"max \|diff\| = .*first diverging module: model\.layers\.0\.self_attn"):
        codegen(model, bad, example_inputs=(_ids(0),))


def test_error_unknown_tensor() -> None:
    g = PruningGroup(0, "ghost", (Member("nope.weight", 0, Role.PRIMARY, _rows(6)),), 6)
    with pytest.raises(GraphError, match=r"'nope.weight'.*Re-run discover-groups"):
        plan_erasure(_mlp(), [g])


def test_error_positions_out_of_range() -> None:
    g = PruningGroup(0, "big", (Member("0.weight", 0, Role.PRIMARY, _rows(9)),), 9)
    with pytest.raises(GraphError, match=r"indexes past the tensor's shape"):
        plan_erasure(_mlp(), [g])


def test_error_layernorm_cannot_be_rescaled() -> None:
    net = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 2))
    with torch.no_grad():
        net[0].weight[0] = 0
        net[0].bias[0] = 0
    r = _rows(6)
    g = PruningGroup(0, "ln", (Member("0.weight", 0, Role.PRIMARY, r), Member("0.bias", 0, Role.PRIMARY, r)), 6,
                     norms=(NormRescale("1", 6),))
    with pytest.raises(GraphError, match=r"not a known RMS norm.*register_rms_norm or mark the space unprunable"):
        plan_erasure(net, [g])


def test_error_plan_does_not_fit_the_model() -> None:
    net = _mlp()
    with torch.no_grad():
        net[0].weight[0] = 0
        net[0].bias[0] = 0
    plan = plan_erasure(net, [_channel_group(0)])
    other = nn.Sequential(nn.Linear(4, 7), nn.ReLU(), nn.Linear(7, 3))
    with pytest.raises(GraphError, match=r"tensor 0.weight has shape \(7, 4\), the plan expected \(6, 4\)"):
        apply_plan(other, plan)
