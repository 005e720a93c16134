"""Saliency criteria (magnitude, cosine, taylor1/2, activation), their normalisation, and the taylor pass."""

from __future__ import annotations

import copy

import pytest
import torch
from models import build
from torch import nn

import shear
from shear.data import TextData
from shear.errors import DataError, KernelError, PipelineError
from shear.graph.groups import Member, PruningGroup, Role
from shear.graph.ir import LoraComposite
from shear.kernels.saliency import CRITERIA, compute_saliency, parse_weights, taylor_importance
from shear.model.tensors import TensorTable, nonzero_structures
from shear.passes import Context, PassManager, parse_pipeline
from shear.passes.baselines.taylor import Taylor
from shear.passes.lorashear.saliency import Saliency


def _rows(size: int) -> torch.Tensor:
    return torch.arange(size).view(size, 1)


class _Lora(nn.Module):
    """A hand-made LoRA linear: base Linear(3 -> 3) plus A [3, 3], B [3, 3], scaling 2."""

    def __init__(self) -> None:
        super().__init__()
        self.base = nn.Linear(3, 3, bias=False)
        self.A = nn.Parameter(torch.eye(3))
        self.B = nn.Parameter(torch.zeros(3, 3))


def _hand_lora() -> tuple[nn.Module, PruningGroup, LoraComposite]:
    model = nn.Module()
    model.lin = _Lora()
    with torch.no_grad():
        model.lin.base.weight.copy_(torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 1.0], [3.0, 0.0, 0.0]]))
        w = model.lin.base.weight
        model.lin.B.copy_(torch.stack([w[0], -w[1], torch.tensor([0.0, 1.0, 0.0])]))  # along, against, orthogonal
    group = PruningGroup(
        0,
        "lin/out",
        (Member("lin.base.weight", 0, Role.PRIMARY, _rows(3)), Member("lin.B", 0, Role.PRIMARY, _rows(3))),
        3,
    )
    comp = LoraComposite("lin", "lin.base", ("default",), ("lin.A",), ("lin.B",), (2.0,), (3,))
    return model, group, comp


def test_magnitude_orders_rows_and_is_unit_norm() -> None:
    lin = nn.Linear(4, 5, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.diag_embed(torch.tensor([3.0, 1.0, 4.0, 2.0]))[:, :].repeat(2, 1)[:5])
    g = PruningGroup(0, "out", (Member("weight", 0, Role.PRIMARY, _rows(5)),), 5)
    s = compute_saliency(lin, [g], weights="magnitude=1")
    raw = s.criteria["magnitude"][0]
    assert torch.allclose(raw, lin.weight.detach().norm(dim=1))
    assert s.by_group[0].argsort(stable=True).tolist() == [1, 3, 0, 4, 2]
    assert float(s.by_group[0].norm()) == pytest.approx(1.0, abs=1e-6)
    assert [i for _, i, _ in s.lowest(2)] == [1, 3]
    assert s.lowest_in(0, 2).tolist() == [1, 3]


def test_every_criterion_is_normalised_over_all_groups_and_weighted() -> None:
    model, _ = build("llama")
    graph = shear.trace(model, {"input_ids": torch.zeros(1, 8, dtype=torch.long)})
    ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    spec = "magnitude=1,taylor1=0.5,taylor2=2,activation=3"
    s = compute_saliency(model, graph.pruning_groups, weights=spec, calibration_ids=ids)
    assert set(s.by_group) == {g.id for g in graph.prunable_groups} and s.gradient == "loss"
    w = parse_weights(spec)
    expected = {gid: torch.zeros_like(v) for gid, v in s.by_group.items()}
    for c, table in s.criteria.items():
        norm = torch.cat(list(table.values())).norm()
        assert float(norm) > 0
        unit = torch.cat([v / norm for v in table.values()])
        assert float(unit.norm()) == pytest.approx(1.0, abs=1e-5)
        for gid, v in table.items():
            expected[gid] += w[c] * v / norm
    for gid, v in s.by_group.items():
        assert torch.allclose(v, expected[gid], atol=1e-6)
    flat = s.flat()
    assert [t[2] for t in flat] == sorted(t[2] for t in flat)
    assert len(flat) == graph.num_structures()


