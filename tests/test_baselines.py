"""Baseline pruners: magnitude (unstructured / N:M / structured), Wanda, SparseGPT, and their masks."""

from __future__ import annotations

import pytest
import torch
from models import build
from torch import nn

import shear
from shear.errors import DataError, KernelError, PassError, PipelineError
from shear.graph.groups import Member, PruningGroup, Role
from shear.graph.ir import Graph
from shear.kernels.calibration import StatsCollector, collect_stats, prunable_linears, target_linears
from shear.kernels.sparsegpt import sparsegpt_prune
from shear.kernels.sparsity import (
    WeightMasks,
    masks_from_zeros,
    nm_mask,
    register_mask_hooks,
    unstructured_mask,
)
from shear.passes import Context, parse_pipeline
from shear.passes.baselines.magnitude import Magnitude, prune_lowest_norm, structure_norms
from shear.passes.baselines.sparsegpt import SparseGPT
from shear.passes.baselines.wanda import Wanda, wanda_mask

CALIB = {"nsamples": 4, "seq_len": 16}


def _ids(n: int = 4, seq: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 96, (n, seq), generator=torch.Generator().manual_seed(seed))


def _run(spec: str, lora: bool = False) -> tuple[nn.Module, Context, shear.passes.PassResult]:
    model, inputs = build("llama", lora=lora)
    ctx = Context(model=model, example_inputs=inputs, data=_ids())
    (p,) = parse_pipeline(spec)
    return model, ctx, p.run(ctx)


# -- mask selection ---------------------------------------------------------------------------------


def test_wanda_mask_hand_computed() -> None:
    w = torch.tensor(
        [
            [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0],
            [8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0],
            [1.0, -1.0, 2.0, -2.0, 3.0, -3.0, 4.0, -4.0],
            [0.5, 4.0, -0.5, 3.0, 1.0, -2.0, 6.0, 0.1],
        ]
    )
    norms = torch.tensor([8.0, 1.0, 4.0, 1.0, 2.0, 1.0, 0.5, 2.0])
    # scores |W|·‖X‖: row 0 = 8 2 12 4 10 6 3.5 16; row 1 = 64 7 24 5 8 3 1 2;
    # row 2 = 8 1 8 2 6 3 2 8; row 3 = 4 4 2 3 2 2 3 0.2 -> keep the 4 largest of each row
    expected = torch.tensor(
        [
            [1, 0, 1, 0, 1, 0, 0, 1],
            [1, 1, 1, 0, 1, 0, 0, 0],
            [1, 0, 1, 0, 1, 0, 0, 1],
            [1, 1, 0, 1, 0, 0, 1, 0],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(wanda_mask(w, norms, 0.5), expected)
    # magnitude alone would keep a different set (row 0: the last four)
    assert unstructured_mask(w.abs(), 0.5, per_row=True)[0].tolist() == [False] * 4 + [True] * 4


def test_nm_mask_keeps_largest_per_group() -> None:
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 8.0, 5.0, 6.0, 7.0]])
    assert nm_mask(scores, 2, 4).int().tolist() == [[1, 0, 1, 0, 1, 0, 0, 1]]
    assert nm_mask(scores, 1, 4).int().tolist() == [[1, 0, 1, 1, 1, 0, 1, 1]]
    with pytest.raises(KernelError, match="multiple of 4"):
        nm_mask(torch.ones(2, 6), 2, 4)


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.77])
def test_unstructured_mask_exact_counts(ratio: float) -> None:
    scores = torch.randn(7, 13)
    per_row = unstructured_mask(scores, ratio, per_row=True)
    assert ((~per_row).sum(dim=1) == round(ratio * 13)).all()
    layer = unstructured_mask(scores, ratio, per_row=False)
    assert int((~layer).sum()) == round(ratio * 7 * 13)
    # the dropped ones are the lowest scores
    assert float(scores[~layer].max()) <= float(scores[layer].min())


# -- N:M and exact ratios through the passes -------------------------------------------------------------


def _check_nm(model: nn.Module, masks: WeightMasks, n: int, m: int) -> None:
    params = dict(model.named_parameters())
    assert len(masks) == 14  # 7 linears x 2 blocks
    for name, keep in masks.items():
        zeros = (~keep).reshape(keep.shape[0], -1, m).sum(dim=-1)
        assert (zeros == n).all(), name
        assert (params[name][~keep] == 0).all(), name


