"""The IR: tracing every architecture (plain and LoRA), asserted groups, closure, meta device, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from models import ARCHS, build
from torch import nn

import shear
from shear.errors import GraphError, TraceError
from shear.graph.groups import Role
from shear.graph.ir import format_graph, format_structure
from shear.graph.pins import pin_kind
from shear.graph.trace import export_model, run_analysis
from shear.passes.base import Context
from shear.passes.core.discover import DiscoverGroups

GOLDEN = Path(__file__).parent / "golden"

# (arch) -> {group-name suffix: size} of the prunable groups (per layer for layered models)
def _decoder(mlp: str, mlp_size: int, attn: str = "self_attn/head", heads: int = 2) -> dict[str, int]:
    """A 2-layer decoder with a prunable residual (64): per layer an MLP group and a head group."""
    return {"model/residual": 64, **{f"layers.{i}.{mlp}": mlp_size for i in (0, 1)},
            **{f"layers.{i}.{attn}": heads for i in (0, 1)}}  # fmt: skip


EXPECTED = {
    "llama": _decoder("mlp/channel", 96),
    "qwen2": _decoder("mlp/channel", 96),
    "mistral": _decoder("mlp/channel", 80),
    "gpt2": {"h.0.mlp.c_fc/channel": 192, "h.1.mlp.c_fc/channel": 192,
             "h.0.attn.c_attn/head": 4, "h.1.attn.c_attn/head": 4},
    "opt": {"layers.0.fc1/channel": 80, "layers.1.fc1/channel": 80,
            "layers.0.self_attn/head": 4, "layers.1.self_attn/head": 4},
    "bert": {"layer.0.intermediate.dense/channel": 80, "layer.1.intermediate.dense/channel": 80,
             "layer.0.attention.self/head": 4, "layer.1.attention.self/head": 4},
    "qwen3": _decoder("mlp/channel", 96),
    "phi3": _decoder("mlp.gate_up_proj/channel", 96, "self_attn.qkv_proj/head"),
    "gemma3": _decoder("mlp/channel", 96),
    "granite": _decoder("mlp/channel", 96),
    "cnn": {"TinyResNet/channel": 8, "block1/channel": 12, "block1/residual": 12, "branch_a/channel": 6,
            "branch_b/channel": 10, "block2/channel": 16, "block2/residual": 16},
}  # fmt: skip


def _strip(name: str) -> str:
    name = name.removeprefix("base_model.model.")
    for prefix in ("model.decoder.", "model.", "transformer.", "encoder."):
        if name.startswith(prefix) and name != "model/residual":
            name = name[len(prefix) :]
    return name if name != "base_model.model/channel" else "TinyResNet/channel"


@pytest.fixture(scope="module")
def traced() -> dict[tuple[str, bool], tuple[nn.Module, object, shear.graph.Graph]]:
    out = {}
    for arch in ARCHS:
        for lora in (False, True):
            model, inputs = build(arch, lora)
            out[(arch, lora)] = (model, inputs, shear.trace(model, inputs))
    return out


@pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora"])
@pytest.mark.parametrize("arch", ARCHS)
def test_asserted_groups(traced, arch: str, lora: bool) -> None:
    _, _, g = traced[(arch, lora)]
    g.check()
    got = {_strip(p.name): p.size for p in g.prunable_groups}
    assert got == EXPECTED[arch]
    assert not g.diagnostics, g.diagnostics


def test_llama_gqa_family_layout(traced) -> None:
    """A kv head and its 4 query heads are one structure: q rows 4*head_dim, k/v rows head_dim."""
    _, _, g = traced[("llama", False)]
    attn = g.group("model.layers.0.self_attn/head")
    k = {(m.param.rsplit(".", 2)[-2], m.role): m for m in attn.members}
    head_dim = 8
    assert k[("q_proj", Role.PRIMARY)].positions.shape == (2, 4 * head_dim)
    assert k[("k_proj", Role.PRIMARY)].positions.shape == (2, head_dim)
    assert k[("v_proj", Role.PRIMARY)].positions.shape == (2, head_dim)
    assert k[("o_proj", Role.SECONDARY)].positions.shape == (2, 4 * head_dim)
    # kv head 1 owns query heads 4..7, i.e. q rows 32..63
    assert k[("q_proj", Role.PRIMARY)].positions[1].tolist() == list(range(32, 64))
    reasons = {r for p in g.pruning_groups if not p.prunable for r in p.reasons}
    assert any("query heads per kv head" in r for r in reasons)
    assert any("head_dim" in r for r in reasons)


def test_lora_composites_overlaps_and_rank(traced) -> None:
    model, _, g = traced[("llama", True)]
    assert len(g.composites) == 14
    comp = {c.module.rsplit(".", 1)[-1] for c in g.composites}
    assert comp == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    lora_nodes = [n for n in g.nodes if n.op == "lora_linear"]
    assert len(lora_nodes) == 14  # one IR node per composite, not three
    mlp = g.group("base_model.model.model.layers.0.mlp/channel")
    roles = {(m.param.split("mlp.")[1], m.role) for m in mlp.members}
    assert ("gate_proj.lora_B.default.weight", Role.PRIMARY) in roles
    assert ("down_proj.lora_A.default.weight", Role.SECONDARY) in roles
    assert ("gate_proj.base_layer.weight", Role.PRIMARY) in roles
    # the composite's output side belongs to its composed group and to the MLP group at once
    gate = next(c for c in g.node_groups if c.kind == "composed" and c.name.endswith("layers.0.mlp.gate_proj"))
    ov = [o for o in g.overlaps if o.composed == gate.id and o.side == "output"]
    assert [g.node_groups[o.basic].pruning_groups[0] for o in ov] == [mlp.id]
    # the rank is never a prunable space, and freeze flags are untouched by tracing
    assert all(not p.prunable for p in g.pruning_groups if any("lora_A" in m.param and m.dim == 0 for m in p.members))
    assert not model.base_model.model.model.layers[0].mlp.gate_proj.base_layer.weight.requires_grad
    assert model.base_model.model.model.layers[0].mlp.gate_proj.lora_A["default"].weight.requires_grad


def test_residual_rms_norm_rescale_and_layernorm_pinned(traced) -> None:
    _, _, g = traced[("llama", False)]
    res = g.group("model/residual")
    assert {n.module for n in res.norms} == {
        "model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm",
        "model.layers.1.input_layernorm", "model.layers.1.post_attention_layernorm", "model.norm",
    }  # fmt: skip
    _, _, g2 = traced[("gpt2", False)]
    residual = [p for p in g2.pruning_groups if p.kind == "residual"]
    assert residual and all("LayerNorm" in " ".join(p.reasons) for p in residual)


def _zero_structure(model: nn.Module, group, i: int) -> None:
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    with torch.no_grad():
        for s in group.slices(i):
            if s.role is Role.PRIMARY:
                tensors[s.param].index_fill_(s.dim, torch.tensor(s.indices), 0.0)


@pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora"])
@pytest.mark.parametrize("arch", ARCHS)
def test_groups_are_closed(arch: str, lora: bool) -> None:
    """Zeroing one structure's primary slices makes its channel exactly zero at every node whose
    dimension carries that space (so at every consumer), and leaves other structures non-zero."""
    model, inputs = build(arch, lora)
    ep = export_model(model, inputs)
    a = run_analysis(ep, model)
    from shear.graph.discovery import discover

    g = discover(model, ep, a)
    for group in g.prunable_groups:
        i = group.size // 2
        zeroed, _ = build(arch, lora)
        _zero_structure(zeroed, group, i)
        ep_z = export_model(zeroed, inputs)
        values = _run_nodes(ep_z, inputs)
        leaf = _leaf_of(a, group)
        checked = 0
        activations = set(ep.graph_signature.user_inputs)
        for node in ep.graph.nodes:
            if node.op == "call_function" and any(x.name in activations for x in node.all_input_nodes):
                activations.add(node.name)
            if node.name not in activations or node.op != "call_function":
                continue  # parameters themselves carry secondary slices that need not be zero
            if _inside_zero_preserving(model, node):
                continue  # e.g. tanh-GELU's (1 + tanh(..)): only the module's output must be zero
            dims = a.values.get(node)
            t = values.get(node.name)
            if not isinstance(t, torch.Tensor) or not dims or isinstance(dims[0], list):
                continue
            for d, sp in enumerate(dims):
                if sp is None:
                    continue
                occs = a.spaces.expand(sp).get(leaf)
                if not occs:
                    continue
                pos = torch.cat([torch.nonzero(o == i).flatten() for o in occs])
                sl = t.index_select(d, pos)
                assert torch.count_nonzero(sl) == 0, f"{group.name}[{i}] not zero at {node.name} dim {d}"
                checked += 1
        assert checked > 0, group.name


def _inside_zero_preserving(model: nn.Module, node) -> bool:
    from shear.graph.modules.composites import is_zero_preserving_module

    mods = dict(model.named_modules())

    def scope(n) -> str | None:
        stack = n.meta.get("nn_module_stack") or {}
        return next((str(p) for p, _ in stack.values() if str(p) in mods and is_zero_preserving_module(mods[str(p)])), None)

    here = scope(node)
    return here is not None and all(scope(u) == here for u in node.users)


def _leaf_of(a, group) -> int:
    m = group.members[0]
    sp = a.state_dims[(m.param, m.dim)]
    for leaf, occs in a.spaces.expand(sp).items():
        pos = torch.cat([torch.nonzero(o == 0).flatten() for o in occs])
        if a.spaces.size(leaf) == group.size and sorted(pos.tolist()) == sorted(m.positions[0].tolist()):
            return leaf
    raise AssertionError(group.name)


def _run_nodes(ep: torch.export.ExportedProgram, inputs) -> dict[str, object]:
    """Every node's value when the exported program runs on ``inputs``."""
    from torch.fx import Interpreter

    gm = ep.module()
    values: dict[str, object] = {}

    class Recorder(Interpreter):
        def run_node(self, n):  # type: ignore[no-untyped-def]
            out = super().run_node(n)
            values[n.name] = out
            return out

    args, kwargs = (inputs, {}) if isinstance(inputs, tuple) else ((), inputs)
    kwargs = dict(kwargs)
    if "input_ids" in kwargs:
        kwargs["use_cache"] = False
    with torch.no_grad():
        flat = ep._graph_module_flat_inputs(args, kwargs) if hasattr(ep, "_graph_module_flat_inputs") else None
        if flat is None:
            gm(*args, **kwargs)
        else:
            Recorder(ep.graph_module).run(*flat)
    return values


