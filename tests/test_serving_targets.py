"""shear.save(target=...): hf loads in stock transformers, nas is a Nemotron-NAS checkpoint, shear never masquerades.

The nas folder's config is checked against what its readers compute from it (the converters'
``ffn_mult`` formula, vLLM's attribute reads, TensorRT-LLM's ``dataclasses.asdict``); llama.cpp's own
converter runs on a pruned SmolLM2 in ``test_nas_folder_converts_and_runs_in_llama_cpp`` (slow).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hand_groups import llama_groups, tiny_llama
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

import shear
from shear.codegen.module_tree import codegen
from shear.errors import CheckpointError, ExportError, InputError, ModelLoadError
from shear.io.checkpoint import sha256_file
from shear.io.folder_formats import describe_folder, save_format
from shear.io.nas import block_widths, ffn_mult_for, ffn_width, nas_refusal, plan_nas
from shear.io.nas_config_code import CONFIG_CODE_FILE
from shear.passes.baselines.random import zero_random


def _ids(seed: int, vocab: int = 128) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 11), generator=torch.Generator().manual_seed(seed))


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _erase(model: nn.Module, mlp_keep: list[int] | None = None) -> nn.Module:
    """``model`` with the MLP channels past ``mlp_keep[i]`` of layer ``i`` zeroed and erased."""
    with torch.no_grad():
        for layer, k in zip(model.model.layers, mlp_keep or []):
            layer.mlp.gate_proj.weight[k:] = 0
            layer.mlp.up_proj.weight[k:] = 0
    small, _ = codegen(model, llama_groups(model, residual=False), example_inputs=(_ids(0),))
    return small


def _drop_kv_head(layers: list[int]) -> nn.Module:
    """A 512-wide MLP model whose listed layers lost their second kv head (and its four query heads)."""
    model = tiny_llama(intermediate_size=512)
    with torch.no_grad():
        for i in layers:
            attn = model.model.layers[i].self_attn
            attn.q_proj.weight[32:] = 0
            attn.k_proj.weight[8:] = 0
            attn.v_proj.weight[8:] = 0
    small, _ = codegen(model, llama_groups(model, residual=False), example_inputs=(_ids(0),))
    return small


def _nas_model(keep: tuple[int, ...] = (512, 256, 768)) -> nn.Module:
    """Three layers of 8 query / 2 kv heads of 8 in a 64-wide residual, MLP widths ``keep`` (multiples of 256)."""
    return _erase(tiny_llama(intermediate_size=768, num_hidden_layers=len(keep), tie=True), list(keep))


def _uniform() -> nn.Module:
    model = tiny_llama()
    zero_random(model, tuple(llama_groups(model, residual=True)), 0.5, seed=5)
    small, report = codegen(model, llama_groups(model, residual=True), example_inputs=(_ids(0),))
    assert report.from_pretrained_compatible
    return small


def _rehash(path: Path, name: str) -> None:
    mf = path / "shear.json"
    data = json.loads(mf.read_text())
    data["files"][name] = {"size": (path / name).stat().st_size, "sha256": sha256_file(path / name)}
    mf.write_text(json.dumps(data))


# --- hf ---------------------------------------------------------------------------------------------------------

_FRESH = """
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
assert not any(m == "shear" or m.startswith("shear.") for m in sys.modules), "shear was imported"
with torch.no_grad():
    torch.save(model(input_ids=torch.load(sys.argv[2])).logits, sys.argv[3])
