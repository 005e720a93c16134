"""Architecture specifics beyond the shared trace/erase suites: probed RMS norms, per-head norms,
fused projections read through a layer's own config, and configs that cannot describe a model."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import pytest
import torch
from models import build, fresh_inputs
from torch import nn

import shear
from shear.codegen.hf_config import refresh_config
from shear.codegen.module_rules import LayerConfig
from shear.graph.modules.norms import RmsNormSpec, find_rms_norm, probe_rms_norm


def _logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def test_rms_norms_are_recognised_by_probing_their_output() -> None:
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.granite.modeling_granite import GraniteRMSNorm

    assert find_rms_norm(GraniteRMSNorm(8, eps=1e-5)) == RmsNormSpec("variance_epsilon", 0.0)
    assert find_rms_norm(Gemma3RMSNorm(8, eps=1e-6)) == RmsNormSpec("eps", 1.0)  # stores w around 0

    class CentringRMSNorm(nn.Module):  # named like an RMS norm, but subtracts the mean: not one
        def __init__(self) -> None:
            super().__init__()
            self.weight, self.eps = nn.Parameter(torch.ones(8)), 1e-6

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x - x.mean(-1, keepdim=True)
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight

    assert probe_rms_norm(CentringRMSNorm()) is None and find_rms_norm(CentringRMSNorm()) is None
    class LateRMSNorm(GraniteRMSNorm):  # a type no table names and no probe has seen yet
        pass

    with torch.device("meta"):  # a skeleton cannot be probed ...
        assert probe_rms_norm(LateRMSNorm(8)) is None and find_rms_norm(LateRMSNorm(8)) is None
    assert find_rms_norm(LateRMSNorm(8)) == RmsNormSpec("variance_epsilon", 0.0)  # ... nor remembered as "not one"


def test_qwen3_heads_prune_through_their_per_head_norms() -> None:
    """q_norm / k_norm run rsqrt(mean + eps) per head: a zeroed head still leaves them as zero."""
    model, inputs = build("qwen3")
    heads = shear.trace(model, inputs).group("model.layers.0.self_attn/head")
    assert heads.prunable and heads.size == 2 and not heads.reasons  # eps and rsqrt no longer pin it
    masked = shear.compile(model, "discover-groups,random{ratio=0.5,seed=0,kinds=[head]}", example_inputs=inputs)
    small = shear.compile(model, "discover-groups,random{ratio=0.5,seed=0,kinds=[head]},erase", example_inputs=inputs)
    assert small.model.layers[0].self_attn.k_proj.out_features == 16  # 1 of 2 kv heads (head_dim 16)
    x = fresh_inputs("qwen3", seed=5, batch=2)
    assert float((_logits(small, x) - _logits(masked, x)).abs().max()) <= 1e-5


def test_phi3_layers_read_their_own_head_counts(tmp_path: Path) -> None:
    model, inputs = build("phi3")
    pipeline = "discover-groups,random{ratio=0.5,seed=0,kinds=[head]}"
    masked = shear.compile(model, pipeline, example_inputs=inputs)
    small = shear.compile(model, pipeline + ",erase", example_inputs=inputs)
    attn = small.model.layers[0].self_attn
    assert type(small).__name__ == "Phi3ForCausalLM"  # the module tree, not the GraphModule fallback
    assert isinstance(attn.config, LayerConfig) and attn.config.num_attention_heads == 2
    assert small.config.num_attention_heads == 4  # the shared config is untouched
    x = fresh_inputs("phi3", seed=6, batch=2)
    want = _logits(masked, x)
    assert float((_logits(small, x) - want).abs().max()) <= 1e-5
    small.set_attn_implementation("sdpa")  # reaches the layers through their LayerConfig
    assert attn.config._attn_implementation == "sdpa"
    assert float((_logits(small, x) - want).abs().max()) <= 1e-5
    for twin in (copy.deepcopy(small), pickle.loads(pickle.dumps(small))):
        assert twin.model.layers[0].self_attn.config.num_attention_heads == 2
        assert torch.equal(_logits(twin, x), _logits(small, x))
    again = shear.load(shear.save(small, tmp_path / "m"))
    assert torch.equal(_logits(again, x), _logits(small, x))


@pytest.mark.parametrize(("arch", "expressible"), [("llama", True), ("qwen3", False)])
def test_config_is_refreshed_only_when_it_can_say_every_epsilon(arch: str, expressible: bool) -> None:
    """Pruning the residual rescales its norms' eps. Qwen3's per-head norms keep theirs, and one
    ``rms_norm_eps`` cannot say both, so its config keeps the original sizes."""
    model, inputs = build(arch)
    small = shear.compile(model, "discover-groups,random{ratio=0.5,seed=0,kinds=[residual]},erase",
                          example_inputs=inputs)
    assert small.model.embed_tokens.weight.shape[1] == 32
    assert refresh_config(small) is expressible
    assert small.config.hidden_size == (32 if expressible else 64)


class TransposedLinear(nn.Linear):
    """Falcon's linear: ``x @ w.T`` instead of ``F.linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T + self.bias


