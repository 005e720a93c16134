"""LHSPG: parameter budgets, the decay/projection arithmetic, and every guarantee of a full run.

The full runs use shear's tiny trained LLaMA (real weights, real corpus text) with LoRA adapters.
Guarantees tested: redundant structures are exactly zero at every period end and stay zero;
important structures are never zeroed; their base weights change only at the period-end merges;
the erased model loses the requested share of parameters (within 1%) and equals the LHSPG result;
a run killed mid-way and resumed from its checkpoint reaches bit-identical weights.
"""

from __future__ import annotations

import copy

import pytest
import torch

import shear
from shear.data import TextData
from shear.errors import DataError, KernelError, PassError, PipelineError
from shear.graph.trace import trace
from shear.kernels.allocation import ParamBudget, base_param_count
from shear.kernels.lhspg import StructureViews
from shear.model.tensors import TensorTable, nonzero_structures, zero_structures
from shear.passes.base import Context
from shear.passes.lorashear.lhspg import LHSPG, LhspgHook
from shear.training import TokenBatches, TrainConfig, TrainHook, ensure_lora, train
from shear.zoo import load_tiny_llama

SEQ = 64


@pytest.fixture(scope="module")
def tiny():
    model, tok, _, _ = load_tiny_llama()
    data = TextData.from_corpus(tok, max_train_chars=30_000, max_val_chars=6_000)
    return model, tok, data


def _lora(model):
    peft_model, msg = ensure_lora(copy.deepcopy(model), r=4)
    ids = torch.arange(16).view(1, 16)
    return peft_model, trace(peft_model, {"input_ids": ids}), ids



# -- budget --------------------------------------------------------------------------------------


@pytest.mark.parametrize("selection", ["uniform", "shared", "global"])
@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_budget_hits_target_and_predicts_erased_count(tiny, ratio, selection):
    model, graph, ids = _lora(tiny[0])
    groups = [g for g in graph.prunable_groups if g.kind in ("channel", "head")]
    budget = ParamBudget(model, groups)
    assert budget.total == base_param_count(model)
    scores = {g.id: torch.rand(g.size, generator=torch.Generator().manual_seed(g.id)) for g in groups}
    counts = budget.counts(ratio, scores, selection=selection, tolerance=0.005)
    assert abs(budget.reduction(counts) - ratio) <= 0.005
    table = TensorTable(model)
    for g in groups:
        zero_structures(table, g, scores[g.id].argsort()[: counts[g.id]])
    small = shear.compile(model, "erase", example_inputs={"input_ids": ids}, inplace=True)
    del graph
    assert base_param_count(small) == budget.params_after(counts)


def test_budget_out_of_reach_names_the_maximum(tiny):
    model, graph, _ = _lora(tiny[0])
    heads = [g for g in graph.prunable_groups if g.kind == "head"]
    budget = ParamBudget(model, heads)
    with pytest.raises(KernelError, match="at most .* less than the target"):
        budget.counts(0.9, {}, tolerance=0.005)
    with pytest.raises(KernelError, match=r"must be in \(0, 1\)"):
        budget.counts(1.0, {})


# -- views: effective slices, decay, projection ------------------------------------------------------


def test_views_read_effective_lora_weights_and_decay_to_exact_zero(tiny):
    model, graph, _ = _lora(tiny[0])
    for c in graph.composites:  # give every adapter a non-zero B
        torch.nn.init.normal_(TensorTable(model).get(c.lora_b[0]), std=0.02)
    mlp = next(g for g in graph.prunable_groups if g.kind == "channel")
    views = StructureViews(model, [mlp], graph.composites)
    link = next(v for v in views.views[mlp.id] if v.lora is not None)
    w = views.table.tensors[link.tensor]
    a, b = views.table.tensors[link.lora.a], views.table.tensors[link.lora.b]
    row = int(link.positions[3, 0])
    expected = w[row] + link.lora.scaling * (b[row] @ a)
    got = views._slice(link, torch.tensor([3]))[0]
    torch.testing.assert_close(got, expected.detach(), rtol=0, atol=1e-6)

    idx = torch.tensor([1, 3, 5])
    tp = 4
    for t in range(tp):
        views.decay({mlp.id: idx}, 1.0 / (tp - t), eps=-1.0)  # eps < 0: never project early
        if t < tp - 1:
            assert not views.is_zero(mlp.id)[idx].any()
    assert views.is_zero(mlp.id)[idx].all()
    assert not views.is_zero(mlp.id)[torch.tensor([0, 2, 4])].any()
    assert (b[link.positions[idx].flatten()] == 0).all()
    assert not bool(nonzero_structures(views.table, mlp)[idx].any())


