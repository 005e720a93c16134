"""The target (shear.model.target): where the model will run sets the width steps and the layout.

Real tiny LLaMAs with MLP widths of 1024 (so 256-steps bite), real sweeps on this CPU (tiny ones),
and the parameter budget's promise under coarse steps.
"""

from __future__ import annotations

import doctest
import importlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hand_groups import tiny_llama

import shear
from shear.cli import main
from shear.errors import InputError, KernelError, PipelineError
from shear.graph import trace
from shear.io.width_cache import GRANULARITY_ENV, cache_key, device_granularity, read_width_table
from shear.kernels.allocation import ParamBudget, base_param_count
from shear.kernels.widths import GRANULARITIES, WidthTable, measure_widths, pick_granularity, sweep_widths
from shear.model.target import Target, layout_selection, parse_target, resolve_target, round_steps

TOL = 0.005


def _wide(layers: int = 8, seed: int = 0) -> torch.nn.Module:
    """A LLaMA whose MLP is 1024 wide (four 256-steps) and whose MLPs hold most parameters."""
    return tiny_llama(hidden_size=32, intermediate_size=1024, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, seed=seed)  # fmt: skip


def _x() -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))}


def _mlp_widths(model: torch.nn.Module) -> list[int]:
    return [layer.mlp.up_proj.out_features for layer in model.model.layers]


def _kv_heads(model: torch.nn.Module) -> list[int]:
    return [layer.self_attn.k_proj.out_features // 8 for layer in model.model.layers]


@pytest.mark.parametrize("name", ["shear.model.target", "shear.kernels.widths", "shear.io.width_cache", "shear.io.targets"])
def test_doctests(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


# -- parsing -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "fmt", "dev"), [
    ("auto", "auto", "auto"), ("cuda", "auto", "cuda"), ("hf", "hf", "auto"), ("nas,cuda", "nas", "cuda"),
    ("gguf, cpu", "gguf", "cpu"), ("CPU,Shear", "shear", "cpu"), ("cuda:1,auto", "auto", "cuda"), (None, "auto", "auto"),
])  # fmt: skip
def test_parse_target(spec: str | None, fmt: str, dev: str) -> None:
    t = parse_target(spec)
    assert (t.format, t.device) == (fmt, dev) and not t.resolved
    assert parse_target(t) is t


@pytest.mark.parametrize(("spec", "match"), [
    ("tpu", r"unknown word 'tpu'; give a format \(auto, hf, nas, gguf, shear\) and/or a device \(auto, cpu, cuda\)"),
    ("hf,nas", r"names two formats \(hf, nas\)"),
    ("cpu,cuda", r"names two devices \(cpu, cuda\)"),
    (" , ", r"is empty; give a format \(auto, hf, nas, gguf, shear\)"),
])  # fmt: skip
def test_parse_errors_name_the_allowed_words(spec: str, match: str) -> None:
    with pytest.raises(InputError, match=match):
        parse_target(spec)


def test_target_checks_itself() -> None:
    with pytest.raises(InputError, match="target format 'onnx' is not one of auto, hf, nas, gguf, shear"):
        Target("onnx")
    with pytest.raises(InputError, match="device_granularity must be an integer >= 0"):
        Target("hf", "cpu", -8)
    with pytest.raises(InputError, match="target must be text"):
        parse_target(3)  # type: ignore[arg-type]


# -- granularity and layout --------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "device_g", "channel", "residual", "shared"), [
    ("shear", 8, 8, 8, ()), ("hf", 64, 64, 64, ("channel", "head", "residual")), ("nas", 8, 256, 8, ("head",)),
    ("nas", 96, 768, 96, ("head",)), ("gguf", 1, 256, 256, ()),
])  # fmt: skip
def test_granularity_is_the_lcm_of_device_and_format(fmt: str, device_g: int, channel: int, residual: int,
                                                     shared: tuple[str, ...]) -> None:  # fmt: skip
    t = Target(fmt, "cpu", device_g, "measured")
    assert (t.granularity("channel"), t.granularity("residual"), t.granularity("head")) == (channel, residual, 1)
    assert set(shared) <= set(t.shared_kinds) and (not shared or t.shared_kinds)
    assert t.to_dict()["granularity"]["channel"] == channel


