"""GGUF export: metadata, per-layer width arrays, tokenizer and every tensor read back with gguf's own reader.

The file is checked against the model, not against the writer's code: q/k rows are put back in
transformers' order by an independent inverse of llama.cpp's rope layout, and a numpy forward
pass that reads only the file and follows llama.cpp's graphs (adjacent-pair rope for llama/deci,
half-split for qwen2, per-layer head and MLP counts) reproduces the model's logits. Running the
file in llama.cpp itself is the slow test at the end (it needs llama-cpp-python).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import shear
from shear.errors import ExportError
from shear.zoo import load_tiny_llama

gguf = pytest.importorskip("gguf")

HEAD_DIM = 32  # the tiny LLaMA: hidden 128, 4 query / 2 kv heads of 32, MLP 384, 4 layers, vocab 2048


@pytest.fixture(scope="module")
def tiny() -> tuple[nn.Module, object]:
    model, tokenizer, _, _ = load_tiny_llama()
    return model, tokenizer


def _nonuniform(model: nn.Module) -> nn.Module:
    """Odd layers lose a kv head (and its two query heads); layer i loses 40·(i+1) MLP channels."""
    masked = load_tiny_llama().model
    masked.load_state_dict(model.state_dict())
    hd = HEAD_DIM
    with torch.no_grad():
        for i, layer in enumerate(masked.model.layers):
            a, mlp = layer.self_attn, layer.mlp
            if i % 2:
                a.k_proj.weight[hd : 2 * hd] = 0
                a.v_proj.weight[hd : 2 * hd] = 0
                a.q_proj.weight[2 * hd : 4 * hd] = 0
                a.o_proj.weight[:, 2 * hd : 4 * hd] = 0
            n = 40 * (i + 1)
            mlp.gate_proj.weight[:n] = 0
            mlp.up_proj.weight[:n] = 0
            mlp.down_proj.weight[:, :n] = 0
    return shear.compile(masked, "discover-groups,erase")


@pytest.fixture(scope="module")
def pruned(tiny: tuple[nn.Module, object]) -> nn.Module:
    return _nonuniform(tiny[0])


def _fields(reader: object) -> dict[str, object]:
    return {k: f.contents() for k, f in reader.fields.items()}  # type: ignore[attr-defined]


def _unpermute(t: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's adjacent-pair rope rows back to transformers' half-split order."""
    rows = t.shape[0]
    return t.reshape(n_head, rows // n_head // 2, 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def _expected(
    model: nn.Module, *, permuted: bool, head_dim: int = HEAD_DIM
) -> dict[str, tuple[torch.Tensor, int | None]]:
    """GGUF name -> (tensor in transformers' order, heads to un-permute or None)."""
    inner = model.model
    out: dict[str, tuple[torch.Tensor, int | None]] = {"token_embd.weight": (inner.embed_tokens.weight, None)}
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output"}
    for i, layer in enumerate(inner.layers):
        a, mlp = layer.self_attn, layer.mlp
        out[f"blk.{i}.attn_norm.weight"] = (layer.input_layernorm.weight, None)
        for proj, name in names.items():
            linear = getattr(a, proj)
            heads = linear.weight.shape[0] // head_dim if permuted and proj in ("q_proj", "k_proj") else None
            out[f"blk.{i}.{name}.weight"] = (linear.weight, heads)
            if linear.bias is not None:
                out[f"blk.{i}.{name}.bias"] = (linear.bias, heads)
        out |= {
            f"blk.{i}.ffn_norm.weight": (layer.post_attention_layernorm.weight, None),
            f"blk.{i}.ffn_gate.weight": (mlp.gate_proj.weight, None),
            f"blk.{i}.ffn_up.weight": (mlp.up_proj.weight, None),
            f"blk.{i}.ffn_down.weight": (mlp.down_proj.weight, None),
        }
    out["output_norm.weight"] = (inner.norm.weight, None)
    return out