def test_meta_device_llama() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    g = shear.trace(model, {"input_ids": torch.zeros(1, 8, dtype=torch.long)})
    assert len(g.prunable_groups) == 5
    assert g.group("model.layers.1.self_attn/head").size == 2


def test_untraceable_model_names_module() -> None:
    class Bad(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.fc(x)
            if y.sum() > 0:  # data-dependent control flow
                return y
            return -y

    with pytest.raises(TraceError, match=r"could not trace Bad.*\n.*failing module.*\n.*try"):
        shear.trace(Bad(), torch.randn(2, 4))
    with pytest.raises(TraceError, match="needs example_inputs"):
        shear.trace(Bad())
    with pytest.raises(TraceError, match="needs an nn.Module"):
        shear.trace("not a model", torch.randn(1))  # type: ignore[arg-type]


def test_unknown_op_is_pinned_and_reported() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 6)
            self.b = nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.special.entr(self.a(x).abs()))

    g = shear.trace(Odd(), torch.randn(2, 4))
    assert not g.prunable_groups
    assert any("special_entr" in d.message and "register_op" in d.message for d in g.diagnostics)
    assert any("unknown op" in r for p in g.pruning_groups for r in p.reasons)


def test_no_prunable_structure_error() -> None:
    ctx = Context(model=nn.Sequential(nn.Linear(4, 2)), example_inputs=torch.randn(1, 4))
    with pytest.raises(GraphError, match="no prunable structure"):
        DiscoverGroups(require_prunable=True).run(ctx)
    ctx2 = Context(model=nn.Sequential(nn.Linear(4, 2)), example_inputs=torch.randn(1, 4))
    DiscoverGroups().run(ctx2)
    assert any("no prunable structure" in w for w in ctx2.warnings)