def test_the_target_picks_the_granularity_from_the_table() -> None:
    """The device step is the smallest class within tolerance of the best; the target multiplies it
    with the format's step."""
    table = {1: 3.1e-9, 8: 1.9e-9, 16: 1.02e-9, 32: 1.0e-9, 64: 1.0e-9, 128: 1.01e-9, 256: 1.0e-9}
    g = pick_granularity(table)
    assert g == 16 and pick_granularity(table, tolerance=0.0) == 32
    t = resolve_target("shear,cpu", torch.nn.Linear(2, 2), nas_refusal="n/a", measure=lambda dev, dt: (g, "measured"))
    assert t.granularity("channel") == 16 and t.describe().startswith("target shear,cpu: MLP widths in multiples of 16")
    seen: list[tuple[str, torch.dtype]] = []
    t = resolve_target("auto", torch.nn.Linear(2, 2).to(torch.bfloat16), nas_refusal=None,
                       measure=lambda dev, dt: seen.append((dev, dt)) or (4, "cached"))  # fmt: skip
    assert (t.format, t.device, t.device_granularity) == ("nas", "cpu", 4) and seen == [("cpu", torch.bfloat16)]
    assert "auto format: nas" in t.format_source and t.granularity("channel") == 256
    t = resolve_target("auto", torch.nn.Linear(2, 2), nas_refusal="not a LLaMA", measure=lambda dev, dt: (1, "x"))
    assert t.format == "shear" and "nas: not a LLaMA" in t.format_source
    meta = resolve_target("cpu", None, nas_refusal="n/a", measure=lambda dev, dt: (1, "x"), device="meta")
    assert meta.device == "cpu"


def test_auto_format_is_nas_only_where_whole_256_steps_fit() -> None:
    from shear.io.targets import nas_fit, target_for
    from shear.zoo import load_tiny_llama

    assert nas_fit(_wide(2)) is None and target_for("auto", _wide(2)).format == "nas"
    assert nas_fit(load_tiny_llama().model) == "MLP width 384 is not a multiple of 256"
    assert target_for("auto", torch.nn.Linear(2, 2)).format == "shear"
    assert "not a transformers model" in (nas_fit(torch.nn.Linear(2, 2)) or "")


def test_round_steps_explicit_round_to_overrides_the_target() -> None:
    graph = trace(_wide(2), _x())
    target = Target("gguf", "cpu", 1)
    steps = round_steps(target, graph.prunable_groups, 0)
    assert isinstance(steps, dict)
    assert {graph.pruning_groups[g].kind: s for g, s in steps.items()} == {"channel": 256, "head": 1, "residual": 256}
    assert round_steps(target, graph.prunable_groups, 8) == 8 and round_steps(None, graph.prunable_groups, 0) == 1


# -- the sweep and its cache ---------------------------------------------------------------------


def test_a_tiny_sweep_measures_every_class() -> None:
    table = measure_widths("cpu", torch.float32, base=512, inner=64, tokens=4, repeats=2)
    assert set(table.per_column) == set(GRANULARITIES) | {256}
    assert all(t > 0 for t in table.per_column.values()) and table.granularity in table.per_column
    assert table.widths == sweep_widths(512)
    assert all(w % g == 0 and (g == 256 or w % (2 * g)) for g, ws in table.widths.items() for w in ws if g < 256)
    assert table.granularity == pick_granularity(table.per_column, table.tolerance)
    assert "multiples of" in table.format() and table.seconds < 30
    with pytest.raises(KernelError, match="multiple of 256 and at least 512"):
        sweep_widths(500)
    with pytest.raises(KernelError, match="meta device"):
        measure_widths("meta", torch.float32)


def _fake_sweep(granularities: list[int]) -> Callable[..., WidthTable]:
    """A sweep that answers the given granularities in turn (the timing itself is tested above)."""
    answers = iter(granularities)

    def measure(device: str, dtype: torch.dtype, **_: object) -> WidthTable:
        g = next(answers)
        return WidthTable(device="x", dtype=str(dtype), torch=torch.__version__, granularity=g, base=512, inner=8,
                          tokens=1, tolerance=0.03, per_column={g: 1e-9}, widths={g: [512 - g]})  # fmt: skip

    return measure