@pytest.mark.parametrize("pass_name", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (4, 8)])
def test_nm_exact_for_every_pass(pass_name: str, n: int, m: int) -> None:
    calib = {"magnitude": "", "wanda": ",nsamples=4,seq_len=16", "sparsegpt": ",nsamples=4,seq_len=16,blocksize=16"}[pass_name]
    model, ctx, result = _run(f"{pass_name}{{mode=nm,n={n},m={m}{calib}}}")
    _check_nm(model, ctx.results["masks"], n, m)
    assert result.stats["sparsity"] == pytest.approx(n / m)
    assert result.stats["layer_min"] == result.stats["layer_max"] == pytest.approx(n / m)


@pytest.mark.parametrize(
    ("spec", "per_row"),
    [
        ("magnitude{ratio=0.3,mode=unstructured}", False),
        ("magnitude{ratio=0.3,mode=unstructured,per_row=true}", True),
        ("wanda{ratio=0.3,nsamples=4,seq_len=16}", True),
        ("wanda{ratio=0.3,per_row=false,nsamples=4,seq_len=16}", False),
        ("sparsegpt{ratio=0.3,nsamples=4,seq_len=16,blocksize=24}", False),
        ("sparsegpt{ratio=0.3,per_row=true,nsamples=4,seq_len=16,blocksize=24}", True),
    ],
)
def test_unstructured_ratio_exact(spec: str, per_row: bool) -> None:
    model, ctx, _ = _run(spec)
    params = dict(model.named_parameters())
    for name, keep in ctx.results["masks"].items():
        w = params[name]
        assert (w[~keep] == 0).all()
        if per_row:
            assert ((~keep).sum(dim=1) == round(0.3 * w.shape[1])).all(), name
        else:
            assert int((~keep).sum()) == round(0.3 * w.numel()), name


# -- SparseGPT reconstructs better than magnitude --------------------------------------------------------


def _recon(w: torch.Tensor, w_hat: torch.Tensor, x: torch.Tensor) -> float:
    return float(((x @ w.T - x @ w_hat.T) ** 2).sum())


@pytest.mark.parametrize("mode", ["unstructured", "nm"])
def test_sparsegpt_beats_magnitude_on_correlated_inputs(mode: str) -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=g)
    # inputs with a strong rank-4 correlation, a mean, and a little noise
    x = torch.randn(512, 4, generator=g) @ (3 * torch.randn(4, 64, generator=g))
    x = x + 0.1 * torch.randn(512, 64, generator=g) + torch.randn(64, generator=g)
    h = 2 * x.T @ x / x.shape[0]
    if mode == "nm":
        mag = w * nm_mask(w.abs(), 2, 4)
        res = sparsegpt_prune(w, h, n=2, m=4, blocksize=16)
    else:
        mag = w * unstructured_mask(w.abs(), 0.5)
        res = sparsegpt_prune(w, h, 0.5, blocksize=16)
    assert int((~res.keep).sum()) == w.numel() // 2
    e_mag, e_sg = _recon(w, mag, x), _recon(w, res.weight, x)
    assert e_sg <= e_mag
    assert e_sg < 0.2 * e_mag  # measured: 0.03 (unstructured), 0.10 (2:4)


