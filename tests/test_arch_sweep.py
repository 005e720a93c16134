"""Every refusal is a reason: transformers' causal LMs, tiny, pruned at random and erased exactly.

The slow test sweeps every causal-LM architecture of the installed transformers that torch.export
traces (``tools.arch_sweep``). The fast ones pin the faults the sweep found, one tiny config each:
empty tensors (XLM), slices clamped at the start (XLNet), a head_dim cut inside every head
(GPT-Neo), heads folded into the batch (TrOCR, and a dynamic batch), attention projections that
are not linears (Moshi), caches in verification (Jamba), data-dependent MoE sizes (JetMoE) and
sizes export fixed (CPM-Ant).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import shear
from shear.errors import GraphError, InputError
from shear.zoo.tiny_configs import TINY_VOCAB, causal_lm_types, shrink_config, tiny_causal_lm
from tools.arch_sweep import COUNTED, main, summary, sweep_one

PIPELINE = "discover-groups,random{ratio=0.3,seed=0}"


def _ids(seed: int, batch: int = 2, length: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(3, TINY_VOCAB, (batch, length), generator=g)}


def _logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs, use_cache=False)
    return out.logits if hasattr(out, "logits") else out[0]


def _masked_and_small(arch: str, spec: str = PIPELINE) -> tuple[nn.Module, nn.Module, nn.Module]:
    model = tiny_causal_lm(arch)
    masked = shear.compile(model, spec, example_inputs=_ids(0))
    small = shear.compile(model, spec + ",erase", example_inputs=_ids(0))
    return model, masked, small


def _exact(masked: nn.Module, small: nn.Module) -> float:
    """max |small - masked| on fresh inputs, asserted within 1e-5 of the logits' scale (at least 1)."""
    x = _ids(1)
    want = _logits(masked, x)
    diff = float((want - _logits(small, x)).abs().max())
    assert diff <= 1e-5 * max(1.0, float(want.abs().max()))
    return diff


def test_tiny_configs_keep_one_layer_of_each_kind() -> None:
    small = shrink_config({"hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8,
                           "num_hidden_layers": 6, "layer_types": ["a", "a", "b", "a", "a", "b"],
                           "eos_token_id": [151643, 1], "vocab_size": 151936})  # fmt: skip
    assert small["layer_types"] == ["a", "b"] and small["num_hidden_layers"] == 2
    assert small["hidden_size"] == 64 and small["num_key_value_heads"] == 2 and small["vocab_size"] == TINY_VOCAB
    assert small["eos_token_id"] == [2, 1]  # token ids inside the tiny vocabulary
    assert "llama" in causal_lm_types() and len(causal_lm_types()) > 100
    with pytest.raises(shear.errors.ModelLoadError, match="not a causal-LM architecture"):
        tiny_causal_lm("resnet")


def test_sweep_writes_rows_and_resumes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sweep.jsonl"
    (row,) = main(["--archs", "llama", "--out", str(out)])
    assert row["outcome"] == "exact" and row["diff"] <= 1e-5 and row["after"] < row["params"]
    out.with_suffix(".running").write_text("gpt2")  # a process that died inside gpt2
    rows = main(["--archs", "llama", "gpt2", "--out", str(out), "--resume"])
    assert [r["arch"] for r in rows] == ["llama", "gpt2"] and rows[1]["outcome"] == "crash"
    assert "exact 1/2 traced = 50.0%" in capsys.readouterr().out
    assert len(out.read_text().splitlines()) == 2 and not out.with_suffix(".running").exists()


@pytest.mark.parametrize("arch", ["xlm", "xlnet"])
def test_empty_tensors_and_clamped_slices_are_no_fault(arch: str) -> None:
    """XLM builds ``torch.tensor([])`` in its attention (a zero-size dimension is no channel); XLNet
    slices its relative positions from before their start (``x[-512:]`` of 12 rows is all 12)."""
    _, masked, small = _masked_and_small(arch)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in masked.parameters())
    _exact(masked, small)


def test_head_dim_cut_inside_every_head_falls_back_to_a_graph_module() -> None:
    """GPT-Neo's heads are pinned (a causal ``where``), so its head_dim coordinates are prunable
    across all heads; no module rule can say that head_dim, so erase emits the GraphModule."""
    model, masked, small = _masked_and_small("gpt_neo")
    graph = shear.trace(model, _ids(0))
    assert graph.group("transformer.h.0.attn.attention/channel").prunable
    assert isinstance(small, torch.fx.GraphModule)
    assert any("no module rule can describe the sliced module tree" in w and "whole heads" in w
               for w in small.shear_report.warnings)  # fmt: skip
    _exact(masked, small)
    with pytest.raises(shear.errors.PassError, match=r"GPTNeoSelfAttention.q_proj: \d+ output features are not whole heads"):
        shear.compile(model, PIPELINE + ",erase{emit=module}", example_inputs=_ids(0))


def test_heads_folded_into_the_batch_get_their_new_count() -> None:
    """TrOCR reshapes to ``(bsz * num_heads, -1, head_dim)``: the graph computes ``bsz * 4`` from the
    input's size, and that size is rewritten with the heads that stay."""
    _, masked, small = _masked_and_small("trocr", PIPELINE.replace("seed=0}", "seed=0,kinds=[head]}"))
    assert isinstance(small, torch.fx.GraphModule)
    rows = small.get_parameter("model.decoder.layers.0.self_attn.q_proj.weight").shape[0]
    assert rows < 64 and rows % 16 == 0  # whole heads of 16 went
    _exact(masked, small)