def test_device_granularity_is_measured_once_then_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(GRANULARITY_ENV, raising=False)
    assert device_granularity("cpu", torch.float32, cache_dir=tmp_path, measure=_fake_sweep([16, 16])) == (16, "measured")
    key = cache_key("cpu", torch.float32)
    assert "float32" in key and torch.__version__ in key
    assert read_width_table(key, tmp_path).granularity == 16  # type: ignore[union-attr]
    assert device_granularity("cpu", torch.float32, cache_dir=tmp_path, measure=_fake_sweep([])) == (16, "cached")
    (entry,) = (tmp_path / "widths").iterdir()
    entry.write_text("{not json")  # an unreadable entry is measured again, and replaced
    assert device_granularity("cpu", torch.float32, cache_dir=tmp_path, measure=_fake_sweep([8, 8])) == (8, "measured")
    assert json.loads(entry.read_text())["key"] == key
    other = device_granularity("cpu", torch.bfloat16, cache_dir=tmp_path, measure=_fake_sweep([1, 64]))
    assert other == (64, "measured twice, unequal (busy machine): not cached")  # the coarser, and not kept
    assert read_width_table(cache_key("cpu", torch.bfloat16), tmp_path) is None
    real = device_granularity("cpu", torch.float32, cache_dir=tmp_path / "real", base=512, inner=64, tokens=4, repeats=1)
    assert real[0] in set(GRANULARITIES) | {256} and real[1].startswith("measured")
    if not torch.cuda.is_available():
        g, how = device_granularity("cuda", torch.bfloat16, cache_dir=tmp_path)
        assert g == 64 and "no CUDA device here" in how


def test_the_environment_pins_the_granularity(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(GRANULARITY_ENV, "32")
    assert device_granularity("cpu", torch.float32, cache_dir=tmp_path) == (32, f"pinned by {GRANULARITY_ENV}")
    assert not (tmp_path / "widths").exists()
    for bad in ("eight", "0", "-4"):
        monkeypatch.setenv(GRANULARITY_ENV, bad)
        with pytest.raises(InputError, match=f"{GRANULARITY_ENV}='{bad}': give a positive integer width step"):
            device_granularity("cpu", torch.float32)


# -- widths honour the target, and the budget still holds -----------------------------------------


@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
def test_budget_widths_honour_the_target_and_the_budget_holds(ratio: float) -> None:
    """``magnitude{params=...}`` (the parameter budget LHSPG uses) with a gguf target: every MLP keeps a
    multiple of 256 and the reduction is within the tolerance below the ratio plus one step above it."""
    model = _wide()
    before = base_param_count(model)
    small = shear.compile(model, f"magnitude{{mode=structured,params={ratio}}},erase", example_inputs=_x(),
                          target="gguf,cpu")  # fmt: skip
    widths = _mlp_widths(small)
    assert all(w % 256 == 0 for w in widths), widths
    step = 256 * 3 * 32 / before  # one 256-channel step of one MLP, as a share of the parameters
    got = 1 - base_param_count(small) / before
    assert ratio - TOL <= got < ratio - TOL + step, (got, widths)
    assert small.shear_report.target["granularity"]["channel"] == 256
    assert not any("off" in w for w in small.shear_report.warnings)


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.6])
def test_per_group_widths_honour_the_target(ratio: float) -> None:
    small = shear.compile(_wide(4), f"random{{ratio={ratio},seed=0,kinds=[channel]}},erase", example_inputs=_x(),
                          target="nas,cpu")
    assert all(w % 256 == 0 for w in _mlp_widths(small)) and small.shear_report.target["format"] == "nas"
    keep = max(256, round((1024 - round(ratio * 1024)) / 256) * 256)
    assert _mlp_widths(small) == [keep] * 4


def test_nas_holds_mlp_widths_only() -> None:
    """A named nas target refuses a pipeline that prunes heads or the hidden width before any pass runs;
    ``auto`` picks a format that holds them (per-layer shear folders) instead."""
    with pytest.raises(PipelineError, match=r"--target nas: nas holds per-layer MLP widths and whole blocks only; "
                                            r"the pipeline may prune (expert, )?head, residual"):
        shear.compile(_wide(2), "random{ratio=0.3,seed=0},erase", example_inputs=_x(), target="nas,cpu")
    small = shear.compile(_wide(2), "random{ratio=0.3,seed=0},erase", example_inputs=_x(), target="auto")
    assert small.shear_report.target["format"] == "shear"
    assert "the pipeline may prune" in small.shear_report.target["format_source"]
    channels = shear.compile(_wide(2), "random{ratio=0.3,seed=0,kinds=[channel]},erase", example_inputs=_x())
    assert channels.shear_report.target["format"] == "nas"


def test_explicit_round_to_overrides_the_target() -> None:
    small = shear.compile(_wide(4), "random{ratio=0.3,seed=0,round_to=8},erase", example_inputs=_x(), target="gguf,cpu")
    widths = _mlp_widths(small)
    assert widths == [720] * 4 and all(w % 8 == 0 for w in widths) and widths[0] % 256
    untargeted = shear.compile(_wide(4), "random{ratio=0.3,seed=0},erase", example_inputs=_x(), target=None)
    assert _mlp_widths(untargeted) == [717] * 4 and untargeted.shear_report.target is None


