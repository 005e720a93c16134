"""Device correctness on a CPU-only machine: what a pass creates lives where the weights live.

A GPU run of LHSPG once died in its first merge, because a CPU ``torch.Generator`` reached
``kaiming_uniform_`` on CUDA adapters; no CPU test could see it. These tests run the kernels of the
passes on a model on the meta device under :class:`~device_check.DeviceCheck`, which raises for
every op that mixes devices or draws with a generator of another device (as CUDA does), and count
the host syncs of one LHSPG training step on the CPU (there must be none inside a period).
"""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from device_check import DeviceCheck
from models import build

from shear.codegen.module_tree import apply_plan, plan_erasure
from shear.compiler import default_example_inputs
from shear.graph.trace import trace
from shear.kernels.lhspg import StructureViews
from shear.model.devices import model_device, seeded_draw
from shear.passes.baselines.random import zero_random
from shear.passes.lorashear.lhspg import LhspgHook
from shear.training import ensure_lora, lora_layers, merge_and_reset_lora


@pytest.fixture(scope="module")
def lora_llama():
    model, inputs = build("llama")
    peft_model, _ = ensure_lora(model, r=4)
    with torch.no_grad():  # non-zero B, so merges and decays move values
        for _, layer in lora_layers(peft_model):
            for b in layer.lora_B.values():
                b.weight.normal_(std=0.02)
    return peft_model, trace(peft_model, inputs), inputs


def test_the_check_catches_a_cpu_generator_on_another_device():
    w = torch.empty(4, 4, device="meta")
    with pytest.raises(AssertionError, match="draws on meta with a cpu generator"), DeviceCheck():
        torch.nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=torch.Generator())
    with pytest.raises(AssertionError, match="mixes devices"), DeviceCheck():
        w.index_fill_(0, torch.tensor([1, 2]), 0)


def test_merge_draws_on_the_cpu_and_moves(lora_llama):
    model, _, _ = lora_llama
    meta = copy.deepcopy(model).to("meta")
    with DeviceCheck():
        assert merge_and_reset_lora(meta, generator=torch.Generator().manual_seed(3)) == len(lora_layers(meta))
    # on the CPU the draw is in place: bit-identical to drawing directly
    a = torch.empty(8, 16)
    seeded_draw(a, lambda t: torch.nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=torch.Generator().manual_seed(1)))
    b = torch.nn.init.kaiming_uniform_(torch.empty(8, 16), a=math.sqrt(5), generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_lhspg_kernels_keep_everything_on_the_weights_device(lora_llama):
    model, graph, _ = lora_llama
    meta = copy.deepcopy(model).to("meta")
    groups = [g for g in graph.prunable_groups if g.kind in ("channel", "head")]
    views = StructureViews(meta, groups, graph.composites)
    adapters = [p for n, p in meta.named_parameters() if "lora_" in n]
    optimizer = torch.optim.AdamW(adapters)
    for p in adapters:  # AdamW's moments, as after a first step
        optimizer.state[p] = {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
    decaying = {g.id: torch.tensor([0, g.size - 1]) for g in groups}
    held: dict[int, torch.Tensor] = {}
    with DeviceCheck() as check:
        views.decay(decaying, 0.25, eps=0.1, optimizer=optimizer, held=held)
        views.decay(decaying, 1.0, optimizer=optimizer, held=held)
        views.hold_zero(decaying, optimizer)
        merge_and_reset_lora(meta, generator=torch.Generator().manual_seed(0))
    assert check.syncs == []
    assert {m.device.type for m in held.values()} == {"meta"}


def test_an_lhspg_step_inside_a_period_reads_nothing_back(lora_llama):
    model, graph, _ = lora_llama
    model = copy.deepcopy(model)
    groups = [g for g in graph.prunable_groups if g.kind in ("channel", "head")]
    views = StructureViews(model, groups, graph.composites)
    scores = {g.id: views.norms(g.id) for g in groups}
    hook = LhspgHook(
        views, {g.id: 1 for g in groups}, warmup=0, periods=2, steps_per_period=4, eps=0.5,
        score=lambda m: scores, initial_scores=scores,
    )
    adapters = [(n, p) for n, p in model.named_parameters() if "lora_" in n]
    state = SimpleNamespace(model=model, optimizer=torch.optim.AdamW([p for _, p in adapters]),
                            trainable=adapters, step=0, losses=[1.0])
    hook.on_train_start(state)
    for step in range(1, 9):
        state.step = step
        with DeviceCheck() as check:
            hook.after_optimizer_step(state)
        if step % 4:  # not a period end: no value crosses to the host
            assert check.syncs == [], step
    assert sum(int(v.numel()) for v in hook.zeroed.values()) == len(groups)
    for g in groups:
        assert int(views.is_zero(g.id).sum()) >= 1


def test_zeroing_and_erasing_on_meta_stay_on_meta(lora_llama):
    model, graph, _ = lora_llama
    cpu = copy.deepcopy(model)
    zero_random(cpu, graph.pruning_groups, 0.25, seed=0)
    plan = plan_erasure(cpu, graph.pruning_groups)
    meta = copy.deepcopy(model).to("meta")
    with DeviceCheck():
        zero_random(meta, graph.pruning_groups, 0.25, seed=0)
        apply_plan(meta, plan)
    assert model_device(meta).type == "meta"
    assert sum(p.numel() for p in meta.parameters()) < sum(p.numel() for p in model.parameters())


def test_default_inputs_follow_the_weights():
    model, _ = build("llama")
    meta = copy.deepcopy(model).to("meta")
    on_cpu, on_meta = default_example_inputs(model)["input_ids"], default_example_inputs(meta)["input_ids"]
    assert on_cpu.device.type == "cpu" and on_meta.device.type == "meta" and on_cpu.shape == on_meta.shape