def test_a_transposed_parameter_keeps_its_roles() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(TransposedLinear(6, 10), nn.ReLU(), TransposedLinear(10, 3)).eval()
    x = torch.randn(4, 6)
    (hidden,) = shear.trace(net, x).prunable_groups
    roles = {(m.param, m.dim, m.role.value) for m in hidden.members}
    assert roles == {("0.weight", 0, "primary"), ("0.bias", 0, "primary"), ("2.weight", 1, "secondary")}
    masked = shear.compile(net, "discover-groups,random{ratio=0.5,seed=0}", example_inputs=x)
    small = shear.compile(net, "discover-groups,random{ratio=0.5,seed=0},erase", example_inputs=x)
    assert small[0].weight.shape == (5, 6) and small[2].weight.shape == (3, 5)
    with torch.no_grad():
        assert float((small(x) - masked(x)).abs().max()) <= 1e-6


def test_default_lora_targets_cover_linear_subclasses_and_conv1d() -> None:
    from shear.training.adapters import ensure_lora, lora_target_names

    gpt2, _ = build("gpt2")
    assert {n.rsplit(".", 1)[-1] for n in lora_target_names(gpt2)} == {"c_attn", "c_proj", "c_fc"}  # Conv1D
    net = nn.Sequential(TransposedLinear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    assert lora_target_names(net) == ["0", "2"]  # a Linear subclass is still a linear
    mha = nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2), "proj": nn.Linear(8, 8)})
    assert lora_target_names(mha) == ["proj"]  # MHA reads out_proj.weight itself: an adapter would never run
    with pytest.raises(shear.errors.TrainingError, match="no linear layers"):
        ensure_lora(nn.Sequential(nn.Embedding(5, 4)))


def test_sequence_length_is_held_to_learned_position_embeddings() -> None:
    from shear.codegen.hf_config import max_positions
    from shear.passes.base import Context
    from shear.passes.lorashear.recovery_rounds import with_response as _with_response

    gpt2, inputs = build("gpt2")  # n_positions=64, learned
    assert max_positions(gpt2) == 64 and max_positions(build("bert")[0]) == 64
    assert max_positions(build("llama")[0]) is None  # rotary: no learned table to run off
    with pytest.raises(shear.errors.PassError, match=r"seq_len=128 is longer than the model's 64 positions; "
                                                     r"set lhspg\{seq_len=64\}"):
        shear.compile(gpt2, "discover-groups,lhspg{seq_len=128}", example_inputs=inputs)
    # instruction examples are cut to the positions; one whose response starts past them is left out
    ids = torch.arange(10)
    late = torch.tensor([-100] * 7 + [7, 8, 9])
    ctx = Context(model=gpt2)
    assert [len(i) for i, _ in _with_response(ctx, [(ids, late)], "instructions", limit=9)] == [9]
    assert _with_response(ctx, [(ids, late)], "instructions", limit=6) == []
    assert any("cut to the model's 6 positions" in w for w in ctx.warnings)


def test_lora_pipelines_keep_the_models_eval_mode(tmp_path: Path) -> None:
    """peft creates its wrapper and adapters in train mode; GPT-2's dropout must not come back on."""
    model, inputs = build("gpt2")
    small = shear.compile(model, "lora,discover-groups,random{ratio=0.3,seed=0},erase,merge-lora",
                          example_inputs=inputs)
    assert not any(m.training for m in small.modules())
    again = shear.load(shear.save(small, tmp_path / "m"))
    x = fresh_inputs("gpt2", seed=2, batch=2)
    assert torch.equal(_logits(again, x), _logits(small, x))