def test_group_lookup_error(traced) -> None:
    _, _, g = traced[("cnn", False)]
    with pytest.raises(GraphError, match="no pruning group named"):
        g.group("nope")


@pytest.mark.parametrize("arch", ["llama", "gpt2", "cnn"])
def test_golden_ir(traced, golden, arch: str) -> None:
    """The IR's structure is stable across torch/transformers releases: groups, spaces, sizes, pins by
    kind, composites and overlaps (``format_structure``), not the aten nodes upstream may rename.
    Regenerate with ``pytest --update-golden`` after an intended change; a missing file is a failure."""
    for lora in (False, True):
        _, _, g = traced[(arch, lora)]
        golden(GOLDEN / f"structure_{arch}{'_lora' if lora else ''}.txt", format_structure(g) + "\n")


@pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora"])
@pytest.mark.parametrize("arch", ARCHS)
def test_every_pin_reason_has_a_kind(traced, arch: str, lora: bool) -> None:
    """Golden files compare pin kinds, so every reason a traced architecture produces must classify."""
    _, _, g = traced[(arch, lora)]
    reasons = [r for p in g.pruning_groups for r in p.reasons]
    assert reasons and not [r for r in reasons if pin_kind(r) == "other"]


def test_full_ir_printout_lists_nodes(traced) -> None:
    _, _, g = traced[("llama", True)]
    text = format_graph(g, nodes=True)
    assert text.startswith(g.summary()) and f"nodes: {len(g.nodes)}" in text
    assert text.count("= lora_linear[") == 14


def test_draw(traced, tmp_path: Path) -> None:
    _, _, g = traced[("llama", True)]
    dot = shear.graph.to_dot(g, fold=False)
    assert dot.count("peripheries=2") == 14  # LoRA composites boxed
    assert "overlap output" in dot and "cluster_G" in dot and "unprunable" in dot
    out = tmp_path / "g.dot"
    shear.draw(g, out, fold=False)
    assert out.read_text() == dot
    shear.draw(g, out)  # folded by default (tests/test_draw.py)
    assert out.read_text() == shear.graph.to_dot(g) != dot
    import shutil

    if shutil.which("dot") is None:
        with pytest.raises(shear.ShearError, match="apt-get install graphviz"):
            shear.draw(g, tmp_path / "g.svg")
    else:
        svg = shear.draw(g, tmp_path / "g.svg")
        assert svg.read_text().lstrip().startswith("<?xml")


def test_draw_without_dot(traced, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, _, g = traced[("cnn", False)]
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(shear.ShearError, match=r"dot -Tsvg .*g\.dot -o .*g\.svg"):
        shear.draw(g, tmp_path / "g.svg")
    assert (tmp_path / "g.dot").exists()
