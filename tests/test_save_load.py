"""shear.save / shear.load: exact round trips, plain from_pretrained where allowed, atomicity, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hand_groups import llama_groups, tiny_llama
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import shear.io.checkpoint as ckpt
from shear.codegen.module_tree import codegen
from shear.errors import CheckpointError, OutputError
from shear.io.checkpoint import load, save
from shear.passes.baselines.random import zero_random

LORA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _ids(seed: int) -> torch.Tensor:
    return torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(seed))


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _pruned(*, lora: bool = False, ratio: float = 0.4, residual: bool = True, tie: bool = False) -> nn.Module:
    model = tiny_llama(tie=tie)
    if lora:
        model = get_peft_model(model, LoraConfig(r=8, target_modules=LORA, init_lora_weights=False)).eval()
    groups = llama_groups(model, residual=residual)
    zero_random(model, tuple(groups), ratio, seed=5)
    small, _ = codegen(model, groups, example_inputs=(_ids(0),))
    return small


def _rehash(path: Path, name: str) -> None:
    """Record the current size and sha256 of ``path/name`` in the manifest (a deliberate edit)."""
    mf = path / "shear.json"
    data = json.loads(mf.read_text())
    data["files"][name] = {"size": (path / name).stat().st_size, "sha256": ckpt.sha256_file(path / name)}
    mf.write_text(json.dumps(data))


def _nonuniform() -> nn.Module:
    """Layer 0 keeps more MLP channels than layer 1: only shear.load can rebuild it."""
    model = tiny_llama()
    groups = llama_groups(model, residual=False)
    with torch.no_grad():
        model.model.layers[0].mlp.gate_proj.weight[:10] = 0
        model.model.layers[0].mlp.up_proj.weight[:10] = 0
        model.model.layers[1].mlp.gate_proj.weight[:50] = 0
        model.model.layers[1].mlp.up_proj.weight[:50] = 0
    small, report = codegen(model, groups, example_inputs=(_ids(0),))
    assert not report.from_pretrained_compatible
    return small


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("lora", [False, True])
def test_round_trip_is_identical(tmp_path: Path, lora: bool, tie: bool) -> None:
    small = _pruned(lora=lora, tie=tie)
    save(small, tmp_path / "m")
    again = load(tmp_path / "m")
    assert type(again) is type(small)
    assert torch.equal(_logits(again, _ids(1)), _logits(small, _ids(1)))
    assert {n: p.requires_grad for n, p in again.named_parameters()} == {
        n: p.requires_grad for n, p in small.named_parameters()
    }
    if tie:
        assert again.get_output_embeddings().weight is again.get_input_embeddings().weight


def test_nonuniform_model_reloads_exactly(tmp_path: Path) -> None:
    small = _nonuniform()
    assert small.model.layers[0].mlp.gate_proj.out_features == 86
    assert small.model.layers[1].mlp.gate_proj.out_features == 46
    save(small, tmp_path / "m")
    again = load(tmp_path / "m")
    assert again.model.layers[1].mlp.down_proj.in_features == 46
    assert torch.equal(_logits(again, _ids(2)), _logits(small, _ids(2)))


def test_uniform_model_loads_with_plain_from_pretrained(tmp_path: Path) -> None:
    small = _pruned(ratio=0.5)  # hidden 64 -> 32, 4 query / 1 kv heads, 48 MLP channels per layer
    save(small, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"],
            cfg["intermediate_size"]) == (32, 4, 1, 8, 48)
    plain = LlamaForCausalLM.from_pretrained(tmp_path / "m")
    assert torch.equal(_logits(plain, _ids(3)), _logits(small, _ids(3)))


def test_peft_adapters_reload_onto_the_pruned_base_with_peft(tmp_path: Path) -> None:
    small = _pruned(lora=True, ratio=0.5)
    save(small, tmp_path / "m")
    base = LlamaForCausalLM.from_pretrained(tmp_path / "m")
    again = PeftModel.from_pretrained(base, tmp_path / "m" / "adapter")
    assert torch.allclose(_logits(again, _ids(4)), _logits(small, _ids(4)), atol=1e-6)


def test_what_transformers_accepts() -> None:
    """transformers 5 rejects a hidden size that is not a multiple of the head count, even with head_dim set."""
    LlamaConfig(hidden_size=60, num_attention_heads=3, num_key_value_heads=1, head_dim=16)
    with pytest.raises(Exception, match="not a multiple of the number of attention heads"):
        LlamaConfig(hidden_size=64, num_attention_heads=6, num_key_value_heads=2, head_dim=16)


def test_overwrite_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = _pruned(ratio=0.2)
    save(first, tmp_path / "m")
    second = _pruned(ratio=0.5)

    def crash(*_a: object, **_k: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "sha256_file", crash)
    with pytest.raises(OutputError, match="disk full.*previous content of .* is untouched"):
        save(second, tmp_path / "m", overwrite=True)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temp dir left behind
    again = load(tmp_path / "m")
    assert torch.equal(_logits(again, _ids(5)), _logits(first, _ids(5)))
    save(second, tmp_path / "m", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # the old directory is gone, not hidden
    assert torch.equal(_logits(load(tmp_path / "m"), _ids(5)), _logits(second, _ids(5)))


def test_plain_module_needs_a_skeleton(tmp_path: Path) -> None:
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    net[0].weight = nn.Parameter(net[0].weight[:2].detach().clone())
    net[0].bias = nn.Parameter(net[0].bias[:2].detach().clone())
    net[2].weight = nn.Parameter(net[2].weight[:, :2].detach().clone())
    save(net, tmp_path / "m")
    with pytest.raises(CheckpointError, match=r"plain Sequential .* pass an unpruned instance"):
        load(tmp_path / "m")
    again = load(tmp_path / "m", model=nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)))
    assert again[0].out_features == 2 and again[2].in_features == 2
    x = torch.randn(5, 4)
    assert torch.equal(again(x), net(x))


def test_error_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="is not a directory"):
        load(tmp_path / "missing")


def test_error_not_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    with pytest.raises(CheckpointError, match=r"not a shear checkpoint \(no shear.json\)"):
        load(tmp_path / "x")


def test_error_corrupt_manifest(tmp_path: Path) -> None:
    save(_pruned(), tmp_path / "m")
    (tmp_path / "m" / "shear.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="shear.json is corrupt"):
        load(tmp_path / "m")


def test_error_corrupt_weights(tmp_path: Path) -> None:
    save(_pruned(), tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="fails its sha256 check"):
        load(tmp_path / "m")


def test_error_truncated_weights(tmp_path: Path) -> None:
    save(_pruned(), tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load(tmp_path / "m")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load(tmp_path / "m", integrity=False)


def test_error_mismatched_directory(tmp_path: Path) -> None:
    save(_pruned(), tmp_path / "a")
    save(_nonuniform(), tmp_path / "b")
    (tmp_path / "a" / "model.safetensors").replace(tmp_path / "b" / "model.safetensors")
    with pytest.raises(CheckpointError, match="bytes, expected|mismatched"):
        load(tmp_path / "b", integrity=False)


def test_error_different_architecture(tmp_path: Path) -> None:
    save(_pruned(), tmp_path / "m")
    with pytest.raises(CheckpointError, match=r"does not match the architecture of Sequential"):
        load(tmp_path / "m", model=nn.Sequential(nn.Linear(2, 2)))
    name = json.loads((tmp_path / "m" / "shear.json").read_text())["config_file"]  # shear_config.json: per-layer
    cfg = json.loads((tmp_path / "m" / name).read_text())
    cfg["architectures"] = ["MistralForCausalLM"]
    (tmp_path / "m" / name).write_text(json.dumps(cfg))
    _rehash(tmp_path / "m", name)  # a consistent directory whose parts disagree
    with pytest.raises(CheckpointError, match="mismatched directory"):
        load(tmp_path / "m")


def test_error_future_version(tmp_path: Path) -> None:
    save(_pruned(), tmp_path / "m")
    mf = tmp_path / "m" / "shear.json"
    data = json.loads(mf.read_text())
    data["version"] = 99
    mf.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="format version 99"):
        load(tmp_path / "m")