def test_cosine_uses_lora_and_magnitude_the_effective_weight() -> None:
    model, group, comp = _hand_lora()
    s = compute_saliency(model, [group], weights="magnitude=1,cosine=1", composites=[comp])
    assert torch.allclose(s.criteria["cosine"][0], torch.tensor([2.0, 0.0, 1.0]), atol=1e-6)
    w = model.lin.base.weight.detach()
    effective = w + 2.0 * model.lin.B.detach() @ model.lin.A.detach()
    assert torch.allclose(s.criteria["magnitude"][0], effective.norm(dim=1))
    # B = 0 (peft's init): every structure scores exactly 1
    with torch.no_grad():
        model.lin.B.zero_()
    s0 = compute_saliency(model, [group], weights="cosine=1", composites=[comp])
    assert torch.equal(s0.criteria["cosine"][0], torch.ones(3))


def test_taylor_with_lora_proxy_is_weight_times_ba() -> None:
    model, group, comp = _hand_lora()
    s = compute_saliency(model, [group], weights="taylor1=1,taylor2=1", composites=[comp])
    assert s.gradient == "lora"
    w = model.lin.base.weight.detach()
    d = 2.0 * model.lin.B.detach() @ model.lin.A.detach()
    p = (w + d) * d
    assert torch.allclose(s.criteria["taylor1"][0], p.sum(1).abs())
    assert torch.allclose(s.criteria["taylor2"][0], p.sum(1).abs() + 0.5 * (p * p).sum(1))


def _hand_grad(model: nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    model = copy.deepcopy(model)
    for p in model.parameters():
        p.requires_grad_(True)
    logits = model(input_ids=ids).logits
    loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}


def test_taylor_loss_gradient_matches_hand_autograd() -> None:
    model, _ = build("llama")
    graph = shear.trace(model, {"input_ids": torch.zeros(1, 8, dtype=torch.long)})
    ids = torch.randint(0, 96, (4, 12), generator=torch.Generator().manual_seed(1))
    s = compute_saliency(model, graph.pruning_groups, weights="taylor1=1,taylor2=1", calibration_ids=ids, batch_size=4)
    element = taylor_importance(model, graph.pruning_groups, ids, aggregate="sum")
    grads = _hand_grad(model, ids)
    params = dict(model.named_parameters())
    for g in graph.prunable_groups:
        first = torch.zeros(g.size, dtype=torch.float64)
        second = torch.zeros(g.size, dtype=torch.float64)
        summed = torch.zeros(g.size, dtype=torch.float64)
        for m in g.members:
            if m.is_buffer:
                continue
            p = (params[m.param].detach() * grads[m.param]).double()
            rows = p.movedim(m.dim, 0).reshape(p.shape[m.dim], -1) if p.dim() > 1 else p.view(-1, 1)
            first += rows.sum(1)[m.positions].sum(1)
            second += (rows * rows).sum(1)[m.positions].sum(1)
            summed += rows.abs().sum(1)[m.positions].sum(1)
        assert torch.allclose(s.criteria["taylor1"][g.id].double(), first.abs(), rtol=1e-3, atol=1e-7), g.name
        assert torch.allclose(s.criteria["taylor2"][g.id].double(), first.abs() + 0.5 * second, rtol=1e-3, atol=1e-7)
        assert torch.allclose(element[g.id].double(), summed, rtol=1e-3, atol=1e-7), g.name
    # nothing left behind: no grads, flags as before
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())


def test_loss_gradient_through_lora_equals_merged_model() -> None:
    model, _ = build("llama", lora=True)
    x = {"input_ids": torch.zeros(1, 8, dtype=torch.long)}
    graph = shear.trace(model, x)
    merged = copy.deepcopy(model).merge_and_unload()
    mgraph = shear.trace(merged, x)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(2))
    spec = "magnitude=1,taylor1=1"
    s = compute_saliency(model, graph.pruning_groups, weights=spec, calibration_ids=ids, composites=graph.composites)
    m = compute_saliency(merged, mgraph.pruning_groups, weights=spec, calibration_ids=ids)
    by_name = {g.name.removeprefix("base_model.model."): g.id for g in graph.prunable_groups}
    assert len(by_name) == len(mgraph.prunable_groups)
    for g in mgraph.prunable_groups:
        for c in ("magnitude", "taylor1"):
            assert torch.allclose(s.criteria[c][by_name[g.name]], m.criteria[c][g.id], rtol=1e-3, atol=1e-6), (c, g.name)
    frozen = [n for n, p in model.named_parameters() if "lora_" not in n]
    assert frozen and not any(p.requires_grad for n, p in model.named_parameters() if n in frozen)