def test_sparsegpt_beats_magnitude_on_a_tiny_llama_layer() -> None:
    model, _ = build("llama")
    layer = model.model.layers[1].mlp.down_proj
    xs: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda mod, args, out: xs.append(args[0].detach().reshape(-1, args[0].shape[-1])))
    stats = collect_stats(model, _ids(8, 16), {"down": layer}, hessian=True)
    handle.remove()
    x = torch.cat(xs)
    assert stats["down"].count == x.shape[0] == 128
    torch.testing.assert_close(stats["down"].hessian, 2 * x.T @ x / x.shape[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(stats["down"].col_norms.float(), x.norm(dim=0))
    w = layer.weight.detach()
    for ratio in (0.3, 0.5, 0.7):
        res = sparsegpt_prune(w, stats["down"].hessian, ratio, blocksize=32)
        mag = w * unstructured_mask(w.abs(), ratio)
        wanda = w * wanda_mask(w, stats["down"].col_norms, ratio)
        e_sg, e_mag, e_wanda = _recon(w, res.weight, x), _recon(w, mag, x), _recon(w, wanda, x)
        assert e_sg <= e_mag and e_sg <= e_wanda, (ratio, e_sg, e_wanda, e_mag)


def test_sparsegpt_dead_columns() -> None:
    w = torch.randn(4, 8)
    x = torch.randn(32, 8)
    x[:, 3] = 0  # input 3 never fires
    res = sparsegpt_prune(w, 2 * x.T @ x / 32, 0.25, blocksize=4)
    assert not res.keep[:, 3].any() and (res.weight[:, 3] == 0).all()


# -- structured magnitude and erase ------------------------------------------------------------------------


def test_structured_magnitude_zeros_lowest_norm_structures() -> None:
    model = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 2))
    scale = torch.tensor([5.0, 0.1, 3.0, 0.2, 4.0, 0.3])  # channel norms follow this scale
    with torch.no_grad():
        model[0].weight.copy_(torch.ones(6, 3) * scale[:, None])
        model[0].bias.copy_(scale)
        model[2].weight.copy_(torch.ones(2, 6) * scale[None, :])
    pos = torch.arange(6).view(6, 1)
    group = PruningGroup(
        0,
        "hidden",
        (
            Member("0.weight", 0, Role.PRIMARY, pos),
            Member("0.bias", 0, Role.PRIMARY, pos),
            Member("2.weight", 1, Role.SECONDARY, pos),
        ),
        6,
    )
    # 3 row entries + 1 bias + 2 consumer entries per channel, all equal to the scale
    torch.testing.assert_close(structure_norms(model, group), scale.double() * 6**0.5)
    chosen = prune_lowest_norm(model, (group,), 0.5)
    assert chosen[0].tolist() == [1, 3, 5]
    alive = model[0].weight.ne(0).any(dim=1)
    assert alive.tolist() == [True, False, True, False, True, False]
    assert (model[0].bias[[1, 3, 5]] == 0).all()
    assert (model[2].weight != 0).all()  # secondary slices are left for erase
    assert prune_lowest_norm(model, (group,), 0.99)[0].numel() == 5  # one structure stays


def test_structured_magnitude_then_erase_equals_masked() -> None:
    model, inputs = build("llama")
    masked = shear.compile(model, ["discover-groups", "magnitude{ratio=0.3,mode=structured}"], example_inputs=inputs)
    small = shear.compile(
        model, ["discover-groups", "magnitude{ratio=0.3,mode=structured}", "erase"], example_inputs=inputs
    )
    report = small.shear_report
    assert report.params_after < 0.8 * report.params_before
    with torch.no_grad():
        diff = (small(**inputs).logits - masked(**inputs).logits).abs().max()
    assert float(diff) <= 1e-5
    # model untouched by compile; masked copy keeps the structure masks
    assert all(p.ne(0).all() for n, p in model.named_parameters() if n.endswith("proj.weight"))


def test_structured_masks_and_lora() -> None:
    model, inputs = build("llama", lora=True)
    ctx = Context(model=model, example_inputs=inputs)
    from shear.passes.core.discover import DiscoverGroups

    DiscoverGroups().run(ctx)
    lora_before = {n: p.clone() for n, p in model.named_parameters() if "lora_A" in n}
    result = Magnitude(ratio=0.25, mode="structured").run(ctx)
    assert result.changed and result.stats["structures"] > 0
    masks = ctx.results["masks"]
    assert masks.holds(model) and masks.sparsity().total > 0
    assert any("lora_B" in n for n in masks)  # the B rows of zeroed structures stay zero
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], p) for n, p in lora_before.items())


# -- pipeline strings, peft LoRA, data ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    ["magnitude{ratio=0.5,mode=unstructured}", "wanda{ratio=0.5,nsamples=4,seq_len=16}", "sparsegpt{ratio=0.5,nsamples=4,seq_len=16}"],
)
def test_passes_on_peft_lora_prune_base_only(spec: str) -> None:
    model, inputs = build("llama", lora=True)
    lora = {n: p.clone() for n, p in model.named_parameters() if "lora_" in n}
    small = shear.compile(model, spec, example_inputs=inputs, data=_ids())
    params = dict(small.named_parameters())
    assert all(torch.equal(params[n], p) for n, p in lora.items())  # LoRA untouched
    base = [n for n in params if n.endswith("base_layer.weight")]
    assert len(base) == 14
    for n in base:
        assert float((params[n] == 0).float().mean()) == pytest.approx(0.5, abs=0.01), n
    assert params["base_model.model.lm_head.weight"].ne(0).all()  # lm_head stays dense
    rec = small.shear_report.passes[-1]
    assert rec.stats["sparsity"] == pytest.approx(0.5)
    assert small(**inputs).logits.isfinite().all()


