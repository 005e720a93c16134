"""Depth: whole attention/MLP blocks and whole layers as removable structures, LoRA-aware.

Discovery finds two blocks per LLaMA-family layer from the graph (with and without peft LoRA) and
refuses other layouts with a reason; erasing a block, or both blocks of a layer (first, middle,
last), equals the masked model, keeps the generation cache right, saves and loads (stock
``from_pretrained`` when whole layers went); the parameter budget counts a removed block exactly;
``block-drop`` and ``lhspg{kinds=[channel,block]}`` run end to end on the tiny trained LLaMA.
"""

from __future__ import annotations

import copy

import pytest
import torch
from models import build

import shear
from shear.codegen.module_tree import codegen
from shear.data import TextData
from shear.errors import GraphError, KernelError, ModelError, PipelineError
from shear.graph.groups import Role
from shear.kernels.allocation import ParamBudget, base_param_count
from shear.kernels.block_saliency import block_saliency
from shear.model.blocks import REMOVED_BLOCKS_FIELD, RemovedBranch, removed_blocks, restore_removed_blocks
from shear.model.branches import branch_of, inner_groups, with_block_groups
from shear.model.tensors import TensorTable, zero_structures
from shear.passes.context import Context
from shear.passes.manager import PassManager
from shear.passes.pipeline import parse_pipeline
from shear.training import ensure_lora
from shear.zoo import load_tiny_llama

IDS = {"input_ids": torch.arange(16).view(1, 16) + 3}
ZERO = torch.zeros(1, dtype=torch.long)


@pytest.fixture(scope="module")
def tiny():
    model, tok, _, _ = load_tiny_llama()
    data = TextData.from_corpus(tok, max_train_chars=30_000, max_val_chars=6_000)
    return model, tok, data


def _blocks(model):
    graph = with_block_groups(shear.trace(model, IDS), model)
    return graph, {(branch_of(model, g).layer, branch_of(model, g).kind): g for g in graph.pruning_groups if g.kind == "block"}


def _erase(model, picks, lora=False):
    """(masked model, small model, report) after zeroing the blocks ``picks`` [(layer, kind)]."""
    masked = ensure_lora(copy.deepcopy(model), r=4)[0] if lora else copy.deepcopy(model)
    if lora:  # adapters that are not zero, so a wrong erase of LoRA would show
        with torch.no_grad():
            for n, p in masked.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02)
    graph, blocks = _blocks(masked)
    table = TensorTable(masked)
    for pick in picks:
        zero_structures(table, blocks[pick], ZERO)
    small, report = codegen(copy.deepcopy(masked), graph.pruning_groups, example_inputs=IDS)
    return masked, small, report


# -- discovery ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("lora", [False, True])
def test_discovery_finds_two_blocks_per_layer(arch, lora):
    model, x = build(arch, lora=lora)
    graph = with_block_groups(shear.trace(model, x), model)
    graph.check()
    blocks = [g for g in graph.pruning_groups if g.kind == "block"]
    layers = model.config.num_hidden_layers
    assert len(blocks) == 2 * layers and all(g.size == 1 and g.prunable for g in blocks)
    assert sorted((branch_of(model, g).layer, branch_of(model, g).kind) for g in blocks) == sorted(
        (i, k) for i in range(layers) for k in ("attention", "mlp"))
    attn = next(g for g in blocks if g.name.endswith("layers.0.self_attn/block"))
    primary = {m.param.split("self_attn.")[1] for m in attn.members if m.role is Role.PRIMARY}
    want = {"o_proj.base_layer.weight", "o_proj.lora_B.default.weight"} if lora else {"o_proj.weight"}
    assert primary == want
    assert any(m.param.endswith("input_layernorm.weight") for m in attn.secondary)
    assert with_block_groups(graph, model) is graph  # idempotent
    heads = inner_groups(attn, graph.pruning_groups)
    assert heads and all(graph.pruning_groups[i].kind == "head" for i in heads)