def test_activation_is_wanda_norm_of_the_owning_linear() -> None:
    lin = nn.Linear(3, 2, bias=False)
    seq = nn.Sequential(lin)

    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = seq

        def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> torch.Tensor:
            return self.net(nn.functional.one_hot(input_ids, 3).float())

    model = Wrap()
    g = PruningGroup(0, "out", (Member("net.0.weight", 0, Role.PRIMARY, _rows(2)),), 2)
    ids = torch.tensor([[0, 0, 1, 2], [0, 1, 1, 1]])
    s = compute_saliency(model, [g], weights="activation=1", calibration_ids=ids)
    counts = torch.tensor([3.0, 4.0, 1.0])  # token counts = squared input column norms of one-hot inputs
    expected = (lin.weight.detach() * counts.sqrt()).norm(dim=1)
    assert torch.allclose(s.criteria["activation"][0], expected, atol=1e-6)


@pytest.mark.parametrize(
    ("spec", "kwargs", "match"),
    [
        ("activation=1", {}, "activation criterion needs calibration data"),
        ("taylor1=1", {"gradient": "loss"}, "gradient='loss' need calibration data"),
        ("taylor2=1", {}, "no LoRA adapters for the 'lora' proxy"),
    ],
)
def test_data_criteria_without_data_raise(spec: str, kwargs: dict, match: str) -> None:
    model, _ = build("llama")
    graph = shear.trace(model, {"input_ids": torch.zeros(1, 8, dtype=torch.long)})
    with pytest.raises(DataError, match=match):
        compute_saliency(model, graph.pruning_groups, weights=spec, **kwargs)


def test_parse_weights_forms_and_errors() -> None:
    a = parse_weights("magnitude=1,cosine=0.5")
    assert a == parse_weights({"magnitude": 1, "cosine": 0.5}) == parse_weights(["magnitude=1", "cosine=0.5"])
    assert set(a) == set(CRITERIA)
    with pytest.raises(KernelError, match="unknown criterion 'size'"):
        parse_weights("size=1")
    with pytest.raises(KernelError, match="all weights are zero"):
        parse_weights("magnitude=0")
    with pytest.raises(KernelError, match="must be a number"):
        parse_weights("magnitude=big")
    assert parse_pipeline("saliency{weights=[magnitude=1,activation=2]}") == [
        Saliency(weights=("magnitude=1", "activation=2"))
    ]


def _data() -> TextData:
    g = torch.Generator().manual_seed(0)
    return TextData(None, {"a": torch.randint(0, 96, (2000,), generator=g)}, {"a": torch.randint(0, 96, (512,), generator=g)})


def test_saliency_pass_stores_scores_and_needs_data() -> None:
    model, x = build("llama")
    ctx = Context(model=model, example_inputs=x, data=_data())
    PassManager("saliency{weights=[magnitude=1,activation=1],seq_len=16,samples=4}").run(ctx)
    scores = ctx.results["saliency"]
    assert set(scores.criteria) == {"magnitude", "activation"}
    assert set(scores.by_group) == {g.id for g in ctx.results["graph"].prunable_groups}
    with pytest.raises(shear.errors.PassError, match="needs text data"):
        PassManager("saliency{weights=[activation=1]}").run(Context(model=model, example_inputs=x))


def test_taylor_pass_then_erase_equals_masked_model() -> None:
    model, x = build("llama")
    data = _data()
    pipeline = "taylor{ratio=0.3,seq_len=16,samples=4}"
    ctx = Context(model=copy.deepcopy(model), example_inputs=x, data=data)
    PassManager(["discover-groups", pipeline]).run(ctx)
    masked = ctx.model
    table = TensorTable(masked)
    for g in ctx.results["graph"].prunable_groups:
        dead = (~nonzero_structures(table, g)).nonzero().flatten()
        assert dead.tolist() == ctx.results["taylor-pruned"][g.id].tolist()
        assert dead.numel() == min(round(0.3 * g.size), g.size - 1)
        lowest = ctx.results["taylor"][g.id].argsort(stable=True)[: dead.numel()].sort().values
        assert dead.tolist() == lowest.tolist()
    small = shear.compile(model, passes=["discover-groups", pipeline, "erase"], example_inputs=x, data=data)
    report = small.shear_report
    assert report.params_after < report.params_before
    with torch.no_grad():
        diff = (small(**x).logits - masked(**x).logits).abs().max().item()
    assert diff <= 1e-5
    assert Taylor(ratio=0.3, aggregate="max").aggregate == "max"
    with pytest.raises(PipelineError, match=r"taylor: ratio must be in \[0, 1\)"):
        Taylor(ratio=1.0)