def test_head_dim_goes_only_with_whole_heads_in_eager_attention() -> None:
    """GPT-J's attention is plain matmuls (no SDPA to pin head_dim). A head_dim coordinate of every
    head shares rows with the heads, so erase could never remove it while a head stays: it is pinned,
    and what a pruning pass zeroes is what erase removes."""
    import transformers as tf

    from shear.graph.pins import pin_kinds

    torch.manual_seed(0)
    cfg = tf.GPTJConfig(n_embd=64, n_layer=1, n_head=4, rotary_dim=8, vocab_size=96, n_positions=64)
    model = tf.GPTJForCausalLM(cfg).eval()
    inputs = {"input_ids": torch.randint(0, 96, (1, 8))}
    graph = shear.trace(model, inputs)
    assert graph.group("transformer.h.0.attn/head").prunable  # 4 heads
    v_dim = graph.group("transformer.h.0.attn.v_proj/channel")  # head_dim 16 of v, through out_proj
    # pinned as a head_dim: by the inner-factor rule (eager matmuls) or, where a release routes GPT-J
    # through SDPA, by the attention rule; either way it goes only with whole heads
    assert v_dim.size == 16 and not v_dim.prunable and pin_kinds(v_dim.reasons) == ("head-dim",)
    small = shear.compile(model, "discover-groups,random{ratio=0.5,seed=0},erase", example_inputs=inputs)
    erase = next(r for r in small.shear_report.passes if r.name == "erase")
    zeroed = next(r for r in small.shear_report.passes if r.name == "random").message.split()[1]
    assert erase.stats["structures"] == int(zeroed)  # every zeroed structure was erased
    assert not [w for w in small.shear_report.warnings if "overlap" in w]
    attn = small.transformer.h[0].attn  # fewer heads, and GPTJAttention (out_proj) knows it: no fallback
    assert type(small).__name__ == "GPTJForCausalLM" and attn.num_attention_heads == 2
    from shear.codegen.hf_config import max_positions

    assert max_positions(model) == 64  # its sinusoidal table is a 64-row buffer: a longer input fails


@pytest.mark.parametrize(
    "name",
    ["shear.graph.modules.norms", "shear.graph.modules.composites", "shear.codegen.module_rules", "shear.graph.spaces", "shear.graph.pins"],
)
def test_docstring_examples(name: str) -> None:
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 4 and result.failed == 0


def test_attention_rule_refuses_partial_heads() -> None:
    from shear.codegen.module_rules import hf_attention

    attn = build("phi3")[0].model.layers[0].self_attn  # 4 q + 2 kv heads of 16 in one qkv_proj (128 rows)
    attn.qkv_proj.weight = nn.Parameter(attn.qkv_proj.weight[:120])  # k/v lose 8 rows: not whole heads
    with pytest.raises(shear.errors.GraphError, match=r"qkv_proj: 56 key/value features are not two equal sets"):
        hf_attention(attn)
    attn = build("qwen3")[0].model.layers[0].self_attn  # 4 q heads over 2 kv heads
    attn.q_proj.weight = nn.Parameter(attn.q_proj.weight[:48])  # 3 q heads: not a multiple of 2
    with pytest.raises(shear.errors.GraphError, match="3 query heads do not split evenly over 2 kv heads"):
        hf_attention(attn)


def test_recovery_without_any_instruction_response_fails_before_training() -> None:
    import transformers as tf

    from shear.data import TextData
    from shear.zoo import load_tiny_llama

    tokenizer = load_tiny_llama()[1]
    data = TextData.from_corpus(tokenizer, max_train_chars=8_000, max_val_chars=2_000, instructions=8)
    torch.manual_seed(0)
    cfg = tf.GPT2Config(vocab_size=len(tokenizer), n_positions=8, n_embd=32, n_layer=1, n_head=2)
    model = tf.GPT2LMHeadModel(cfg).eval()  # 8 positions: every prompt is longer
    with pytest.raises(shear.errors.PassError, match=r"lost its response to the tokenizing max length or to "
                                                     r"the model's 8 positions; raise instruction_max_length"):
        shear.compile(model, "recover-dynamic{stages=instruct,seq_len=8}", data=data,
                      example_inputs={"input_ids": torch.zeros(1, 8, dtype=torch.long)})