def test_wanda_reads_text_data() -> None:
    from shear.data import TextData

    model, inputs = build("llama")
    data = TextData(tokenizer=None, train={"a": _ids(1, 400).flatten(), "b": _ids(1, 400, seed=1).flatten()})
    small = shear.compile(model, "wanda{ratio=0.5,nsamples=4,seq_len=16}", example_inputs=inputs, data=data)
    assert small.shear_report.passes[-1].stats["layers"] == 14


def test_sequential_calibration_sees_pruned_inputs() -> None:
    """Block 1's statistics come from the pruned block 0, so a sequential run differs from a dense one."""
    model, _ = build("llama")
    dense = collect_stats(model, _ids())  # before pruning; target_linears by default
    seen: dict[str, torch.Tensor] = {}

    from shear.kernels.calibration import sequential_prune

    def prune(name: str, layer: nn.Linear, stats: object) -> None:
        seen[name] = stats.col_norms.clone()  # type: ignore[attr-defined]
        with torch.no_grad():
            layer.weight.mul_(unstructured_mask(layer.weight.abs(), 0.5))

    done = sequential_prune(model, _ids(), prune, batch_size=2)
    assert done == list(target_linears(model))
    first = "model.layers.0.self_attn.q_proj"
    torch.testing.assert_close(seen[first], dense[first].col_norms)  # block 0 sees the dense input
    late = "model.layers.1.self_attn.q_proj"
    assert not torch.allclose(seen[late], dense[late].col_norms)


def test_prunable_linears_of_a_lora_model() -> None:
    model, _ = build("llama", lora=True)
    names = list(target_linears(model))
    assert len(names) == 14 and all(n.endswith(".base_layer") for n in names)
    assert not any("lora" in n for n in prunable_linears(model))


# -- masks ---------------------------------------------------------------------------------------------------


def test_mask_hooks_keep_pruned_weights_zero_during_training() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    x, y = torch.randn(16, 8), torch.randn(16, 1)
    # optimizer state from before pruning: Adam moments would move pruned weights without the hooks
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    opt.zero_grad()
    masks = WeightMasks({"0.weight": unstructured_mask(model[0].weight.abs(), 0.5)})
    with register_mask_hooks(model, masks, opt):
        for _ in range(5):
            nn.functional.mse_loss(model(x), y).backward()
            assert (model[0].weight.grad[~masks["0.weight"]] == 0).all()
            opt.step()
            opt.zero_grad()
            assert masks.holds(model)
    assert masks_from_zeros(model, ["0.weight"])["0.weight"].equal(masks["0.weight"])
    nn.functional.mse_loss(model(x), y).backward()  # hooks removed: gradients flow again
    assert (model[0].weight.grad[~masks["0.weight"]] != 0).any()


def test_weight_masks_mapping_and_errors() -> None:
    lin = nn.Linear(4, 2)
    a = WeightMasks({"weight": torch.tensor([[True, False, True, True]] * 2)})
    b = WeightMasks({"weight": torch.tensor([[True, True, False, True]] * 2), "bias": torch.tensor([True, False])})
    both = a | b
    assert both["weight"].sum() == 4 and set(both) == {"weight", "bias"} and both.masks is not None
    assert both.sparsity().total == pytest.approx(5 / 10)
    with pytest.raises(KernelError, match="must be a bool tensor"):
        WeightMasks({"weight": torch.ones(2, 4)})
    with pytest.raises(KernelError, match="does not have"):
        WeightMasks({"nope": torch.ones(2, dtype=torch.bool)}).apply(lin)
    with pytest.raises(KernelError, match="has shape"):
        WeightMasks({"weight": torch.ones(4, 2, dtype=torch.bool)}).apply(lin)


def test_stats_collector_matches_manual() -> None:
    lin = nn.Linear(5, 3)
    x = torch.randn(2, 7, 5)
    with StatsCollector({"lin": lin}, hessian=True, dtype=torch.float64) as col:
        lin(x)
    flat = x.reshape(-1, 5).double()
    torch.testing.assert_close(col.stats["lin"].hessian, 2 * flat.T @ flat / 14)
    torch.testing.assert_close(col.stats["lin"].col_norms, flat.norm(dim=0))