def test_other_layouts_are_refused_with_the_reason():
    model, x = build("gpt2")
    with pytest.raises(ModelError, match=r"GPT2LMHeadModel \(model_type 'gpt2'\): whole attention/MLP blocks .* LLaMA family"):
        with_block_groups(shear.trace(model, x), model)


# -- erase --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize(
    "picks,layers_left,partial",
    [
        ([(1, "attention")], 4, [(), ("attention",), (), ()]),
        ([(2, "mlp")], 4, [(), (), ("mlp",), ()]),
        ([(0, "attention"), (0, "mlp")], 3, [(), (), ()]),  # first layer
        ([(1, "attention"), (1, "mlp"), (3, "mlp")], 3, [(), (), ("mlp",)]),  # middle layer
        ([(3, "attention"), (3, "mlp")], 3, [(), (), ()]),  # last layer
    ],
)
def test_erase_equals_the_masked_model(tiny, lora, picks, layers_left, partial):
    masked, small, report = _erase(tiny[0], picks, lora=lora)
    assert report.max_diff is not None and report.max_diff <= 1e-5
    with torch.no_grad():
        diff = (small(**IDS).logits - masked(**IDS).logits).abs().max()
    assert float(diff) <= 1e-5
    base = small.get_base_model() if lora else small
    assert base.config.num_hidden_layers == layers_left == len(base.model.layers)
    assert removed_blocks(small) == partial
    assert getattr(base.config, REMOVED_BLOCKS_FIELD, None) == ([list(k) for k in partial] if any(partial) else None)
    assert [layer.self_attn.layer_idx for layer in base.model.layers] == list(range(layers_left))
    lost = sum(p.numel() for n, p in masked.named_parameters() if "lora_" not in n) - base_param_count(small)
    assert lost > 0 and report.params_after < report.params_before
    if lora:  # the removed branches' adapters went with them
        names = [n for n, _ in small.named_parameters()]
        assert not any(f"layers.{layers_left}." in n for n in names)


def test_an_erased_attention_keeps_the_generation_cache_in_step(tiny):
    """Layer 0's attention is where ``cache.get_seq_length()`` looks: prefilling in two chunks must equal
    one forward pass, and greedy generation must equal the masked model's."""
    masked, small, _ = _erase(tiny[0], [(0, "attention"), (2, "attention"), (2, "mlp")])
    ids = torch.arange(12).view(1, 12) + 7
    with torch.no_grad():
        first = small(input_ids=ids[:, :5], use_cache=True)
        second = small(input_ids=ids[:, 5:], cache=first.cache, use_cache=True)
        full = small(input_ids=ids)
    assert float((second.logits - full.logits[:, 5:]).abs().max()) <= 1e-5
    prompt = tiny[1]("Once upon a time", return_tensors="pt").input_ids
    assert torch.equal(small.generate(prompt, max_new_tokens=8, do_sample=False),
                       masked.generate(prompt, max_new_tokens=8, do_sample=False))


def test_erase_refuses_to_remove_every_layer(tiny):
    model = copy.deepcopy(tiny[0])
    graph, blocks = _blocks(model)
    table = TensorTable(model)
    for g in blocks.values():
        zero_structures(table, g, ZERO)
    with pytest.raises(GraphError, match="would remove all 4 decoder layers"):
        codegen(model, graph.pruning_groups, example_inputs=IDS)
    assert len(model.model.layers) == 4 and not removed_blocks(model)[0]


# -- save / load --------------------------------------------------------------------------------------