def _check_tensors(
    path: Path, model: nn.Module, dtype: str, *, permuted: bool = True, head_dim: int = HEAD_DIM
) -> None:
    reader = gguf.GGUFReader(str(path))
    expected = _expected(model, permuted=permuted, head_dim=head_dim)
    got = {t.name: t for t in reader.tensors}
    assert set(got) == set(expected), "the tied lm_head is not written; every other tensor is"
    for name, (tensor, heads) in expected.items():
        t = got[name]
        want = tensor.detach().float().numpy()
        assert tuple(int(s) for s in t.shape) == tuple(reversed(want.shape)), (
            name
        )  # GGUF lists ne: innermost first
        data = np.asarray(t.data)
        if t.tensor_type == gguf.GGMLQuantizationType.BF16:
            data = (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        data = data.astype(np.float32).reshape(want.shape)
        if heads is not None:
            data = _unpermute(data, heads)
        if want.ndim == 1 or dtype == "f32":
            np.testing.assert_array_equal(data, want, err_msg=name)
        else:
            rounded = tensor.detach().to(shear.io.gguf.DTYPES[dtype]).float().numpy()
            np.testing.assert_array_equal(data, rounded, err_msg=name)


def _gguf_forward(path: Path, ids: list[int]) -> np.ndarray:
    """Logits of the GGUF file computed the way llama.cpp's graphs do, from the file alone (numpy, fp32).

    Sizes come from the metadata (per-layer arrays where present); ``llama``/``deci`` rotate
    adjacent pairs of a head (ggml's NORM rope), ``qwen2`` its two halves (NEOX).
    """
    reader = gguf.GGUFReader(str(path))
    f = _fields(reader)
    arch = f["general.architecture"]

    def key(name: str, layer: int | None = None) -> object:
        v = f[f"{arch}.{name}"]
        return v[layer] if isinstance(v, list) and layer is not None else v

    tensors = {}
    for t in reader.tensors:
        data = np.asarray(t.data)
        if t.tensor_type == gguf.GGMLQuantizationType.BF16:
            data = (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        tensors[t.name] = data.astype(np.float32).reshape(tuple(int(s) for s in reversed(t.shape)))
    eps, hd, base = (
        key("attention.layer_norm_rms_epsilon"),
        key("attention.key_length"),
        key("rope.freq_base"),
    )

    def rms(x: np.ndarray, w: np.ndarray) -> np.ndarray:
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w

    n = len(ids)
    pos = np.arange(n)[:, None]

    def rope(x: np.ndarray) -> np.ndarray:  # [n, heads, hd]
        theta = pos * base ** (-np.arange(0, hd, 2) / hd)  # [n, hd/2]
        cos, sin = np.cos(theta)[:, None], np.sin(theta)[:, None]
        if arch == "qwen2":
            a, b = x[..., : hd // 2], x[..., hd // 2 :]
            return np.concatenate([a * cos - b * sin, a * sin + b * cos], -1)
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
        return out

    def linear(x: np.ndarray, name: str) -> np.ndarray:
        y = x @ tensors[f"{name}.weight"].T
        return y + tensors[f"{name}.bias"] if f"{name}.bias" in tensors else y

    x = tensors["token_embd.weight"][ids]
    mask = np.triu(np.full((n, n), -np.inf), 1)
    for i in range(int(key("block_count"))):
        n_head, n_kv = int(key("attention.head_count", i)), int(key("attention.head_count_kv", i))
        h = rms(x, tensors[f"blk.{i}.attn_norm.weight"])
        q = rope(linear(h, f"blk.{i}.attn_q").reshape(n, n_head, hd))
        k = rope(linear(h, f"blk.{i}.attn_k").reshape(n, n_kv, hd))
        v = linear(h, f"blk.{i}.attn_v").reshape(n, n_kv, hd)
        k, v = np.repeat(k, n_head // n_kv, axis=1), np.repeat(v, n_head // n_kv, axis=1)
        scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd) + mask
        p = np.exp(scores - scores.max(-1, keepdims=True))
        att = np.einsum("hqk,khd->qhd", p / p.sum(-1, keepdims=True), v).reshape(n, n_head * hd)
        x = x + linear(att, f"blk.{i}.attn_output")
        h = rms(x, tensors[f"blk.{i}.ffn_norm.weight"])
        gate = linear(h, f"blk.{i}.ffn_gate")
        x = x + linear(gate / (1 + np.exp(-gate)) * linear(h, f"blk.{i}.ffn_up"), f"blk.{i}.ffn_down")
    head = tensors.get("output.weight", tensors["token_embd.weight"])
    return rms(x, tensors["output_norm.weight"]) @ head.T


def _logits_match(path: Path, model: nn.Module, atol: float = 1e-4) -> None:
    ids = [int(i) for i in torch.randint(0, 2048, (20,), generator=torch.Generator().manual_seed(1))]
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].double().numpy()
    got = _gguf_forward(path, ids)
    np.testing.assert_allclose(got, want, rtol=0, atol=atol * np.abs(want).max())


def test_dense_tiny_llama_is_a_plain_llama_file(tiny: tuple[nn.Module, object], tmp_path: Path) -> None:
    model, tokenizer = tiny
    path = shear.export(model, tmp_path / "tiny.gguf", format="gguf", dtype="f32", tokenizer=tokenizer)
    f = _fields(gguf.GGUFReader(str(path)))
    assert f["general.architecture"] == "llama"
    assert (f["llama.block_count"], f["llama.embedding_length"]) == (4, 128)
    assert (
        f["llama.attention.head_count"],
        f["llama.attention.head_count_kv"],
        f["llama.feed_forward_length"],
    ) == (4, 2, 384)
    assert f["llama.attention.key_length"] == f["llama.rope.dimension_count"] == HEAD_DIM
    assert f["llama.rope.freq_base"] == 10000.0
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert f["general.file_type"] == gguf.LlamaFileType.ALL_F32
    _check_tensors(path, model, "f32")
    _logits_match(path, model)


def test_tokenizer_is_written_as_byte_level_bpe(tiny: tuple[nn.Module, object], tmp_path: Path) -> None:
    model, tokenizer = tiny
    path = shear.export(model, tmp_path / "tiny.gguf", tokenizer=tokenizer)
    f = _fields(gguf.GGUFReader(str(path)))
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    assert (f["tokenizer.ggml.model"], f["tokenizer.ggml.pre"]) == ("gpt2", "gpt-2")
    tokens = f["tokenizer.ggml.tokens"]
    assert len(tokens) == 2048
    assert all(tokens[i] == t for t, i in spec["model"]["vocab"].items())
    assert f["tokenizer.ggml.merges"] == [
        " ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]
    ]
    types = f["tokenizer.ggml.token_type"]
    assert types[0] == gguf.TokenType.CONTROL  # <|endoftext|>, a special added token
    assert set(types[1:]) == {gguf.TokenType.NORMAL}
    assert f["tokenizer.ggml.bos_token_id"] == f["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert f["tokenizer.ggml.add_bos_token"] is False


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_nonuniform_prune_writes_per_layer_arrays(
    pruned: nn.Module, tiny: tuple[nn.Module, object], tmp_path: Path, dtype: str
) -> None:
    path = shear.export(pruned, tmp_path / "pruned.gguf", dtype=dtype, tokenizer=tiny[1])
    f = _fields(gguf.GGUFReader(str(path)))
    assert f["general.architecture"] == "deci"  # llama.cpp's LLaMA graph that reads widths per layer
    assert f["deci.attention.head_count"] == [4, 2, 4, 2]
    assert f["deci.attention.head_count_kv"] == [2, 1, 2, 1]
    assert f["deci.feed_forward_length"] == [344, 304, 264, 224]
    assert f["general.file_type"] == {"f32": 0, "f16": 1, "bf16": 32}[dtype]
    _check_tensors(path, pruned, dtype)
    _logits_match(path, pruned, atol={"f32": 1e-4, "f16": 5e-3, "bf16": 3e-2}[dtype])


def test_pruned_residual_width_and_rescaled_epsilon(tiny: tuple[nn.Module, object], tmp_path: Path) -> None:
    small = shear.compile(tiny[0], "discover-groups,random{ratio=0.3,seed=0},erase")
    path = shear.export(small, tmp_path / "small.gguf", dtype="f32", tokenizer=tiny[1])
    f = _fields(gguf.GGUFReader(str(path)))
    width = small.model.embed_tokens.weight.shape[1]
    assert width < 128 and f["llama.embedding_length"] == width
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(
        small.model.norm.variance_epsilon, rel=1e-6
    )
    _check_tensors(path, small, "f32")


def test_untied_lm_head_is_written(tmp_path: Path, tiny: tuple[nn.Module, object]) -> None:
    model = load_tiny_llama().model
    model.config.tie_word_embeddings = False
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone() * 2)
    path = shear.export(model, tmp_path / "untied.gguf", dtype="f32", tokenizer=tiny[1])
    got = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    np.testing.assert_array_equal(
        np.asarray(got["output.weight"].data), model.lm_head.weight.detach().numpy()
    )


def test_lora_adapters_are_refused_or_merged(tiny: tuple[nn.Module, object], tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    model = load_tiny_llama().model
    lora = get_peft_model(
        model, LoraConfig(r=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    )
    with pytest.raises(ExportError, match="unmerged LoRA adapters.*merge_lora=True"):
        shear.export(lora, tmp_path / "lora.gguf", tokenizer=tiny[1])
    assert not any(tmp_path.iterdir()), "a refused export writes nothing"
    path = shear.export(lora, tmp_path / "lora.gguf", dtype="f32", tokenizer=tiny[1], merge_lora=True)
    assert any("lora_A" in n for n, _ in lora.named_parameters()), (
        "merging for the file leaves the model as it was"
    )
    with torch.no_grad():
        want = lora(torch.tensor([[1, 2, 3]])).logits
    merged = lora.merge_and_unload()
    _check_tensors(path, merged, "f32")
    np.testing.assert_allclose(_gguf_forward(path, [1, 2, 3]), want[0].double().numpy(), rtol=0, atol=1e-4)


def test_existing_output_is_kept_unless_forced(tiny: tuple[nn.Module, object], tmp_path: Path) -> None:
    out = tmp_path / "m.gguf"
    out.write_bytes(b"user data")
    with pytest.raises(ExportError, match="already exists.*force=True"):
        shear.export(tiny[0], out, tokenizer=tiny[1])
    assert out.read_bytes() == b"user data"
    shear.export(tiny[0], out, tokenizer=tiny[1], force=True)
    assert gguf.GGUFReader(str(out)).fields["general.architecture"].contents() == "llama"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"], "no temporary file is left behind"
    with pytest.raises(ExportError, match="is a directory"):
        shear.export(tiny[0], tmp_path, tokenizer=tiny[1])


def test_what_gguf_cannot_hold_is_refused(tiny: tuple[nn.Module, object], tmp_path: Path) -> None:
    model, tokenizer = tiny
    out = tmp_path / "x.gguf"
    with pytest.raises(ExportError, match="pass tokenizer="):
        shear.export(model, out)
    with pytest.raises(ExportError, match="unknown export format 'onnx'"):
        shear.export(model, out, format="onnx", tokenizer=tokenizer)
    with pytest.raises(ExportError, match="dtype 'q4'"):
        shear.export(model, out, dtype="q4", tokenizer=tokenizer)
    with pytest.raises(ExportError, match="not a transformers model"):
        shear.export(nn.Linear(2, 2), out, tokenizer=tokenizer)

    odd = load_tiny_llama().model
    attn = odd.model.layers[2].self_attn
    attn.head_dim = 16  # pretend layer 2's heads were cut to half their width
    with pytest.raises(ExportError, match=r"head_dim differs between layers \(\[16, 32\]\)"):
        shear.export(odd, out, tokenizer=tokenizer)

    odd = load_tiny_llama().model
    odd.model.layers[1].input_layernorm.variance_epsilon = 1e-6
    with pytest.raises(ExportError, match="epsilons differ"):
        shear.export(odd, out, tokenizer=tokenizer)

    odd = load_tiny_llama().model
    odd.config.rope_parameters = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    with pytest.raises(ExportError, match="rope scaling 'yarn'"):
        shear.export(odd, out, tokenizer=tokenizer)
    assert not out.exists() and not any(tmp_path.iterdir())


def test_other_architectures_are_refused(tmp_path: Path, tiny: tuple[nn.Module, object]) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=2048))
    with pytest.raises(ExportError, match=r"LLaMA family \(llama, mistral, qwen2\); GPT2LMHeadModel"):
        shear.export(gpt2, tmp_path / "g.gguf", tokenizer=tiny[1])
    from transformers import Qwen3Config, Qwen3ForCausalLM

    qwen3 = Qwen3ForCausalLM(Qwen3Config(vocab_size=2048, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=16))  # fmt: skip
    with pytest.raises(ExportError, match="model_type 'qwen3'"):
        shear.export(qwen3, tmp_path / "q.gguf", tokenizer=tiny[1])
    assert not any(tmp_path.iterdir())


def _family(arch: str) -> nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=2048, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)  # fmt: skip
    if arch == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**common)).eval()
    return tf.MistralForCausalLM(tf.MistralConfig(sliding_window=None, **common)).eval()


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_qwen2_and_mistral(arch: str, tiny: tuple[nn.Module, object], tmp_path: Path) -> None:
    """Uniform: their own llama.cpp architecture (Qwen2 keeps its half-split rope rows); per-layer
    widths: deci, with Qwen2's q/k biases reordered like its weights."""
    model = _family(arch)
    path = shear.export(model, tmp_path / "u.gguf", dtype="f32", tokenizer=tiny[1])
    native = {"qwen2": "qwen2", "mistral": "llama"}[arch]
    f = _fields(gguf.GGUFReader(str(path)))
    assert f["general.architecture"] == native
    assert f[f"{native}.attention.head_count"] == 4
    _check_tensors(path, model, "f32", permuted=native == "llama", head_dim=16)
    _logits_match(path, model)

    with torch.no_grad():
        a = model.model.layers[1].self_attn  # drop kv head 1 and its query heads 2, 3 in layer 1
        for t in (a.k_proj.weight, a.v_proj.weight, a.q_proj.weight):
            t[t.shape[0] // 2 :] = 0
        for t in (a.k_proj.bias, a.v_proj.bias, a.q_proj.bias):
            if t is not None:
                t[t.shape[0] // 2 :] = 0
        a.o_proj.weight[:, 32:] = 0
        model.model.layers[2].mlp.gate_proj.weight[:30] = 0
        model.model.layers[2].mlp.up_proj.weight[:30] = 0
    small = shear.compile(model, "discover-groups,erase")
    path = shear.export(small, tmp_path / "n.gguf", dtype="f32", tokenizer=tiny[1])
    f = _fields(gguf.GGUFReader(str(path)))
    assert f["general.architecture"] == "deci"
    assert (f["deci.attention.head_count"], f["deci.attention.head_count_kv"]) == ([4, 2, 4], [2, 1, 2])
    assert f["deci.feed_forward_length"] == [96, 96, 66]
    _check_tensors(path, small, "f32", permuted=True, head_dim=16)
    _logits_match(path, small)


def test_cli_export(tmp_path: Path, pruned: nn.Module, tiny: tuple[nn.Module, object]) -> None:
    from shear.cli import main

    shear.save(pruned, tmp_path / "pruned")
    out = tmp_path / "pruned.gguf"
    assert main(["export", str(tmp_path / "pruned"), "-o", str(out), "--dtype", "f32"]) == 1, (
        "no tokenizer next to it"
    )
    tiny[1].save_pretrained(tmp_path / "tok")
    assert (
        main(
            [
                "export",
                str(tmp_path / "pruned"),
                "-o",
                str(out),
                "--dtype",
                "f32",
                "--tokenizer",
                str(tmp_path / "tok"),
            ]
        )
        == 0
    )
    _check_tensors(out, pruned, "f32")
    assert (
        main(["export", str(tmp_path / "pruned"), "-o", str(out), "--tokenizer", str(tmp_path / "tok")]) == 1
    )
    assert (
        main(
            [
                "export",
                str(tmp_path / "pruned"),
                "-o",
                str(out),
                "--tokenizer",
                str(tmp_path / "tok"),
                "--force",
            ]
        )
        == 0
    )


def _llama_cpp_python() -> str | None:
    """An interpreter with llama-cpp-python: $SHEAR_LLAMA_CPP_PYTHON, or this one when it has it."""
    import importlib.util
    import os
    import sys

    if os.environ.get("SHEAR_LLAMA_CPP_PYTHON"):
        return os.environ["SHEAR_LLAMA_CPP_PYTHON"]
    return sys.executable if importlib.util.find_spec("llama_cpp") else None


@pytest.mark.slow
@pytest.mark.parametrize("which", ["nonuniform", "uniform"])
def test_llama_cpp_runs_the_exported_file(
    which: str, pruned: nn.Module, tiny: tuple[nn.Module, object], tmp_path: Path
) -> None:
    """llama.cpp's logits for the exported tiny model match shear's within f16 rounding, and greedy
    decoding picks the same tokens."""
    python = _llama_cpp_python()
    if python is None:
        pytest.skip(
            "llama-cpp-python is not installed (set SHEAR_LLAMA_CPP_PYTHON to an interpreter that has it)"
        )
    from tools import gguf_check as tool

    model = (
        pruned
        if which == "nonuniform"
        else shear.compile(tiny[0], "discover-groups,random{ratio=0.3,seed=0},erase")
    )
    path = shear.export(model, tmp_path / "m.gguf", dtype="f16", tokenizer=tiny[1])
    text = "The quick brown fox jumps over the lazy dog. 12345 times!"
    ids = tiny[1](text)["input_ids"]
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].float().numpy()
        cont = tool.greedy_ids(model, ids[:6], 8)
    request = {
        "gguf": str(path),
        "logits_ids": ids,
        "prompt_ids": ids[:6],
        "new": 8,
        "text": text,
        "threads": 1,
    }
    got = tool.run_client(python, request, tmp_path)
    rel = np.abs(got["logits"] - want).max() / np.abs(want).max()
    assert rel < 1e-2, f"max |diff| / max |logit| = {rel:.2e}"
    assert (got["logits"].argmax(-1) == want.argmax(-1)).mean() > 0.9
    assert got["greedy"] == cont
    assert got["tokens"] == ids