def test_half_space_projection_zeroes_a_structure_the_update_turns_around(tiny):
    model, graph, _ = _lora(tiny[0])
    mlp = next(g for g in graph.prunable_groups if g.kind == "channel")
    views = StructureViews(model, [mlp], graph.composites)
    for v in views.views[mlp.id]:  # s * B A = -2 W on structure 0: the merged slice points backwards
        if v.lora is None:
            continue
        row = int(v.positions[0, 0])
        w = views.table.tensors[v.tensor].detach()[row]
        a, b = views.table.tensors[v.lora.a], views.table.tensors[v.lora.b]
        with torch.no_grad():
            a[0] = w / w.norm()
            b[row, 0] = -2.0 * w.norm() / v.lora.scaling
    projected = views.decay({mlp.id: torch.tensor([0, 1])}, 0.25, eps=0.0)
    assert projected[mlp.id].tolist() == [0]
    assert views.is_zero(mlp.id)[0] and not views.is_zero(mlp.id)[1]


# -- full runs ---------------------------------------------------------------------------------------


class Probe(TrainHook):
    """Records, after LHSPG's step hook, what the guarantees are about."""

    def __init__(self, lhspg: LhspgHook, views: StructureViews, tp: int, warmup: int) -> None:
        self.lhspg, self.views, self.tp, self.warmup = lhspg, views, tp, warmup
        self.period_ends: list[dict[int, torch.Tensor]] = []
        self.important_zeroed = 0
        self.base_changes: list[int] = []
        self._prev: dict[str, torch.Tensor] = {}

    def _important_rows(self) -> dict[str, torch.Tensor]:
        out = {}
        for gid, views in self.views.views.items():
            bad = set(self.lhspg.zeroed[gid].tolist()) | set(self.lhspg.decaying.get(gid, torch.zeros(0)).tolist())
            keep = torch.tensor([i for i in range(self.views.groups[gid].size) if i not in bad], dtype=torch.long)
            for v in views:
                t = self.views.table.tensors[v.tensor]
                out[f"{gid}:{v.tensor}"] = t.detach().index_select(v.dim, v.positions[keep].flatten()).clone()
        return out

    def on_train_start(self, state) -> None:
        self._prev = self._important_rows()

    def after_optimizer_step(self, state) -> None:
        s = state.step
        merged = s > self.warmup and (s - self.warmup) % self.tp == 0
        now = self._important_rows()
        if not merged:
            for key, before in self._prev.items():
                if key in now and now[key].shape == before.shape and not torch.equal(now[key], before):
                    self.base_changes.append(s)
        if merged:
            self.period_ends.append({g: self.views.is_zero(g).clone() for g in self.views.groups})
        for gid in self.views.groups:
            zero = self.views.is_zero(gid)
            red = set(self.lhspg.zeroed[gid].tolist()) | set(self.lhspg.decaying.get(gid, torch.zeros(0)).tolist())
            self.important_zeroed += sum(1 for i in zero.nonzero().flatten().tolist() if i not in red)
        self._prev = self._important_rows()


def _run_hook(model, graph, data, *, ratio, periods, tp, warmup, extra_hooks=(), checkpoint_dir=None, every=0):
    groups = [g for g in graph.prunable_groups if g.kind in ("channel", "head")]
    views = StructureViews(model, groups, graph.composites)
    budget = ParamBudget(model, groups)
    counts = budget.counts(ratio, {g.id: views.norms(g.id) for g in groups})
    hook = LhspgHook(
        views, {g: n for g, n in counts.items() if n}, warmup=warmup, periods=periods,
        steps_per_period=tp, eps=0.0, score=lambda m: {g.id: views.norms(g.id) for g in groups},
    )
    config = TrainConfig(steps=warmup + periods * tp, lr=1e-3, batch_size=2, seq_len=SEQ, seed=0,
                         checkpoint_dir=checkpoint_dir, checkpoint_every=every)
    batches = TokenBatches(data.train, 2, SEQ, seed=0)
    hooks = [hook, *(h(hook, views) for h in extra_hooks)]
    result = train(model, batches, config, hooks=hooks)
    return hook, views, budget, counts, result, hooks