def test_hf_target_gives_equal_widths_in_every_layer() -> None:
    """Scores differ per layer; the hf layout keeps every layer's MLP width and kv-head count equal,
    so the config's single intermediate_size describes the model."""
    small = shear.compile(_wide(seed=3), "magnitude{mode=structured,params=0.3},erase", example_inputs=_x(),
                          target="hf,cpu")  # fmt: skip
    assert len(set(_mlp_widths(small))) == 1 and len(set(_kv_heads(small))) == 1
    assert small.config.intermediate_size == _mlp_widths(small)[0]
    graph = trace(_wide(seed=3), _x())
    groups = [g for g in graph.prunable_groups if g.kind == "channel"]
    budget = ParamBudget(_wide(seed=3), groups)
    scores = {g.id: torch.rand(g.size, generator=torch.Generator().manual_seed(g.id)) * (1 + g.id % 3) for g in groups}
    loose = budget.counts(0.3, scores, selection="global")
    assert len({loose[g.id] for g in groups}) > 1  # a selection without the layout: widths differ per layer
    selection, equal = layout_selection(Target("hf", "cpu", 1), "auto")
    counts = budget.counts(0.3, scores, selection=selection, equal=equal)
    assert len({counts[g.id] for g in groups}) == 1 and budget.reduction(counts) >= 0.3 - TOL


def test_nas_target_gives_equal_head_counts() -> None:
    """Global selection ranks heads across layers (unequal counts); the nas layout evens each class of
    kv-head families and tops it up a whole class at a time."""
    model = _wide(seed=5)
    graph = trace(model, _x())
    groups = [g for g in graph.prunable_groups if g.kind in ("channel", "head")]
    gen = torch.Generator().manual_seed(0)
    scores = {g.id: torch.rand(g.size, generator=gen) * (1 + g.id % 3) for g in groups}
    budget = ParamBudget(model, groups)
    target = Target("nas", "cpu", 1)
    steps = round_steps(target, groups, 0)
    heads = [g.id for g in groups if g.kind == "head"]
    loose = budget.counts(0.3, scores, selection="global", round_to=steps)
    assert len({loose[g] for g in heads}) > 1  # the check below can fail
    counts = budget.counts(0.3, scores, selection="global", round_to=steps, equal=target.shared_kinds)
    assert len({counts[g] for g in heads}) == 1
    assert budget.reduction(counts) >= 0.3 - TOL
    assert not budget.off_grid(counts, steps)


def test_int_round_to_is_strict_and_a_target_gives_way_on_a_small_model() -> None:
    """One 256-step is a large share of a two-layer model: an explicit round_to=256 stays short of the
    target; the target's steps give way to single channels so the parameter target holds."""
    model = _wide(2)
    graph = trace(model, _x())
    groups = [g for g in graph.prunable_groups if g.kind == "channel"]
    budget = ParamBudget(model, groups)
    strict = budget.counts(0.72, {}, round_to=256)  # whole steps reach 69.6% at most
    assert all((g.size - strict[g.id]) % 256 == 0 for g in groups)
    steps = round_steps(Target("gguf", "cpu", 1), groups, 0)
    counts = budget.counts(0.72, {}, round_to=steps)
    assert budget.reduction(counts) >= 0.72 - TOL > budget.reduction(strict)
    assert budget.off_grid(counts, steps) and not budget.off_grid(strict, 256)


def test_lhspg_takes_steps_and_layout_from_the_target() -> None:
    from shear.data import TextData
    from shear.zoo import load_tiny_llama

    model, tok, _, _ = load_tiny_llama()
    data = TextData.from_corpus(tok, max_train_chars=20_000, max_val_chars=4_000)
    spec = "lhspg{ratio=0.2,periods=1,steps_per_period=1,batch_size=1,seq_len=32,calibration=2},erase,merge-lora"
    x = {"input_ids": torch.arange(16).view(1, 16)}
    small = shear.compile(model, spec, example_inputs=x, data=data, target="hf,cpu")
    widths = [layer.mlp.up_proj.out_features for layer in small.model.layers]
    assert len(set(widths)) == 1  # hf: shared
    assert abs(1 - base_param_count(small) / base_param_count(model) - 0.2) <= 0.01
    gguf = shear.compile(model, spec, example_inputs=x, data=data, target="gguf,cpu")
    assert abs(1 - base_param_count(gguf) / base_param_count(model) - 0.2) <= 0.01  # 384 wide: off the 256-steps
    assert any("keep widths off them" in w for w in gguf.shear_report.warnings)