def test_whole_layers_removed_load_in_stock_from_pretrained(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    _, small, report = _erase(tiny[0], [(1, "attention"), (1, "mlp"), (2, "attention"), (2, "mlp")])
    assert report.from_pretrained_compatible
    path = shear.save(small, tmp_path / "two-layers")
    stock = AutoModelForCausalLM.from_pretrained(path).eval()
    assert stock.config.num_hidden_layers == 2
    with torch.no_grad():
        assert float((stock(**IDS).logits - small(**IDS).logits).abs().max()) <= 1e-5
    again = shear.load(path)
    with torch.no_grad():
        assert float((again(**IDS).logits - small(**IDS).logits).abs().max()) <= 1e-5


@pytest.mark.parametrize("lora", [False, True])
def test_single_blocks_removed_round_trip_through_shear_load(tiny, tmp_path, lora):
    _, small, _ = _erase(tiny[0], [(0, "mlp"), (3, "attention")], lora=lora)
    path = shear.save(small, tmp_path / "blocks")
    again = shear.load(path)
    assert removed_blocks(again) == [("mlp",), (), (), ("attention",)]
    assert type(again).__name__ == type(small).__name__
    with torch.no_grad():
        assert float((again(**IDS).logits - small(**IDS).logits).abs().max()) <= 1e-5


def test_restore_refuses_a_config_that_does_not_fit(tiny):
    model = copy.deepcopy(tiny[0])
    setattr(model.config, REMOVED_BLOCKS_FIELD, [["attention"]])
    with pytest.raises(ModelError, match="lists 1 layers, the model has 4"):
        restore_removed_blocks(model)
    setattr(model.config, REMOVED_BLOCKS_FIELD, [[], ["ffn"], [], []])
    with pytest.raises(ModelError, match=r"names 'ffn'; expected some of \('attention', 'mlp'\)"):
        restore_removed_blocks(model)
    setattr(model.config, REMOVED_BLOCKS_FIELD, [[], ["mlp"], [], []])
    assert isinstance(restore_removed_blocks(model).model.layers[1].mlp, RemovedBranch)


# -- budget, saliency ---------------------------------------------------------------------------------


@pytest.mark.parametrize("lora", [False, True])
def test_the_budget_counts_a_removed_block_exactly(tiny, lora):
    """Blocks and widths together, including channels cut inside a block that goes: the count after
    erasure is what the budget predicted."""
    model = ensure_lora(copy.deepcopy(tiny[0]), r=4)[0] if lora else copy.deepcopy(tiny[0])
    graph, blocks = _blocks(model)
    groups = [g for g in graph.prunable_groups if g.kind in ("channel", "head", "block")]
    budget = ParamBudget(model, groups)
    mlp2 = blocks[(2, "mlp")]
    channels = [g for g in groups if g.kind == "channel"]
    inside = [g for g in channels if g.id in inner_groups(mlp2, graph.pruning_groups)]
    assert len(inside) == 1
    counts = {blocks[(0, "attention")].id: 1, mlp2.id: 1, **{g.id: 40 for g in channels}}
    table = TensorTable(model)
    for gid, n in counts.items():
        zero_structures(table, graph.pruning_groups[gid], torch.arange(n))
    small, _ = codegen(model, graph.pruning_groups, example_inputs=IDS, inplace=True)
    assert base_param_count(small) == budget.params_after(counts)


def test_block_saliency_measures(tiny):
    model = copy.deepcopy(tiny[0])
    graph, blocks = _blocks(model)
    pairs = {g.id: (branch_of(model, g).module, branch_of(model, g).norm) for g in blocks.values()}
    ids = torch.randint(0, 2000, (2, 32), generator=torch.Generator().manual_seed(0))
    loss = block_saliency(model, pairs, ids, measure="loss")
    residual = block_saliency(model, pairs, ids, measure="residual")
    assert set(loss) == set(residual) == set(pairs) and all(v.shape == (1,) for v in loss.values())
    assert all(float(v) > 0 for v in residual.values())
    zero_structures(TensorTable(model), blocks[(1, "mlp")], ZERO)
    again = block_saliency(model, pairs, ids, measure="loss")
    assert abs(float(again[blocks[(1, "mlp")].id])) < 1e-6 < abs(float(loss[blocks[(1, "mlp")].id]))
    with pytest.raises(KernelError, match="measure must be one of loss, residual"):
        block_saliency(model, pairs, ids, measure="cosine")


# -- passes -------------------------------------------------------------------------------------------


def _run(model, pipeline, data):
    ctx = Context(model=copy.deepcopy(model), example_inputs=IDS, data=data)
    PassManager(parse_pipeline(pipeline)).run(ctx)
    return ctx


def test_block_drop_removes_blocks_to_a_share_of_the_parameters(tiny):
    model, _, data = tiny
    ctx = _run(model, "discover-groups,block-drop{ratio=0.2,samples=4,seq_len=64},erase", data)
    lost = 1 - base_param_count(ctx.model) / base_param_count(model)
    assert abs(lost - 0.2) <= 0.05  # blocks come whole: the nearest reachable share
    assert sum(len(k) for k in removed_blocks(ctx.model)) >= 1
    ctx = _run(model, "discover-groups,block-drop{ratio=0.4,layers=true,measure=residual,samples=2,seq_len=32},erase", data)
    assert ctx.model.config.num_hidden_layers == 2 and not any(removed_blocks(ctx.model))
    with pytest.raises(PipelineError, match="block-drop: option 'ratio'|ratio must be in"):
        parse_pipeline("block-drop{ratio=0}")


def test_lhspg_joint_channel_and_block_budget_end_to_end(tiny):
    model, _, data = tiny
    ctx = _run(model, "discover-groups,lhspg{ratio=0.3,periods=2,steps_per_period=2,batch_size=2,seq_len=64,"
                      "calibration=2,kinds=[channel,block]},erase", data)
    result, choice = ctx.get("lhspg"), ctx.get("lhspg-depth")
    assert abs(result.predicted_reduction - 0.3) <= 0.005
    assert choice.trials and choice.trials[0].blocks == 0  # the width-only split is measured too
    best = min(choice.trials, key=lambda t: t.loss)
    assert len(choice.blocks) == best.blocks
    erased = ctx.get("erase")
    assert erased.max_diff is not None and erased.max_diff <= 1e-5
    lost = 1 - base_param_count(ctx.model) / base_param_count(model)
    assert abs(lost - 0.3) <= 0.01
    assert sum(len(k) for k in removed_blocks(ctx.model)) + 2 * (4 - ctx.model.config.num_hidden_layers) == best.blocks


def test_lhspg_blocks_alone_and_whole_layers(tiny):
    model, _, data = tiny
    ctx = _run(model, "discover-groups,lhspg{ratio=0.2,periods=2,steps_per_period=1,batch_size=1,seq_len=32,"
                      "calibration=2,kinds=[block],selection=shared},erase,merge-lora", data)
    assert type(ctx.model).__name__ == "LlamaForCausalLM"
    assert ctx.model.config.num_hidden_layers == 3 and not any(removed_blocks(ctx.model))
    with pytest.raises(PipelineError, match="kinds=\\[block\\] with residual is not supported"):
        parse_pipeline("lhspg{kinds=[block,residual]}")


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("lora", [False, True])
def test_blocks_erase_exactly_together_with_random_widths_and_the_residual(arch, lora):
    from shear.passes.baselines.random import zero_random

    model, x = build(arch, lora=lora)
    graph = with_block_groups(shear.trace(model, x), model)
    blocks = [g for g in graph.pruning_groups if g.kind == "block"]
    zero_random(model, graph.pruning_groups, 0.3, 0)
    for g in (blocks[0], blocks[3]):  # attention of layer 0, MLP of layer 1
        zero_structures(TensorTable(model), g, ZERO)
    with torch.no_grad():
        masked = model(**x).logits
    small, report = codegen(model, graph.pruning_groups, example_inputs=x)
    assert report.max_diff is not None and report.max_diff <= 1e-5
    assert removed_blocks(small) == [("attention",), ("mlp",)]
    with torch.no_grad():
        assert float((small(**x).logits - masked).abs().max()) <= 1e-5


@pytest.mark.slow
def test_bench_depth_tool_writes_its_table(tmp_path):
    from tools.bench_depth import main

    out = tmp_path / "depth.md"
    assert main(["--quick", "--only", "block-drop", "--eval-tokens", "256", "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert lines[0].startswith("| method | params | layers | blocks erased |") and len(lines) == 4
    assert lines[2].startswith("| dense |") and lines[3].startswith("| block-drop |")