# -- errors --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("magnitude{ratio=1.5}", r"magnitude: ratio must be in \(0, 1\), got 1.5"),
        ("magnitude{ratio=0}", r"magnitude: ratio must be in \(0, 1\)"),
        ("wanda{ratio=-0.2}", r"wanda: ratio must be in \(0, 1\)"),
        ("sparsegpt{ratio=1.0}", r"sparsegpt: ratio must be in \(0, 1\)"),
        ("magnitude{mode=nm,n=4,m=4}", r"magnitude: N:M sparsity needs integers 0 < n < m, got n=4, m=4"),
        ("wanda{mode=nm,n=0}", r"0 < n < m"),
        ("sparsegpt{mode=nm,n=2,m=4,blocksize=30}", r"blocksize \(30\) must be a multiple of m \(4\)"),
        ("sparsegpt{percdamp=-1}", r"percdamp must be >= 0"),
        ("wanda{mode=structured}", r"mode"),
        ("magnitude{mode=random}", r"mode"),
        ("magnitude{mode=structured,round_to=-1}", r"round_to must be >= 0 \(0: from the target\)"),
    ],
)
def test_bad_options(spec: str, match: str) -> None:
    with pytest.raises(PipelineError, match=match):
        parse_pipeline(spec)


def test_missing_data_is_a_data_error() -> None:
    model, _ = build("llama")
    for p in (Wanda(), SparseGPT()):
        with pytest.raises(DataError, match=f"pass '{p.name}' needs text data"):
            p.run(Context(model=model))
    with pytest.raises(DataError, match=r"must be \[n, seq_len\] long"):
        Wanda().run(Context(model=model, data=torch.zeros(4, 8)))


def test_no_decoder_blocks_named_in_the_error() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(PassError, match="no decoder blocks"):
        shear.compile(model, "wanda{nsamples=2,seq_len=4}", example_inputs=(torch.randn(1, 4),), data=_ids(2, 4))


def test_structured_mode_requires_graph() -> None:
    assert Magnitude(mode="structured").requires == Magnitude().requires == Magnitude.requires == (Graph,)
    assert Magnitude(mode="unstructured").requires == Magnitude(mode="nm").requires == ()
    model, inputs = build("llama")
    small = shear.compile(model, "magnitude{ratio=0.25},erase", example_inputs=inputs)  # structured by default
    assert [p.name for p in small.shear_report.passes][:2] == ["discover-groups", "magnitude"]


# -- LLM-Pruner's MLP baseline: taylor{kinds=[channel]} -------------------------------------------------


def test_taylor_channels_only_is_llm_pruners_mlp_cut() -> None:
    """``taylor{kinds=[channel]}`` cuts the same count of channels from every MLP, chosen by LLM-Pruner's
    first-order importance ``Σ |W ⊙ dL/dW|`` over gate and up rows and the down column (computed here
    by hand from the HF attribute names, the reference), and leaves heads and the residual alone."""
    import copy

    from shear.passes.manager import PassManager

    model, inputs = build("llama")
    ids = _ids(n=8)
    ctx = Context(model=model, example_inputs=inputs, data=ids)
    reference = copy.deepcopy(model)
    PassManager(parse_pipeline("discover-groups,taylor{ratio=0.25,kinds=[channel],samples=8,seq_len=16}")).run(ctx)
    graph, chosen = ctx.get(Graph), ctx.results["taylor-pruned"]
    assert {graph.pruning_groups[g].kind for g in chosen} == {"channel"}
    mlps = [layer.mlp for layer in reference.model.layers]
    assert len(chosen) == len(mlps)
    for p in reference.parameters():
        p.requires_grad_(False)
    for m in mlps:
        for lin in (m.gate_proj, m.up_proj, m.down_proj):
            lin.weight.requires_grad_(True)
    for i in range(0, 8, 4):
        reference(input_ids=ids[i : i + 4], labels=ids[i : i + 4]).loss.backward()
    for m, (_gid, idx) in zip(mlps, sorted(chosen.items())):
        g, u, d = m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight
        score = (g * g.grad).abs().sum(1) + (u * u.grad).abs().sum(1) + (d * d.grad).abs().sum(0)
        n = round(0.25 * score.numel())
        assert idx.numel() == n and idx.tolist() == score.argsort()[:n].sort().values.tolist()
    untouched = [gr for gr in graph.prunable_groups if gr.kind != "channel"]
    assert untouched and all(gr.id not in chosen for gr in untouched)


def test_taylor_kinds_are_checked() -> None:
    with pytest.raises(PipelineError, match="kinds must be some of"):
        parse_pipeline("taylor{kinds=[mlp]}")
    with pytest.raises(PipelineError, match="counts channels and heads"):
        parse_pipeline("taylor{params=0.2,kinds=[residual]}")