def test_lhspg_guarantees_on_the_tiny_trained_llama(tiny):
    model, graph, ids = _lora(tiny[0])
    periods, tp, warmup = 3, 3, 2
    hook, views, budget, counts, result, hooks = _run_hook(
        model, graph, tiny[2], ratio=0.3, periods=periods, tp=tp, warmup=warmup,
        extra_hooks=[lambda h, v: Probe(h, v, tp, warmup)],
    )
    probe = hooks[1]
    assert len(probe.period_ends) == periods
    for p, zero in enumerate(probe.period_ends):
        for gid, n in hook.counts.items():
            # cumulative share of each group's count is exactly zero at each period end
            assert int(zero[gid].sum()) >= round(n * (p + 1) / periods), (p, gid)
    assert probe.important_zeroed == 0
    assert probe.base_changes == []  # important base rows change only at merges
    for gid, n in hook.counts.items():
        assert int(views.is_zero(gid).sum()) == n
    # erase: the requested share of parameters goes, and the small model equals the LHSPG result
    # (to fp32 rounding: the logits reach ~16, where one ulp is 2e-6; measured 0.95e-5 to 1.15e-5
    # depending on the last bits of the training run)
    small = shear.compile(model, "erase", example_inputs={"input_ids": ids}, verify=2e-5, inplace=False)
    reduction = 1 - base_param_count(small) / budget.total
    assert abs(reduction - 0.3) <= 0.01
    assert small.shear_report.verify_max_diff is not None and small.shear_report.verify_max_diff <= 2e-5
    with torch.no_grad():
        diff = (small(input_ids=ids).logits - model(input_ids=ids).logits).abs().max().item()
    assert diff <= 2e-5


class Kill(TrainHook):
    def __init__(self, at: int) -> None:
        self.at = at

    def after_optimizer_step(self, state) -> None:
        if state.step == self.at:
            raise KeyboardInterrupt("simulated kill")


