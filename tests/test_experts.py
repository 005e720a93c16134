"""MoE experts as removable structures: tiny Mixtral, Qwen3-MoE and gpt-oss (4 experts, top-2).

Experts and expert channels are discovered from the module table, masked by zeroing router rows
(an absent expert gets logit -inf), erased exactly (fp32 <= 1e-5, with and without peft LoRA on
the attention projections and on the fused expert tensors), saved and loaded; the config's
expert count is rewritten; the router's top-k stays valid; REAP statistics and ``expert-prune``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import shear
from shear.codegen.module_tree import codegen
from shear.errors import GraphError, PipelineError
from shear.graph.expert_groups import moe_blocks
from shear.graph.pins import pin_kinds
from shear.kernels.experts import expert_statistics
from shear.model.experts import has_routing_hook
from shear.model.tensors import zero_structures
from shear.passes.baselines.random import zero_random

ARCHS = ("mixtral", "qwen3_moe", "gpt_oss")
VOCAB, E, TOP_K, INTER = 96, 4, 2, 24


def build(arch: str, lora: str | None = None, seed: int = 0) -> nn.Module:
    """A seeded fp32 ``arch`` with 2 layers of 4 experts (top-2); ``lora``: ``attention`` or ``experts``."""
    import transformers as tf

    torch.manual_seed(seed)
    common: dict[str, Any] = dict(vocab_size=VOCAB, max_position_embeddings=64, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=TOP_K)
    if arch == "mixtral":
        model: nn.Module = tf.MixtralForCausalLM(tf.MixtralConfig(intermediate_size=INTER, num_local_experts=E, **common))
    elif arch == "qwen3_moe":
        model = tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(head_dim=8, moe_intermediate_size=INTER, num_experts=E,
                                                         norm_topk_prob=False, **common))
    else:
        model = tf.GptOssForCausalLM(tf.GptOssConfig(head_dim=8, intermediate_size=INTER, num_local_experts=E,
                                                     layer_types=["sliding_attention", "full_attention"],
                                                     sliding_window=4, **common))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # fresh routers can be all zeros, biases zero: make every expert distinct
        for name, p in model.named_parameters():
            if "router" in name or ".gate." in name or "experts" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    model = model.float().eval()
    if lora is not None:
        from peft import LoraConfig, get_peft_model

        extra = {"target_parameters": ["experts.gate_up_proj", "experts.down_proj"]} if lora == "experts" else {}
        cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                         lora_dropout=0.0, init_lora_weights=False, **extra)
        model = get_peft_model(model, cfg).eval()
    return model


def ids(seed: int, batch: int = 2, seq: int = 10) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))}


def logits(model: nn.Module, x: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**x).logits


def base(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def experts_of(model: nn.Module, layer: int) -> nn.Module:
    b = moe_blocks(model)[layer]
    return model.get_submodule(b.experts)


@pytest.mark.parametrize("arch", ARCHS)
def test_routing_rules_in_the_table_are_the_routers_own(arch: str) -> None:
    model = build(arch)
    for b in moe_blocks(model):
        router = model.get_submodule(b.router)
        h = torch.randn(7, 32, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            want_logits, want_scores, want_idx = router(h)
            scores, idx = b.router_spec.route(router, want_logits)
        assert torch.equal(idx, want_idx) and torch.equal(scores, want_scores)


@pytest.mark.parametrize("arch", ARCHS)
def test_each_moe_layer_has_an_expert_group_and_a_channel_group(arch: str) -> None:
    model = build(arch)
    graph = shear.trace(model, ids(0, 1, 8))
    graph.check()
    router = "router" if arch == "gpt_oss" else "gate"
    for layer in (0, 1):
        expert = graph.group(f"model.layers.{layer}.mlp/expert")
        assert (expert.kind, expert.size, expert.min_keep, expert.prunable) == ("expert", E, TOP_K, True)
        primary = {(m.param, m.dim) for m in expert.primary}
        assert (f"model.layers.{layer}.mlp.{router}.weight", 0) in primary
        assert (f"model.layers.{layer}.mlp.{router}.bias", 0) in primary or arch != "gpt_oss"
        assert all(m.param.startswith(f"model.layers.{layer}.mlp.experts.") for m in expert.secondary)
        channel = graph.group(f"model.layers.{layer}.mlp.experts/channel")
        assert (channel.size, channel.prunable) == (INTER, True)
        assert {m.param.rsplit(".", 1)[1] for m in channel.primary} <= {"gate_up_proj", "gate_up_proj_bias"}
    # the pinned groups the analysis made for the router rows are replaced, not shown twice
    owners = [g.name for g in graph.pruning_groups for m in g.members if m.param.endswith(f"0.mlp.{router}.weight") and m.dim == 0]
    assert owners == ["model.layers.0.mlp/expert"]
    assert "other" not in {k for g in graph.pruning_groups for k in pin_kinds(g.reasons)}


def _masked_and_small(model: nn.Module, kinds: tuple[str, ...], seed: int = 1) -> tuple[nn.Module, nn.Module, Any]:
    graph = shear.trace(model, ids(0, 1, 8))
    masked = copy.deepcopy(model)
    zero_random(masked, graph.pruning_groups, 0.5, seed, kinds=kinds)
    small, report = codegen(masked, graph.pruning_groups, example_inputs=ids(0, 1, 8))
    return masked, small, report


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("lora", [None, pytest.param("attention", marks=pytest.mark.slow), "experts"])
def test_experts_and_expert_channels_erase_exactly(arch: str, lora: str | None) -> None:
    model = build(arch, lora)
    masked, small, report = _masked_and_small(model, ("expert", "channel"))
    for x in (ids(5), ids(6, batch=3, seq=5)):
        assert float((logits(small, x) - logits(masked, x)).abs().max()) <= 1e-5
    assert float((logits(model, ids(5)) - logits(masked, ids(5))).abs().max()) > 1e-3  # something was removed
    for layer in (0, 1):
        experts = base(small).model.layers[layer].mlp.experts
        assert experts.num_experts == E // 2  # random 50% of 4 experts
        inner = experts_of(small, layer)
        assert inner.gate_up_proj.shape[0] == E // 2 and inner.down_proj.shape[0] == E // 2
        router = moe_blocks(small)[layer]
        assert small.get_submodule(router.router).num_experts == E // 2
    assert base(small).config.num_local_experts == E // 2 and report.from_pretrained_compatible
    assert report.params_after < report.params_before


def test_a_zero_router_row_is_an_absent_expert() -> None:
    """Without the routing hook a zeroed router row is logit 0, and the expert still takes a top-k
    slot: the masked model would not be the erased one."""
    model = build("mixtral")
    masked, small, _ = _masked_and_small(model, ("expert",))
    gate = masked.model.layers[0].mlp.gate
    assert has_routing_hook(gate)
    x = ids(7)
    with torch.no_grad():
        _, _, picked = gate(torch.randn(50, 32, generator=torch.Generator().manual_seed(2)))
    absent = (gate.weight == 0).all(dim=1).nonzero().flatten().tolist()
    assert absent and not any(int(e) in absent for e in picked.unique())
    stock = copy.deepcopy(masked)
    for layer in stock.model.layers:
        layer.mlp.gate._forward_hooks.clear()
    assert float((logits(stock, x) - logits(small, x)).abs().max()) > 1e-3
    assert float((logits(masked, x) - logits(small, x)).abs().max()) <= 1e-5


@pytest.mark.parametrize(("arch", "lora"), [("mixtral", "experts"), ("gpt_oss", None), ("qwen3_moe", "attention")])
def test_erased_moe_round_trips_through_save_and_load(arch: str, lora: str | None, tmp_path: Path) -> None:
    model = build(arch, lora)
    small = shear.compile(model, "discover-groups,random{ratio=0.5,seed=3,kinds=[expert,channel]},erase",
                          example_inputs=ids(0, 1, 8))
    path = shear.save(small, tmp_path / "moe")
    again = shear.load(path)
    x = ids(8)
    assert torch.equal(logits(again, x), logits(small, x))
    assert json.loads((path / "config.json").read_text())["num_local_experts"] == E // 2
    if lora is None:  # uniform counts: a stock from_pretrained rebuilds it
        from transformers import AutoModelForCausalLM

        assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(path).eval(), x), logits(small, x))


def test_layers_that_keep_different_expert_counts_load_with_shear(tmp_path: Path) -> None:
    model = build("qwen3_moe")
    graph = shear.trace(model, ids(0, 1, 8))
    zero_structures(model, graph.group("model.layers.0.mlp/expert"), torch.tensor([1]))
    zero_structures(model, graph.group("model.layers.1.mlp/expert"), torch.tensor([0, 3]))
    small, report = codegen(model, graph.pruning_groups, example_inputs=ids(0, 1, 8))
    assert [experts_of(small, i).num_experts for i in (0, 1)] == [3, 2]
    assert small.config.num_local_experts == E and not report.from_pretrained_compatible  # one count cannot say both
    again = shear.load(shear.save(small, tmp_path / "moe"))
    assert [experts_of(again, i).num_experts for i in (0, 1)] == [3, 2]
    assert torch.equal(logits(again, ids(9)), logits(small, ids(9)))


def test_erasing_below_the_routers_top_k_is_refused() -> None:
    model = build("mixtral")
    graph = shear.trace(model, ids(0, 1, 8))
    expert = graph.group("model.layers.0.mlp/expert")
    zero_structures(model, expert, torch.tensor([0, 1, 2]))
    with pytest.raises(GraphError, match=r"model.layers.0.mlp/expert: erasing would keep 1 of 4 experts, but its router "
                                         r"picks 2 per token \(num_experts_per_tok\)"):
        codegen(model, graph.pruning_groups, example_inputs=ids(0, 1, 8))


def test_selections_keep_the_routers_top_k() -> None:
    model = build("gpt_oss")
    graph = shear.trace(model, ids(0, 1, 8))
    chosen = zero_random(model, graph.pruning_groups, 0.9, 0, kinds=("expert",))
    assert {int(v.numel()) for v in chosen.values()} == {E - TOP_K}  # 90% of 4 would leave 1
    with pytest.raises(PipelineError, match=r"expert-prune: criterion 'loss' is not one of reap, frequency, output-norm"):
        shear.compile(model, "expert-prune{criterion=loss}", example_inputs=ids(0, 1, 8))


def test_reap_statistics_match_a_hand_written_mixtral_layer() -> None:
    model = build("mixtral")
    data = ids(11, batch=3, seq=6)["input_ids"]
    captured: list[torch.Tensor] = []
    layer = model.model.layers[1].mlp
    handle = layer.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach().reshape(-1, 32)))
    stats = expert_statistics(model, data, batch_size=2)["model.layers.1.mlp.gate"]
    handle.remove()
    h = torch.cat(captured)
    probs = torch.softmax(h @ layer.gate.weight.detach().T, dim=-1)
    top, idx = torch.topk(probs, TOP_K, dim=-1)
    top = top / top.sum(dim=-1, keepdim=True)
    w_gu, w_d = layer.experts.gate_up_proj.detach(), layer.experts.down_proj.detach()
    reap = torch.zeros(E, dtype=torch.float64)
    count = torch.zeros(E, dtype=torch.float64)
    with torch.no_grad():
        top = top.detach()
    for t in range(h.shape[0]):
        for s in range(TOP_K):
            e = int(idx[t, s])
            gate, up = (w_gu[e] @ h[t]).chunk(2)
            out = w_d[e] @ (torch.nn.functional.silu(gate) * up)
            reap[e] += float(top[t, s] * out.norm())
            count[e] += 1
    assert stats.tokens == h.shape[0] == 18
    assert torch.equal(stats.counts, count)
    torch.testing.assert_close(stats.score("reap"), reap / count.clamp(min=1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.frequency.sum(), torch.tensor(float(TOP_K), dtype=torch.float64))


@pytest.mark.slow
@pytest.mark.parametrize("criterion", ["reap", "frequency"])
def test_expert_prune_removes_the_lowest_scoring_experts(criterion: str) -> None:
    model = build("qwen3_moe", "experts")
    data = ids(12, batch=4, seq=12)["input_ids"]
    scores = {k: v.score(criterion) for k, v in expert_statistics(model, data).items()}
    small = shear.compile(model, f"expert-prune{{ratio=0.5,criterion={criterion},samples=4,seq_len=12}},erase",
                          example_inputs=ids(0, 1, 8), data=data)
    for layer in (0, 1):
        s = scores[f"base_model.model.model.layers.{layer}.mlp.gate"]
        removed = torch.argsort(s, stable=True)[:2]
        kept = torch.tensor([e for e in range(E) if e not in removed.tolist()])
        inner = experts_of(model, layer)
        assert torch.equal(experts_of(small, layer).gate_up_proj, inner.gate_up_proj[kept])
    assert base(small).config.num_local_experts == 2


@pytest.mark.parametrize(
    "name",
    ["shear.graph.modules.experts", "shear.graph.expert_groups", "shear.model.experts", "shear.kernels.experts",
     "shear.codegen.moe_config", "shear.passes.baselines.expert_prune"],
)  # fmt: skip
def test_docstring_examples(name: str) -> None:
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 1 and result.failed == 0