# -- plan and prune agree --------------------------------------------------------------------------


def test_plan_and_prune_agree_on_what_ratio_removes(tmp_path: Path) -> None:
    """``shear plan --ratio 0.2`` and a prune at ratio 0.2 (LHSPG's parameter budget) of the same
    config remove the same share of the parameters, and widths in the same target's steps."""
    from shear.data import TextData
    from shear.zoo import TINY_LLAMA_DIR, load_tiny_llama

    model, tok, _, _ = load_tiny_llama()
    for target in ("shear,cpu", "auto"):
        p = shear.plan(TINY_LLAMA_DIR, 0.2, target=target)
        data = TextData.from_corpus(tok, max_train_chars=20_000, max_val_chars=4_000)
        small = shear.compile(model, "lhspg{ratio=0.2,periods=1,steps_per_period=1,batch_size=1,seq_len=32,calibration=2},"
                              "erase,merge-lora", example_inputs={"input_ids": torch.arange(16).view(1, 16)}, data=data,
                              target=target)  # fmt: skip
        planned = 1 - p.params_after / p.params_before
        pruned = 1 - base_param_count(small) / base_param_count(model)
        assert p.params_before == base_param_count(model)
        assert abs(planned - 0.2) <= TOL and abs(pruned - 0.2) <= TOL and abs(planned - pruned) <= 2 * TOL, (planned, pruned)
        assert p.target == small.shear_report.target["describe"]


# -- command line -----------------------------------------------------------------------------------


def test_cli_prune_prints_the_target(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _wide(2)
    model.save_pretrained(tmp_path / "m")
    args = ["prune", str(tmp_path / "m"), "--passes", "random{ratio=0.3,seed=0},erase", "--data", "none"]
    assert main([*args, "-o", str(tmp_path / "out"), "--target", "gguf,cpu"]) == 0
    err = capsys.readouterr().err
    assert f"target gguf,cpu: MLP widths in multiples of 256 (gguf k-quant blocks 256; cpu 1, pinned by {GRANULARITY_ENV})" in err
    assert shear.load(tmp_path / "out").model.layers[0].mlp.up_proj.weight.shape[0] == 768
    assert main([*args, "-o", str(tmp_path / "bad"), "--target", "tpu"]) == 1
    assert "unknown word 'tpu'; give a format (auto, hf, nas, gguf, shear)" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_cli_plan_and_export_targets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _wide(2)
    model.save_pretrained(tmp_path / "m")
    assert main(["plan", str(tmp_path / "m"), "--ratio", "0.2", "--target", "hf,cpu", "--world-size", "1"]) == 0
    out = capsys.readouterr().out
    assert "target hf,cpu: MLP widths unrounded (cpu 1, pinned by" in out and "share of the parameters" in out
    assert main(["plan", str(tmp_path / "m"), "--ratio", "0.2", "--group-ratio", "0.2"]) == 1
    assert "not both" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "m"), "-o", str(tmp_path / "m.gguf"), "--target", "nas"]) == 1
    assert "export writes gguf (--format gguf)" in capsys.readouterr().err
    with pytest.raises(PipelineError, match=r"round_to must be >= 0 \(0: from the target\)"):
        shear.passes.resolve_pipeline("lhspg{round_to=-1}")


def test_stream_prune_and_plan_remove_the_same_share_of_parameters(tmp_path: Path) -> None:
    """``stream-prune --ratio`` and ``plan --ratio`` take the same counts from the parameter budget, in
    the target's steps (1024-wide LLaMA MLPs: nas, multiples of 256)."""
    _wide(4).save_pretrained(tmp_path / "src")
    report = shear.prune_streamed(tmp_path / "src", tmp_path / "out", 0.3)
    planned = shear.plan(tmp_path / "src", 0.3)
    assert report.params_after == planned.params_after and report.target == planned.target
    assert "target nas," in report.target and "of the parameters" in report.format()
    widths = _mlp_widths(shear.load(tmp_path / "out"))
    assert all(w % 256 == 0 for w in widths), widths
    step = 256 * 3 * 32 / report.params_before
    assert 0.3 - TOL <= 1 - report.params_after / report.params_before < 0.3 - TOL + step
