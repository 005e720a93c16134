"""Every refusal is a reason: transformers' causal LMs, tiny, pruned at random and erased exactly.

The slow test sweeps every causal-LM architecture of the installed transformers that torch.export
traces (``tools.arch_sweep``). The fast ones pin the faults the sweep found, one tiny config each:
empty tensors (XLM), a head_dim cut inside every head (GPT-Neo), heads folded into the batch
(TrOCR), attention projections that are not linears (Moshi), caches in verification (Jamba),
data-dependent MoE sizes (JetMoE) and sizes export fixed (CPM-Ant).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import shear
from shear.errors import GraphError, InputError
from shear.zoo.tiny_configs import TINY_VOCAB, causal_lm_types, shrink_config, tiny_causal_lm
from tools.arch_sweep import COUNTED, summary, sweep_one

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


def test_empty_tensors_have_no_channel_space() -> None:
    """XLM builds ``torch.tensor([])`` in its attention: a zero-size dimension is no channel, not a fault."""
    _, masked, small = _masked_and_small("xlm")
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
