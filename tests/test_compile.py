"""shear.compile: pipelines by object / string / file agree, the report, verify, inplace, errors."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import shear
from shear.compiler import default_example_inputs, reference_output
from shear.errors import PassError, PipelineError, VerifyError
from shear.graph.groups import Member, PruningGroup, Role
from shear.passes import Context, Pass, PassResult, register_pass, registered_passes
from shear.report.summary import CompileReport


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


class MlpGraph:
    """A hand-built IR for :func:`mlp`: one prunable group, the 16 hidden channels."""

    def __init__(self) -> None:
        rows = torch.arange(16).view(16, 1)
        self.pruning_groups = (
            PruningGroup(
                id=0,
                name="0/out",
                size=16,
                members=(
                    Member("0.weight", 0, Role.PRIMARY, rows),
                    Member("0.bias", 0, Role.PRIMARY, rows),
                    Member("2.weight", 1, Role.SECONDARY, rows),
                ),
            ),
        )

    def check(self) -> None:
        return None

    def __str__(self) -> str:
        return "mlp graph: 0/out (16)"


@register_pass
@dataclass(frozen=True)
class MlpGroups(Pass):
    name = "test-mlp-groups"
    ensures = ("graph",)

    def run(self, ctx: Context) -> PassResult:
        ctx.results["graph"] = MlpGraph()
        return PassResult(changed=False)


@register_pass
@dataclass(frozen=True)
class MlpMask(Pass):
    """Zero ``ratio`` of the hidden channels, chosen by ``seed``."""

    name = "test-mlp-mask"
    requires = ("graph",)
    ratio: float = 0.25
    seed: int = 0

    def run(self, ctx: Context) -> PassResult:
        n = round(self.ratio * 16)
        idx = torch.randperm(16, generator=torch.Generator().manual_seed(self.seed))[:n]
        with torch.no_grad():
            ctx.model[0].weight[idx] = 0
            ctx.model[0].bias[idx] = 0
        ctx.results["mask"] = sorted(idx.tolist())
        return PassResult(changed=True, message=f"zeroed {n}")


@register_pass
@dataclass(frozen=True)
class MlpErase(Pass):
    """Remove zero hidden channels; ``broken`` keeps the wrong columns of the consumer."""

    name = "test-mlp-erase"
    requires = ("graph",)
    broken: bool = False

    def run(self, ctx: Context) -> PassResult:
        fc1, fc2 = ctx.model[0], ctx.model[2]
        keep = torch.nonzero(fc1.weight.abs().amax(1) + fc1.bias.abs() > 0).flatten()
        cols = keep.flip(0) if self.broken else keep
        new1, new2 = nn.Linear(6, len(keep)), nn.Linear(len(keep), 3)
        with torch.no_grad():
            new1.weight.copy_(fc1.weight[keep])
            new1.bias.copy_(fc1.bias[keep])
            new2.weight.copy_(fc2.weight[:, cols])
            new2.bias.copy_(fc2.bias)
        ctx.model[0], ctx.model[2] = new1, new2
        return PassResult(changed=True, message=f"kept {len(keep)}")


@register_pass
@dataclass(frozen=True)
class Explode(Pass):
    name = "test-explode"

    def run(self, ctx: Context) -> PassResult:
        raise RuntimeError("out of memory")


X = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_object_string_and_file_pipelines_give_identical_models(tmp_path: Path) -> None:
    toml = tmp_path / "p.toml"
    toml.write_text('[[passes]]\nname = "test-mlp-groups"\n\n[[passes]]\nname = "test-mlp-mask"\nratio = 0.25\nseed = 3\n\n[[passes]]\nname = "test-mlp-erase"\n')
    by_object = shear.compile(mlp(), [MlpGroups(), MlpMask(ratio=0.25, seed=3), MlpErase()], example_inputs=(X,))
    by_string = shear.compile(mlp(), "test-mlp-groups,test-mlp-mask{ratio=0.25,seed=3},test-mlp-erase", example_inputs=(X,))
    by_file = shear.compile(mlp(), toml, example_inputs=(X,))
    a, b, c = _state(by_object), _state(by_string), _state(by_file)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)
    assert by_object.shear_report.pipeline == by_string.shear_report.pipeline == by_file.shear_report.pipeline
    assert by_object.shear_report.pipeline == "test-mlp-groups,test-mlp-mask{seed=3},test-mlp-erase"


def test_report_per_pass_and_per_group() -> None:
    model = mlp()
    small = shear.compile(model, "test-mlp-groups,test-mlp-mask{ratio=0.25,seed=3},test-mlp-erase", example_inputs=(X,))
    r: CompileReport = small.shear_report
    assert [p.name for p in r.passes] == ["test-mlp-groups", "test-mlp-mask", "test-mlp-erase"]
    assert not any(p.auto for p in r.passes)
    assert all(p.seconds >= 0 for p in r.passes) and r.seconds >= r.passes[1].seconds
    assert r.params_before == 6 * 16 + 16 + 16 * 3 + 3
    assert r.params_after == 6 * 12 + 12 + 12 * 3 + 3 == sum(p.numel() for p in small.parameters())
    (g,) = r.groups
    assert (g.name, g.size_before, g.size_after, g.removed, g.zeroed) == ("0/out", 16, 12, 4, 0)
    assert (g.params_before, g.params_after) == (16 * (6 + 1 + 3), 12 * (6 + 1 + 3))
    expected = sorted(torch.randperm(16, generator=torch.Generator().manual_seed(3))[:4].tolist())
    assert list(g.pruned) == expected
    assert r.verify_max_diff is not None and r.verify_max_diff <= 1e-5
    text = str(r)
    assert "test-mlp-mask{seed=3}" in text and "0/out" in text and "16 → 12" in text and "4 removed" in text
    assert r.to_dict()["groups"][0]["size_after"] == 12


def test_masked_only_pipeline_reports_zeroed_structures() -> None:
    r = shear.compile(mlp(), "test-mlp-groups,test-mlp-mask{ratio=0.5}", example_inputs=(X,)).shear_report
    (g,) = r.groups
    assert (g.size_after, g.zeroed, len(g.pruned)) == (16, 8, 8)
    assert r.pruned_groups == [g] and r.verify_max_diff is None


def test_compile_copies_unless_inplace() -> None:
    model = mlp()
    before = _state(model)
    small = shear.compile(model, "test-mlp-groups,test-mlp-mask,test-mlp-erase", example_inputs=(X,))
    assert small is not model and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    same = shear.compile(model, "test-mlp-groups,test-mlp-mask,test-mlp-erase", example_inputs=(X,), inplace=True)
    assert same is model and model[0].out_features == 12 and hasattr(model, "shear_report")


def test_verify_catches_a_wrong_erasure() -> None:
    with pytest.raises(VerifyError, match=r"pass 'test-mlp-erase' changed the model's function: max \|diff\| .* > tolerance"):
        shear.compile(mlp(), "test-mlp-groups,test-mlp-mask,test-mlp-erase{broken=true}", example_inputs=(X,))
    small = shear.compile(mlp(), "test-mlp-groups,test-mlp-mask,test-mlp-erase{broken=true}", example_inputs=(X,), verify=False)
    assert small.shear_report.verify_max_diff is None


def test_failing_pass_is_a_pass_error() -> None:
    with pytest.raises(PassError, match=r"pass 'test-explode' \(after passes \['test-mlp-groups', 'test-mlp-mask'\]\) failed: RuntimeError: out of memory"):
        shear.compile(mlp(), "test-mlp-groups,test-mlp-mask,test-explode", example_inputs=(X,))


def test_bad_pipeline_fails_before_any_work() -> None:
    with pytest.raises(PipelineError, match=r"unknown pass 'test-mlp-mask2'; did you mean 'test-mlp-mask'\?"):
        shear.compile(mlp(), "test-mlp-mask2", example_inputs=(X,))
    with pytest.raises(PipelineError, match=r"option 'ratio' expects float, got 'lots'"):
        shear.compile(mlp(), "test-mlp-mask{ratio=lots}", example_inputs=(X,))


def test_dump_dir_and_debug(tmp_path: Path) -> None:
    shear.compile(mlp(), "test-mlp-groups,test-mlp-mask", example_inputs=(X,), debug=True, dump_dir=tmp_path)
    assert (tmp_path / "02-test-mlp-mask.txt").read_text().endswith("mlp graph: 0/out (16)\n")


def test_default_example_inputs_and_reference_output() -> None:
    class Cfg:
        vocab_size = 50
        max_position_embeddings = 8

    class LM(nn.Module):
        config = Cfg()

        def forward(self, input_ids: torch.Tensor) -> dict[str, Any]:
            return {"logits": input_ids.float()}

    inputs = default_example_inputs(LM())
    assert inputs is not None and inputs["input_ids"].shape == (1, 8) and int(inputs["input_ids"].max()) < 50
    assert default_example_inputs(mlp()) is None
    assert torch.equal(reference_output(LM(), inputs), inputs["input_ids"].float())
    with pytest.raises(VerifyError, match=r"cannot find an output tensor in str"):
        reference_output(nn.Identity(), "text")


# -- on a tiny LLaMA with the real passes --------------------------------------------------------


def _have(*names: str) -> None:
    missing = [n for n in names if n not in registered_passes()]
    if missing:
        pytest.skip(f"passes not available yet: {missing}")


def tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def test_llama_random_erase_by_object_string_and_file(tmp_path: Path) -> None:
    _have("discover-groups", "random", "erase")
    import shear.passes as sp

    toml = tmp_path / "p.toml"
    toml.write_text('[[passes]]\nname = "random"\nratio = 0.3\nseed = 0\n\n[[passes]]\nname = "erase"\n')
    results = [
        shear.compile(tiny_llama(), spec)
        for spec in ([sp.Random(ratio=0.3, seed=0), sp.Erase()], "random{ratio=0.3,seed=0},erase", toml)
    ]
    states = [_state(m) for m in results]
    assert states[0].keys() == states[1].keys() == states[2].keys()
    assert all(torch.equal(states[0][k], s[k]) for s in states[1:] for k in states[0])
    r = results[0].shear_report
    assert type(results[0]).__name__ == "LlamaForCausalLM"
    assert r.params_after < r.params_before and r.verify_max_diff is not None and r.verify_max_diff <= 1e-4
    assert any(g.removed for g in r.groups)


def test_llama_default_pipeline_changes_nothing() -> None:
    _have("discover-groups")
    model = tiny_llama()
    small = shear.compile(model)  # no data: the LoRAShear default cannot train, so the IR only, and a note
    r = small.shear_report
    assert r.passes[0].name == "discover-groups" and r.params_after == r.params_before
    assert any(g.prunable for g in r.groups)
    assert any("needs data" in w and "TextData.from_corpus" in w for w in r.warnings)


@pytest.mark.needs_dot
@pytest.mark.skipif(shutil.which("dot") is None, reason="needs the graphviz `dot` binary")
def test_dump_dir_draws_svg_after_each_pass_with_dot(tmp_path: Path) -> None:
    _have("discover-groups", "random")
    shear.compile(tiny_llama(), "random{ratio=0.3}", dump_dir=tmp_path)
    assert (tmp_path / "01-discover-groups.svg").is_file() and (tmp_path / "02-random.svg").is_file()


def test_progress_bars_render_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    shear.compile(mlp(), "test-mlp-groups,test-mlp-mask", example_inputs=(X,), progress=True)
    assert "pass test-mlp-mask" in capsys.readouterr().err


def test_verify_tolerates_fp32_rounding_of_a_deep_model_but_not_a_wrong_one(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """SmolLM2 (30 layers, logits ~33): erasing 20% of its heads and channels moves the fp32 logits by
    4.6e-4, above 1e-5 * scale but inside the model's own fp32 rounding noise (1.2e-3 from float64)
    and inside the one tolerance policy (verify.allowed). Verify accepts that; a small model that is
    really wrong is still rejected, with the measured noise in the message."""
    from model_fixtures import load_smollm2_once

    from shear.codegen import verify

    (model, _, _, _), _, _ = load_smollm2_once(tmp_path_factory)
    ids = {"input_ids": torch.randint(0, 49152, (1, 16), generator=torch.Generator().manual_seed(0))}
    pipeline = "discover-groups,random{ratio=0.2,seed=0,kinds=[channel,head]}"
    masked = shear.compile(model, pipeline, example_inputs=ids, verify=False)
    small = shear.compile(model, pipeline + ",erase", example_inputs=ids)  # verify=True, the default
    stats = next(r for r in small.shear_report.passes if r.name == "erase").stats
    scale = float(masked(**ids).logits.abs().max())
    assert stats["verify_max_diff"] > 1e-5 * scale  # a purely relative 1e-5 would have failed
    assert 0 < stats["verify_max_diff"] <= verify.allowed(scale)
    assert 0 < stats["verify_max_diff"] <= 3 * verify.rounding_noise(small, ids, [small(**ids).logits]) < 1e-2
    recording = verify.record(masked, ids)
    with torch.no_grad():
        small.model.layers[3].mlp.down_proj.weight[0, 0] += 1.0  # a real error, far above the noise
    with pytest.raises(shear.errors.VerifyError, match="rounding noise"):
        verify.check(small, recording, ids)