print(type(model).__name__)
"""


def test_hf_folder_loads_in_a_fresh_interpreter_without_shear(tmp_path: Path) -> None:
    small = _uniform()
    path = shear.save(small, tmp_path / "m", target="hf")
    assert describe_folder(path).format == "hf"
    torch.save(_ids(3), tmp_path / "ids.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    done = subprocess.run([sys.executable, "-c", _FRESH, str(path), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "LlamaForCausalLM"
    got = torch.load(tmp_path / "out.pt")
    assert (got - _logits(small, _ids(3))).abs().max() <= 1e-5


def test_hf_refuses_widths_that_differ_naming_the_layers_and_the_fix(tmp_path: Path) -> None:
    small = _erase(tiny_llama(), [86, 46])
    with pytest.raises(ExportError, match=r"MLP widths differ between layers \(86 in layer 0; 46 in layer 1\).*"
                                          r"--target hf.*selection=shared"):
        shear.save(small, tmp_path / "m", target="hf")
    assert not (tmp_path / "m").exists()


def test_hf_refuses_unmerged_adapters(tmp_path: Path) -> None:
    peft = get_peft_model(_uniform(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ExportError, match=r"unmerged LoRA tensors.*merge-lora"):
        shear.save(peft, tmp_path / "m", target="hf")


# --- shear: never masquerades -----------------------------------------------------------------------------------


def test_a_shear_folder_makes_stock_transformers_name_shear_load(tmp_path: Path) -> None:
    small = _erase(tiny_llama(), [86, 46])
    path = shear.save(small, tmp_path / "m")  # auto: not hf (widths differ), not nas (not multiples of 256)
    saved = describe_folder(path)
    assert saved.format == "shear" and saved.loads_in == ("shear.load",)
    assert "not hf: MLP widths differ" in saved.note and "not nas:" in saved.note and "256" in saved.note
    with pytest.raises(ValueError, match=r"model type `shear: .*load this folder with shear\.load"):
        AutoModelForCausalLM.from_pretrained(path)
    with pytest.raises(Exception, match=r"intermediate_size.*load this folder with shear\.load") as e:
        LlamaForCausalLM.from_pretrained(path)
    assert "size mismatch" not in str(e.value)
    again = shear.load(path)
    assert again.model.layers[1].mlp.gate_proj.out_features == 46
    assert torch.equal(_logits(again, _ids(4)), _logits(small, _ids(4)))


def test_the_tokenizer_of_a_shear_folder_still_loads(tmp_path: Path) -> None:
    from shear.zoo import load_tiny_llama

    tok = load_tiny_llama().tokenizer
    path = shear.save(_erase(tiny_llama(), [86, 46]), tmp_path / "m", tokenizer=tok)
    assert AutoTokenizer.from_pretrained(path)("hello")["input_ids"] == tok("hello")["input_ids"]


def test_target_shear_keeps_a_loadable_config_when_stock_transformers_can_build_it(tmp_path: Path) -> None:
    small = _uniform()
    path = shear.save(small, tmp_path / "m", target="shear")
    assert describe_folder(path).format == "shear"
    assert "stock transformers (from_pretrained)" in describe_folder(path).loads_in
    assert torch.equal(_logits(LlamaForCausalLM.from_pretrained(path), _ids(5)), _logits(small, _ids(5)))


# --- nas ----------------------------------------------------------------------------------------------------------


def test_nas_folder_says_every_width_and_round_trips_exactly(tmp_path: Path) -> None:
    small = _nas_model()
    path = shear.save(small, tmp_path / "m")  # auto: widths differ, multiples of 256 -> nas
    saved = describe_folder(path)
    assert saved.format == "nas" and "vLLM (--trust-remote-code)" in saved.loads_in and "shear.load" in saved.loads_in
    assert saved.note.startswith("not hf: MLP widths differ")
    cfg = json.loads((path / "config.json").read_text())
    assert (cfg["architectures"], cfg["model_type"]) == (["DeciLMForCausalLM"], "nemotron-nas")
    assert (cfg["hidden_size"], cfg["num_attention_heads"], cfg["head_dim"], cfg["num_hidden_layers"]) == (64, 8, 8, 3)
    assert [int(2 * b["ffn"]["ffn_mult"] * 64 / 3) for b in cfg["block_configs"]] == [512, 256, 768]  # exact: no rounding
    assert [b["attention"]["n_heads_in_group"] for b in cfg["block_configs"]] == [4, 4, 4]
    assert all(not b[k]["no_op"] and not b[k]["replace_with_linear"] for b in cfg["block_configs"] for k in b)
    assert cfg["tie_word_embeddings"] is True and cfg["rope_parameters"]["rope_type"] == "default"
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model.safetensors"} and "lm_head.weight" in index["weight_map"]
    again = shear.load(path)
    assert type(again) is LlamaForCausalLM
    assert [layer.mlp.gate_proj.out_features for layer in again.model.layers] == [512, 256, 768]
    assert torch.equal(_logits(again, _ids(6)), _logits(small, _ids(6)))
    assert again.get_output_embeddings().weight is again.get_input_embeddings().weight


def test_nas_config_reads_as_vllm_and_tensorrt_llm_read_it(tmp_path: Path) -> None:
    """The config class in the folder, built through transformers as vLLM and TensorRT-LLM build it, gives
    what their nemotron_nas code computes: kv heads and MLP width per layer."""
    small = _nas_model((256, 768, 512))
    path = shear.save(small, tmp_path / "m", target="nas")
    config = AutoConfig.from_pretrained(path, trust_remote_code=True)
    assert type(config).__name__ == "DeciLMConfig" and config.model_type == "nemotron-nas"
    kv, ff = [], []
    for block in config.block_configs:  # vllm/model_executor/models/nemotron_nas.py, DeciLMDecoderLayer
        assert not block.attention.no_op and not block.ffn.no_op and hasattr(block.ffn, "ffn_mult")
        kv.append(config.num_attention_heads // block.attention.n_heads_in_group)
        ff.append(ffn_width(block.ffn.ffn_mult, config.hidden_size))
        trt = dataclasses.asdict(block)  # tensorrt_llm/models/nemotron_nas/convert.py
        assert trt["attention"]["n_heads_in_group"] == block.attention.n_heads_in_group
    assert kv == [2, 2, 2] and ff == [256, 768, 512]
    assert config.head_dim == 8 and config.rms_norm_eps == small.config.rms_norm_eps
    assert json.loads(config.to_json_string())["block_configs"][1]["ffn"]["ffn_mult"] == config.block_configs[1].ffn.ffn_mult
    with pytest.raises(Exception, match=r"intermediate_size.*shear\.load"):
        LlamaForCausalLM.from_pretrained(path)  # the explicit class never builds the wrong widths


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: _erase(tiny_llama(intermediate_size=768, num_hidden_layers=2), [500, 256]),
         r"MLP widths 500 \(layer 0\); 256 \(layer 1\) are not all multiples of 256.*--target nas"),
        (lambda: _drop_kv_head([0, 1]), r"4 query heads of 8 do not fill the 64-wide residual stream.*"
                                         r"hidden_size / num_attention_heads"),
        (lambda: _drop_kv_head([1]), r"query heads differ between layers \(8 \(layer 0\); 4 \(layer 1\)\)"),
        (lambda: get_peft_model(_nas_model(), LoraConfig(r=4, target_modules=["q_proj"])),
         r"unmerged LoRA tensors.*merge-lora"),
        (lambda: tiny_llama(intermediate_size=512, hidden_act="gelu"), r"hidden_act 'gelu'"),
        (lambda: tiny_llama(intermediate_size=512, attention_bias=True), r"biases \(self_attn\.q_proj\.bias"),
    ],
    ids=["not-256", "heads-pruned", "heads-per-layer", "adapters", "gelu", "biases"],
)
def test_nas_refuses_what_it_cannot_hold_naming_why(tmp_path: Path, make: object, match: str) -> None:
    model = make()  # type: ignore[operator]
    with pytest.raises(ExportError, match=match):
        shear.save(model, tmp_path / "m", target="nas")
    assert not (tmp_path / "m").exists()


def test_nas_refusal_names_the_architectures_it_cannot_hold() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel, MistralConfig, MistralForCausalLM

    assert nas_refusal(tiny_llama()) is None
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64))
    assert "model_type 'gpt2') is not a LLaMA-family model" in (nas_refusal(gpt2) or "")
    mistral = MistralForCausalLM(MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                               sliding_window=16))
    assert "sliding-window attention" in (nas_refusal(mistral) or "")
    roped = tiny_llama(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    assert "rope scaling 'linear'" in (nas_refusal(roped) or "")
    with pytest.raises(ExportError, match=r"not a LLaMA-family model.*target='shear'"):
        plan_nas(gpt2)


def test_ffn_mult_round_trips_through_the_converters_formula() -> None:
    for hidden in (64, 576, 960, 2048, 4096, 5120, 8192):
        for width in range(256, 8 * hidden + 1, 256):
            m = ffn_mult_for(width, hidden)
            assert m is not None and ffn_width(m, hidden) == width and ffn_width(round(m, 6), hidden) == width
    assert ffn_mult_for(1536, 576) == 4.0
    assert ffn_mult_for(300, 576) is None and ffn_mult_for(0, 576) is None


def test_block_widths_reads_no_op_blocks_and_refuses_linear_ones() -> None:
    doc = {"num_attention_heads": 8, "hidden_size": 64, "block_configs": [
        {"attention": {"n_heads_in_group": 4, "no_op": False}, "ffn": {"ffn_mult": 12.0, "no_op": False}},
        {"attention": {"n_heads_in_group": None, "no_op": True}, "ffn": {"ffn_mult": 6.0, "no_op": False}},
        {"attention": {"n_heads_in_group": 8, "no_op": False}, "ffn": {"ffn_mult": None, "no_op": True}},
    ]}
    assert block_widths(doc) == [(8, 2, 512), (0, 0, 256), (8, 1, 0)]
    doc["block_configs"][0]["ffn"]["replace_with_linear"] = True
    with pytest.raises(CheckpointError, match=r"block_configs\[0\] replaces a block with a linear layer"):
        block_widths(doc)


def test_an_edited_nas_config_is_refused(tmp_path: Path) -> None:
    path = shear.save(_nas_model(), tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg["block_configs"][1]["ffn"]["ffn_mult"] = cfg["block_configs"][0]["ffn"]["ffn_mult"]
    (path / "config.json").write_text(json.dumps(cfg))
    _rehash(path, "config.json")
    with pytest.raises(CheckpointError, match=r"block_configs\[1\] makes .* = \(8, 2, 512\), the weights have \(8, 2, 256\)"):
        shear.load(path)


def test_only_shears_own_config_code_is_accepted(tmp_path: Path) -> None:
    path = shear.save(_nas_model(), tmp_path / "m")
    code = path / CONFIG_CODE_FILE
    code.write_text(code.read_text() + "\nimport os\n")
    _rehash(path, CONFIG_CODE_FILE)
    with pytest.raises(ModelLoadError, match=r"config.json asks for code shipped with the model \(auto_map\)"):
        shear.load(path)


def test_save_format_reads_target_specs() -> None:
    assert [save_format(t) for t in ("auto", "nas,cuda", "cpu", "gguf,cpu", None)] == ["auto", "nas", "auto", "auto", "auto"]
    with pytest.raises(InputError, match=r"unknown word 'vllm'.*auto, hf, nas, shear"):
        save_format("vllm")


def test_a_manifest_with_an_unknown_target_is_refused(tmp_path: Path) -> None:
    path = shear.save(_nas_model(), tmp_path / "m")
    data = json.loads((path / "shear.json").read_text())
    data["target"] = "vllm"
    (path / "shear.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"field 'target' is 'vllm'; it must be one of hf, nas, shear"):
        shear.load(path)


def test_prune_says_which_folder_it_wrote_and_where_it_loads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from shear.cli import main
    from shear.zoo.tiny import TINY_LLAMA_DIR

    out = tmp_path / "out"
    assert main(["prune", str(TINY_LLAMA_DIR), "--passes", "random{ratio=0.3,seed=0},erase", "--no-eval", "-o", str(out)]) == 0
    said = capsys.readouterr().out
    assert f"saved to {out} as hf: loads in stock transformers" in said
    assert describe_folder(out).format == "hf"


def test_erased_blocks_are_no_op_blocks_and_round_trip(tmp_path: Path) -> None:
    """Layer 1 loses its MLP block, layer 2 its attention block (depth erasure): the format says both as
    ``no_op`` and holds none of their tensors, norms included; shear.load builds the same model back."""
    from shear.model.blocks import removed_blocks
    from shear.model.branches import branch_of, with_block_groups
    from shear.model.tensors import TensorTable, zero_structures

    model = tiny_llama(intermediate_size=768, num_hidden_layers=3, tie=True)
    with torch.no_grad():
        model.model.layers[0].mlp.gate_proj.weight[512:] = 0
        model.model.layers[0].mlp.up_proj.weight[512:] = 0
    graph = with_block_groups(shear.trace(model, _ids(0)), model)
    blocks = {(branch_of(model, g).layer, branch_of(model, g).kind): g for g in graph.pruning_groups if g.kind == "block"}
    table = TensorTable(model)
    for pick in ((1, "mlp"), (2, "attention")):
        zero_structures(table, blocks[pick], torch.zeros(1, dtype=torch.long))
    small, _ = codegen(model, graph.pruning_groups, example_inputs=(_ids(0),))
    assert removed_blocks(small) == [(), ("mlp",), ("attention",)]
    path = shear.save(small, tmp_path / "m")
    saved = describe_folder(path)
    assert saved.format == "nas" and any("skips a layer whose MLP is no_op" in n for n in saved.not_in)
    blocks_said = json.loads((path / "config.json").read_text())["block_configs"]
    assert [(b["attention"]["no_op"], b["attention"]["n_heads_in_group"]) for b in blocks_said] == [
        (False, 4), (False, 4), (True, None)]
    assert [(b["ffn"]["no_op"], b["ffn"]["ffn_mult"]) for b in blocks_said][1:] == [(True, None), (False, 18.0)]
    names = set(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"])
    assert not any(n.startswith(("model.layers.1.mlp.", "model.layers.1.post_attention_layernorm",
                                 "model.layers.2.self_attn.", "model.layers.2.input_layernorm")) for n in names)
    assert "model.layers.2.post_attention_layernorm.weight" in names and "model.layers.1.self_attn.q_proj.weight" in names
    config = AutoConfig.from_pretrained(path, trust_remote_code=True)
    assert config.block_configs[2].attention.no_op and config.block_configs[1].ffn.no_op  # as vLLM reads them
    again = shear.load(path)
    assert removed_blocks(again) == [(), ("mlp",), ("attention",)]
    assert torch.equal(_logits(again, _ids(7)), _logits(small, _ids(7)))