class FoldedHeads(nn.Module):
    """Attention that folds its 4 heads of 8 into the batch, head-major: ``reshape(4 * bsz, t, 8)``.
    With ``streams``, two inputs share the batch: ``4 * (bsz + other)``, a sum of sizes."""

    def __init__(self, streams: bool = False) -> None:
        super().__init__()
        self.q, self.v, self.o, self.streams = nn.Linear(16, 32), nn.Linear(16, 32), nn.Linear(32, 16), streams

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        z = torch.cat([x, y]) if self.streams and y is not None else x
        b, t = (x.shape[0] + y.shape[0] if self.streams and y is not None else x.shape[0]), x.shape[1]
        q, v = (p(z).view(b, t, 4, 8).permute(2, 0, 1, 3).reshape(4 * b, t, 8) for p in (self.q, self.v))
        w = torch.softmax(torch.bmm(q, q.transpose(1, 2)), -1)
        return self.o(torch.bmm(w, v).view(4, b, t, 8).permute(1, 2, 0, 3).reshape(b, t, 32))


def test_heads_folded_into_a_dynamic_batch_take_any_batch() -> None:
    torch.manual_seed(0)
    net, x = FoldedHeads().eval(), torch.randn(2, 5, 16)
    spec = "discover-groups,random{ratio=0.5,seed=0,kinds=[head]}"
    masked = shear.compile(net, spec, example_inputs=x)
    small = shear.compile(net, spec + ",erase", example_inputs=x)
    assert isinstance(small, torch.fx.GraphModule) and small.q.weight.shape == (16, 16)  # 2 of 4 heads
    for shape in ((2, 5, 16), (3, 7, 16), (5, 2, 16)):  # 4 * bsz became 2 * bsz, for every bsz
        y = torch.randn(*shape)
        with torch.no_grad():
            assert float((small(y) - masked(y)).abs().max()) <= 1e-5
    two = FoldedHeads(streams=True).eval()
    with pytest.raises(shear.errors.PassError, match=r"sets dimension 0 to 4\*s\d+ \+ 4\*s\d+, a dynamic size over a "
                                                     r"pruned dimension that is not \(input size\) x \(pruned static"):
        shear.compile(two, spec + ",erase", example_inputs=(x, torch.randn(3, 5, 16)))


def test_attention_whose_projections_are_not_linears() -> None:
    """Moshi's ``q_proj`` is a per-codebook ``MoshiLinear`` (no ``weight``): the transformers attention
    rule does not claim it, and erase still gives the masked model's logits."""
    from shear.codegen.module_rules import find_rule, in_out_features

    model, masked, small = _masked_and_small("moshi")
    attn = model.model.layers[0].self_attn
    assert find_rule(attn) is None
    with pytest.raises(GraphError, match="MoshiLinear is not a linear layer"):
        in_out_features(attn.q_proj)
    _exact(masked, small)


def test_verification_runs_the_model_without_a_cache() -> None:
    """Jamba's hybrid cache fails when called as ``model(input_ids)`` with its default ``use_cache``
    (erase's verification failed there); verification calls it as the trace did (``use_cache=False``)."""
    from shear.codegen.verify import call_model

    model, x = tiny_causal_lm("jamba"), _ids(0)
    with torch.no_grad():
        out = call_model(model, x)
    assert torch.equal(out.logits, _logits(model, x)) and out.past_key_values is None


def test_data_dependent_sizes_are_no_channels() -> None:
    """JetMoE routes tokens with data-dependent sizes: they get no space instead of failing the trace."""
    model = tiny_causal_lm("jetmoe")
    graph = shear.trace(model, _ids(0))
    assert graph.pruning_groups
    row = sweep_one("jetmoe")
    assert row["outcome"] in ("exact", "nothing prunable"), row


def test_sizes_export_fixed_are_refused_by_name() -> None:
    """CPM-Ant's graph fixes the sequence length; another length is an InputError, not a guard assertion."""
    _, masked, small = _masked_and_small("cpmant")
    assert isinstance(small, torch.fx.GraphModule)
    _exact(masked, small)
    with pytest.raises(InputError, match=r"fixes its dimension 1 to 12"):
        small(**_ids(2, length=9))


def test_complex_rotary_reads_a_contiguous_copy() -> None:
    """DeepSeek-V2 cuts its rotary part from a latent whose width was erased, then ``view_as_complex``:
    the slice of the narrower latent has an odd stride, so the emitted graph reads a contiguous copy."""
    _, masked, small = _masked_and_small("deepseek_v2")
    assert isinstance(small, torch.fx.GraphModule)
    assert any(n.target is torch.ops.aten.view_as_complex.default and n.args[0].target is torch.ops.aten.clone.default
               for n in small.graph.nodes)  # fmt: skip
    _exact(masked, small)


@pytest.mark.slow
def test_every_traced_causal_lm_erases_exactly_or_says_why() -> None:
    """The whole sweep: no exception that is not a ShearError, no mismatch, at least 95% exact."""
    rows = [sweep_one(arch) for arch in causal_lm_types()]
    bad = [f"{r['arch']}: {r['outcome']}: {r.get('error', '')[:300]}" for r in rows
           if r["outcome"] in ("crash", "mismatch")]  # fmt: skip
    assert not bad, "\n".join(bad)
    counted = [r for r in rows if r["outcome"] in COUNTED]
    exact = sum(r["outcome"] == "exact" for r in counted)
    assert counted and exact / len(counted) >= 0.95, summary(rows)
