"""The folded node-group drawing: identical blocks fold, differing blocks unfold, deep models fit a screen."""

from __future__ import annotations

import html
import re
import shutil
from pathlib import Path

import pytest
import torch
from models import ARCHS, build

import shear
from shear.graph.draw import KIND_COLOURS, group_class, to_dot, to_svg
from shear.graph.fold import display_kind, fold

GOLDEN = Path(__file__).parent / "golden"
needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz's dot binary is not installed")

SCREEN_PT = (1600.0, 1000.0)
"""Largest drawing (width, height in pt) that reads on one screen without scrolling much."""


def _svg_size(svg: str) -> tuple[float, float]:
    m = re.search(r'<svg width="([\d.]+)pt" height="([\d.]+)pt"', svg)
    assert m, svg[:300]
    return float(m.group(1)), float(m.group(2))


def _llama(layers: int, lora: bool, *, meta: bool = False, **shape: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_attention_heads=8, num_key_value_heads=2
    )
    cfg.update(shape)
    with torch.device("meta" if meta else "cpu"):
        model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=layers, **cfg))
    if lora:
        from shear.training import ensure_lora

        model, _ = ensure_lora(model, r=4)
    return model


_IDS = {"input_ids": torch.zeros(1, 8, dtype=torch.long)}


@pytest.fixture(scope="module")
def llama_lora() -> shear.graph.Graph:
    model, inputs = build("llama", lora=True)
    return shear.trace(model, inputs)


def test_fold_finds_identical_layers(llama_lora) -> None:
    f = fold(llama_lora)
    assert f.container == "base_model.model.model.layers"
    assert [(r.first, r.last, r.full) for r in f.runs] == [(0, 1, 0)]
    assert f.runs[0].label() == "x 1 identical (layer 1)"
    assert {f.local(p.name) for p in f.blocks[0] if p.prunable} == {"mlp/channel", "self_attn/head"}
    assert [p.name for p in f.global_groups if p.prunable] == ["base_model.model.model/residual"]
    assert len(f.composites[0]) == 7 and -1 not in f.composites
    assert display_kind(llama_lora.group("base_model.model.model.layers.0.self_attn/head")) == "kv family"


def test_folded_dot_draws_one_layer(llama_lora) -> None:
    dot = to_dot(llama_lora)
    assert dot.count("peripheries=2") == 7  # the 7 LoRA composites of layer 0, boxed; layer 1 folded
    assert "x 1 identical (layer 1)" in dot and "cluster_B0" in dot and "cluster_B1" not in dot
    assert 'label="mlp/channel x96 (channel)"' in dot and 'label="self_attn/head x2 (kv family)"' in dot
    assert f'color="{KIND_COLOURS["kv family"]}"' in dot and f'color="{KIND_COLOURS["residual"]}"' in dot
    # overlaps with the residual stream: bold from each output side, dotted from each input side
    overlaps = [ln for ln in dot.splitlines() if "overlap (" in ln]
    assert sum("style=bold" in ln for ln in overlaps) == 2  # o_proj and down_proj write the residual
    assert sum("style=dotted" in ln for ln in overlaps) == 5  # q, k, v, gate, up read it
    assert f'class="{group_class("base_model.model.model.layers.*.mlp/channel")}"' in dot
    assert "pinned here" in dot and "lora-rank" in dot and "pinned across layers" in dot


def test_folded_dot_golden(llama_lora, golden) -> None:
    """Regenerate with ``pytest --update-golden`` after an intended change; a missing file is a failure."""
    golden(GOLDEN / "draw_llama_lora_folded.dot", to_dot(llama_lora) + "\n")


def test_differing_layers_unfold() -> None:
    """Layer 1 has a narrower MLP: it is drawn in full with the difference; 2-3 fold into layer 0."""
    from transformers.models.llama.modeling_llama import LlamaMLP

    model = _llama(4, lora=False)
    cfg = model.config.__class__(**{**model.config.to_dict(), "intermediate_size": 48})
    model.model.layers[1].mlp = LlamaMLP(cfg)
    g = shear.trace(model, _IDS)
    f = fold(g)
    assert [(r.first, r.last, r.full) for r in f.runs] == [(0, 0, 0), (1, 1, 1), (2, 3, 0)]
    assert f.runs[1].differences == ("mlp/channel: 96 -> 48",)
    assert f.runs[2].label() == "x 2 identical to layer 0 (layers 2-3)"
    dot = to_dot(g)
    assert "cluster_B0" in dot and "cluster_B1" in dot and "cluster_B2" not in dot
    assert "layers 1  (differs: mlp/channel: 96 -> 48)" in dot
    capped = to_dot(g, max_full=1)
    assert "cluster_B1" not in capped and "differing layers not drawn in full" in capped
    assert "layers 1: mlp/channel: 96 -> 48" in capped and "layers 2-3: like layer 0" not in capped


def test_flat_drawing_still_available(llama_lora) -> None:
    flat = to_dot(llama_lora, fold=False)
    assert flat.count("peripheries=2") == 14 and "cluster_G" in flat


@needs_dot
def test_thirty_layer_lora_drawing_fits_a_screen(tmp_path: Path) -> None:
    """A SmolLM2-135M-shaped model with LoRA (30 layers; drawn flat it was 85,843 pt wide)."""
    model = _llama(30, lora=True, meta=True, vocab_size=49152, hidden_size=576, intermediate_size=1536,
                   num_attention_heads=9, num_key_value_heads=3)  # fmt: skip
    g = shear.trace(model, _IDS)
    svg = html.unescape(shear.draw(g, tmp_path / "groups.svg").read_text())
    w, h = _svg_size(svg)
    assert w <= SCREEN_PT[0] and h <= SCREEN_PT[1], (w, h)
    assert "x 29 identical (layers 1-29)" in svg and svg.count("LoRA r=4") == 7


@needs_dot
@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_draws_folded_and_fits(arch: str) -> None:
    model, inputs = build(arch, lora=True)
    g = shear.trace(model, inputs)
    f = fold(g)
    svg = html.unescape(to_svg(g))
    w, h = _svg_size(svg)
    assert w <= SCREEN_PT[0] and h <= SCREEN_PT[1], (w, h)
    if arch == "cnn":
        assert f.container is None and svg.count("LoRA r=8") == len(
            g.composites
        )  # nothing repeats: drawn whole
    else:
        assert [(r.first, r.last, r.full) for r in f.runs] == [(0, 1, 0)] and "x 1 identical (layer 1)" in svg
        assert 0 < svg.count("LoRA r=8") == len(g.composites) // 2