def test_lhspg_resume_after_kill_is_exact(tiny, tmp_path):
    base, graph, _ = _lora(tiny[0])
    kw = dict(ratio=0.3, periods=2, tp=3, warmup=1)
    ref = copy.deepcopy(base)
    _run_hook(ref, trace(ref, {"input_ids": torch.arange(16).view(1, 16)}), tiny[2], **kw)

    killed = copy.deepcopy(base)
    g = trace(killed, {"input_ids": torch.arange(16).view(1, 16)})
    with pytest.raises(KeyboardInterrupt):
        _run_hook(killed, g, tiny[2], checkpoint_dir=str(tmp_path), every=2,
                  extra_hooks=[lambda h, v: Kill(5)], **kw)
    resumed = copy.deepcopy(base)  # a fresh process: the original weights, then the checkpoint
    g = trace(resumed, {"input_ids": torch.arange(16).view(1, 16)})
    hook, *_ = _run_hook(resumed, g, tiny[2], checkpoint_dir=str(tmp_path), every=2,
                         extra_hooks=[lambda h, v: Kill(-1)], **kw)  # same hooks as the killed run
    assert hook.period == 1 and sum(int(v.numel()) for v in hook.zeroed.values()) == sum(hook.counts.values())
    for (n1, p1), (n2, p2) in zip(ref.named_parameters(), resumed.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1


def test_lhspg_pass_adds_lora_with_a_message_and_meets_ratio(tiny):
    model, _, data = tiny
    ids = {"input_ids": torch.arange(16).view(1, 16)}
    small = shear.compile(
        model,
        "discover-groups,lhspg{ratio=0.25,periods=2,steps_per_period=2,warmup=1,batch_size=2,seq_len=64},erase,merge-lora",
        example_inputs=ids,
        data=data,
    )
    report = small.shear_report
    assert any("no LoRA adapters" in w and "shear added them" in w for w in report.warnings)
    assert type(small).__name__ == "LlamaForCausalLM"
    assert abs(1 - base_param_count(small) / base_param_count(model) - 0.25) <= 0.01


def test_lhspg_bad_input(tiny):
    model, tok, data = tiny
    ids = {"input_ids": torch.arange(16).view(1, 16)}
    for bad in ("0", "1", "1.5", "-0.1"):
        with pytest.raises(PipelineError, match=r"ratio must be in \(0, 1\)"):
            shear.compile(model, f"discover-groups,lhspg{{ratio={bad}}}", example_inputs=ids, data=data)
    with pytest.raises(PassError, match="needs text data"):
        shear.compile(model, "discover-groups,lhspg", example_inputs=ids)
    short = TextData.from_texts(tok, {"tiny": "Only a few words here."})
    with pytest.raises(PassError, match="fewer than|at least"):
        shear.compile(model, "discover-groups,lhspg{seq_len=64}", example_inputs=ids, data=short)
    plain = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    with pytest.raises(PassError, match="no prunable groups"):
        shear.compile(plain, "discover-groups,lhspg", example_inputs=torch.randn(1, 4), data=data)


def test_context_data_error_message():
    with pytest.raises(DataError, match="TextData.from_corpus"):
        LHSPG().run(Context(model=torch.nn.Linear(2, 2), results={"graph": None}))


def test_default_pipeline_is_lorashear_for_causal_lms(tiny):
    from shear.passes.pipeline import DEFAULT_PIPELINE, LORASHEAR_PIPELINE, default_pipeline

    assert default_pipeline(tiny[0]) == LORASHEAR_PIPELINE
    assert default_pipeline(ensure_lora(copy.deepcopy(tiny[0]), r=4)[0]) == LORASHEAR_PIPELINE
    assert default_pipeline(torch.nn.Linear(2, 2)) == DEFAULT_PIPELINE
    assert LORASHEAR_PIPELINE.index("knowledge-distribution") < LORASHEAR_PIPELINE.index("lhspg")
    assert LORASHEAR_PIPELINE.index("lhspg") < LORASHEAR_PIPELINE.index("erase")


@pytest.mark.parametrize("prune", ["magnitude{{mode=structured,params={r}}}", "taylor{{params={r},samples=4,seq_len=32}}"])
def test_one_shot_baselines_prune_to_the_same_parameter_budget(tiny, prune):
    model, _, data = tiny
    ids = {"input_ids": torch.arange(16).view(1, 16)}
    small = shear.compile(model, f"discover-groups,{prune.format(r=0.3)},erase", example_inputs=ids, data=data)
    assert abs(1 - base_param_count(small) / base_param_count(model) - 0.3) <= 0.01
    with pytest.raises(PipelineError, match="params must be in"):
        shear.compile(model, "discover-groups,magnitude{mode=unstructured,params=0.3}", example_inputs=ids)


def test_views_refuse_to_bind_a_model_without_the_traced_tensors(tiny):
    """``bind`` (the FSDP2 copy, or the original again) needs the traced parameter names."""
    model, graph, _ = _lora(tiny[0])
    mlp = next(g for g in graph.prunable_groups if g.kind == "channel")
    views = StructureViews(model, [mlp], graph.composites)
    views.bind(model)  # the same model: nothing to do
    with pytest.raises(KernelError, match="bind a model with the same parameter names"):
        views.bind(torch.nn.Linear(2, 2))


def test_protect_cap_lets_knowledge_distributions_groups_give_up_structures(tiny):
    """At a high ratio the protected MLP stays whole without a cap and keeps 1.5x the others' share
    with ``protect_cap=1.5``; both meet the ratio."""
    model, _, data = tiny
    ids = {"input_ids": torch.arange(16).view(1, 16)}
    kd = "knowledge-distribution{gamma=0.25,include=basic,seq_len=32,max_windows=1}"
    train = "periods=1,steps_per_period=1,warmup=0,batch_size=1,seq_len=32"
    kept: dict[str, list[int]] = {}
    for cap in ("inf", "1.5"):
        small = shear.compile(
            model, f"lora{{r=4}},discover-groups,{kd},lhspg{{ratio=0.4,{train},protect_cap={cap}}},erase,merge-lora",
            example_inputs=ids, data=data,
        )
        assert abs(1 - base_param_count(small) / base_param_count(model) - 0.4) <= 0.01
        kept[cap] = [layer.mlp.gate_proj.out_features for layer in small.model.layers]
    full = model.model.layers[0].mlp.gate_proj.out_features
    protected = [i for i, k in enumerate(kept["inf"]) if k == full]
    assert len(protected) == 1, kept  # gamma 0.25 of 4 MLP node groups
    (p,) = protected
    capped, others = kept["1.5"][p], [k for i, k in enumerate(kept["1.5"]) if i != p]
    assert capped < full and capped == pytest.approx(1.5 * others[0], abs=2), kept
    assert min(others) > max(k for i, k in enumerate(kept["inf"]) if i != p)  # the others keep more
