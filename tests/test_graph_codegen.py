"""GraphModule codegen: models whose forward hard-codes pruned sizes still erase, exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from models import build, fresh_inputs
from torch import nn

import shear
from shear.codegen.module_tree import codegen
from shear.codegen.verify import call_model, flatten_tensors
from shear.errors import GraphError, PassError, PipelineError
from shear.passes import parse_pipeline


class HardCodedAttention(nn.Module):
    """nanoGPT-style attention that reads its head count from a plain attribute."""

    def __init__(self, d: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.n_head = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).contiguous().view(b, t, c))


class SlicedGLU(nn.Module):
    """A gated MLP that slices its fused up-projection with constant bounds."""

    def __init__(self, d: int = 32, hidden: int = 48) -> None:
        super().__init__()
        self.hidden = hidden
        self.up = nn.Linear(d, 2 * hidden)
        self.down = nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        return self.down(F.silu(h[..., : self.hidden]) * h[..., self.hidden :])


class TinyGPT(nn.Module):
    def __init__(self, vocab: int = 50, d: int = 32) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = HardCodedAttention(d)
        self.mlp = SlicedGLU(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.emb(idx)
        x = x + self.attn(self.ln1(x))
        x = x + self.mlp(self.ln2(x))
        return self.head(x)


def _tiny_gpt() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return TinyGPT().eval(), torch.randint(0, 50, (2, 8))


def _masked_and_small(model: nn.Module, ids: object, pipeline: str) -> tuple[nn.Module, nn.Module]:
    """The masked model (the same seeded passes without the final erase) and the erased one."""
    assert pipeline.endswith(",erase")
    masked = shear.compile(model, pipeline.removesuffix(",erase"), example_inputs=ids)
    small = shear.compile(model, pipeline, example_inputs=ids)
    return masked, small


def _max_diff(a: nn.Module, b: nn.Module, inputs: object) -> float:
    with torch.no_grad():
        xs, ys = flatten_tensors(call_model(a, inputs)), flatten_tensors(call_model(b, inputs))
    return max(float((x - y).abs().max()) for x, y in zip(xs, ys, strict=True) if x.is_floating_point())


def test_hard_coded_sizes_fall_back_to_a_graph_module_that_equals_the_masked_model() -> None:
    model, ids = _tiny_gpt()
    pipeline = "discover-groups,random{ratio=0.5,seed=0},erase"
    masked, small = _masked_and_small(model, ids, pipeline)
    assert isinstance(small, torch.fx.GraphModule)
    assert any("sliced module tree cannot run" in w and "attn" in w for w in small.shear_report.warnings)
    erase = next(r for r in small.shear_report.passes if r.name == "erase")
    assert erase.stats["emitted"] == "graph" and erase.stats["max_diff"] <= 1e-5
    assert small.attn.qkv.weight.shape == (48, 32) and small.mlp.down.weight.shape[1] == 24  # 2 of 4 heads, 24 of 48
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    for shape in ((2, 8), (3, 5), (2, 13)):  # the graph is dynamic in batch and sequence length
        x = torch.randint(0, 50, shape, generator=torch.Generator().manual_seed(shape[1]))
        assert _max_diff(small, masked, x) <= 1e-5
    assert model.attn.qkv.weight.shape == (96, 32)  # the user's model is untouched


def test_module_only_emit_keeps_the_clear_error() -> None:
    model, ids = _tiny_gpt()
    with pytest.raises(PassError, match="hard-codes a pruned size"):
        shear.compile(model, "discover-groups,random{ratio=0.5,seed=0},erase{emit=module}", example_inputs=ids)
    with pytest.raises(PipelineError, match="emit must be one of"):
        parse_pipeline("erase{emit=fx}")


@pytest.mark.parametrize("arch", ["llama", "gpt2", "cnn"])
def test_forced_graph_emit_equals_the_module_tree(arch: str) -> None:
    """emit=graph on models the module tree handles: both equal the masked model (LLaMA prunes the
    residual too, so its RMSNorm means over a shrunk width become sum / old width in the graph)."""
    model, _ = build(arch)
    inputs = fresh_inputs(arch, batch=2) if arch != "cnn" else torch.randn(2, 3, 16, 16)
    masked = shear.compile(model, "discover-groups,random{ratio=0.4,seed=1}", example_inputs=inputs)
    tree = shear.compile(model, "discover-groups,random{ratio=0.4,seed=1},erase{emit=module}", example_inputs=inputs)
    graph = shear.compile(model, "discover-groups,random{ratio=0.4,seed=1},erase{emit=graph}", example_inputs=inputs)
    assert isinstance(graph, torch.fx.GraphModule) and not isinstance(tree, torch.fx.GraphModule)
    n_tree = sum(p.numel() for p in tree.parameters())
    assert sum(p.numel() for p in graph.parameters()) == n_tree < sum(p.numel() for p in model.parameters())
    assert _max_diff(graph, masked, inputs) <= 1e-5
    assert _max_diff(graph, tree, inputs) <= 1e-5
    if arch == "llama":  # the residual shrank, and every RMSNorm mean over it became a sum / old width
        assert graph.model.embed_tokens.weight.shape[1] < model.model.embed_tokens.weight.shape[1]
        ops = {str(n.target) for n in graph.graph.nodes}
        assert "aten.mean.dim" not in ops and "aten.sum.dim_IntList" in ops


class InterleavedGLU(nn.Module):
    """GPT-OSS's GLU layout: one fused projection, gate and up read back as even and odd columns."""

    def __init__(self, vocab: int = 50, d: int = 32, hidden: int = 48) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.gate_up = nn.Linear(d, 2 * hidden)
        self.down = nn.Linear(hidden, d)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.emb(idx)
        h = self.gate_up(x)
        return self.head(x + self.down(F.silu(h[..., ::2]) * h[..., 1::2]))


def test_strided_reads_couple_gate_and_up_and_erase_in_both_emitters() -> None:
    torch.manual_seed(0)
    model, ids = InterleavedGLU().eval(), torch.randint(0, 50, (2, 8))
    (glu,) = [g for g in shear.trace(model, ids).pruning_groups if "down" in g.modules and g.size == 48]
    assert glu.prunable and set(glu.modules) == {"gate_up", "down"}
    rows = next(m for m in glu.members if m.param == "gate_up.weight").positions
    assert rows[:3].tolist() == [[0, 1], [2, 3], [4, 5]]  # channel i is gate row 2i and up row 2i + 1
    pipeline = "discover-groups,random{ratio=0.5,seed=0},erase"
    masked, tree = _masked_and_small(model, ids, pipeline)
    graph = shear.compile(model, pipeline + "{emit=graph}", example_inputs=ids)
    assert not isinstance(tree, torch.fx.GraphModule) and isinstance(graph, torch.fx.GraphModule)
    assert tree.gate_up.weight.shape[0] == graph.gate_up.weight.shape[0] == 2 * tree.down.weight.shape[1] < 96
    steps = [n.args[1:] for n in graph.graph.nodes if n.target is torch.ops.aten.slice.Tensor]
    assert sorted(s[1::2] for s in steps) == [(0, 2), (1, 2)]  # still the even and the odd columns
    for x in (ids, torch.randint(0, 50, (3, 5))):
        assert _max_diff(tree, masked, x) <= 1e-5 and _max_diff(graph, masked, x) <= 1e-5


def test_codegen_emit_errors() -> None:
    model, ids = _tiny_gpt()
    groups = shear.trace(model, ids).pruning_groups
    with pytest.raises(GraphError, match="emit must be one of"):
        codegen(model, groups, example_inputs=ids, emit="tree")
    with pytest.raises(GraphError, match="needs example_inputs"):
        codegen(model, groups, emit="graph")


def test_docstring_example() -> None:
    import doctest

    import shear.codegen.graph_module as module

    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 8 and result.failed == 0


def test_graph_module_saves_loads_and_fine_tunes(tmp_path: object) -> None:
    from pathlib import Path

    from shear.io.checkpoint import load, save

    model, ids = _tiny_gpt()
    small = shear.compile(model, "discover-groups,random{ratio=0.5,seed=0},erase", example_inputs=ids)
    assert isinstance(small, torch.fx.GraphModule)
    out = save(small, Path(str(tmp_path)) / "gm")
    assert {p.name for p in out.iterdir()} == {"program.pt2", "shear.json"}
    again = load(out)
    other = torch.randint(0, 50, (3, 11), generator=torch.Generator().manual_seed(3))
    assert _max_diff(again, small, ids) == 0.0 and _max_diff(again, small, other) == 0.0
    twice = load(save(again, Path(str(tmp_path)) / "gm2"))  # a loaded graph saves again
    assert _max_diff(twice, small, other) == 0.0
    # and it trains: one SGD step on the reloaded graph lowers the loss on that batch
    again.train()
    opt = torch.optim.SGD(again.parameters(), lr=0.5)
    losses = []
    for _ in range(2):
        logits = again(ids)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, 50), ids[:, 1:].reshape(-1))
        losses.append(float(loss))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[1] < losses[0]
    (out / "program.pt2").write_bytes(b"garbage")
    with pytest.raises(shear.errors.CheckpointError, match="program.pt2 has 7 bytes"):
        load(out)


def test_export_of_a_foreign_graph_module_is_refused() -> None:
    from shear.codegen.graph_module import export_graph_module

    with pytest.raises(GraphError, match="not emitted by shear"):
        export_graph_module(torch.fx.symbolic_trace(nn.Linear(2, 2)))


def _slice_node(dead: list[bool], start: object, end: object, step: object) -> tuple[object, torch.fx.Node]:
    """A graph ``x[start:end:step]`` over a 6-wide dimension whose structures ``dead`` are erased."""
    from shear.codegen.graph_module import LiveDims
    from shear.graph.analysis import DimAnalysis

    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    bound = graph.placeholder("n") if start == "symbolic" else start
    node = graph.call_function(torch.ops.aten.slice.Tensor, (x, 0, bound, end, step))
    a = DimAnalysis()
    a.values[x] = [a.spaces.new(6, "x")]
    return LiveDims(a, {a.values[x][0]: torch.tensor(dead)}), node


def test_strided_slice_size_rule_renumbers_whole_strides_and_refuses_the_rest() -> None:
    from shear.graph.ops.specs import lookup_size_rule

    rule = lookup_size_rule(torch.ops.aten.slice.Tensor)
    live, node = _slice_node([True, True, False, False, False, False], 0, None, 2)  # pair 0 erased
    rule(live, node)
    assert node.args[1:] == (0, 0, 3, 2)  # even positions 2, 4 of the old tensor are 0, 2 of the new
    live, node = _slice_node([False, True, False, False, False, False], 0, None, 2)  # half a pair erased
    with pytest.raises(GraphError, match=r"keeps positions \[0, 1, 3\].*prune that dimension in whole strides"):
        rule(live, node)
    live, node = _slice_node([True, False, False, False, False, False], "symbolic", None, 1)
    with pytest.raises(GraphError, match="slice with symbolic bounds over a pruned dimension"):
        rule(live, node)


# --- the shipped tiny LLaMA through the graph emitter ------------------------------------------------


def _tiny_llama(dtype: torch.dtype = torch.float32) -> nn.Module:
    from shear.zoo import load_tiny_llama

    return load_tiny_llama(dtype=dtype).model


def _erase_stats(small: nn.Module) -> dict[str, object]:
    return next(r for r in small.shear_report.passes if r.name == "erase").stats


@pytest.mark.parametrize(
    ("kinds", "dtype"),
    [("channel", torch.float32), ("head", torch.float32), ("residual", torch.float32), (None, torch.float32),
     (None, torch.float16)],
)
def test_graph_emit_of_the_tiny_llama_verifies_within_1e5(kinds: str | None, dtype: torch.dtype) -> None:
    """MLP channels, kv-head families and the residual width, alone and together; fp16 (what the CLI
    loads) is checked in fp32 on a widened copy of the graph, against the masked model itself."""
    model = _tiny_llama(dtype)
    choose = "random{ratio=0.3,seed=0" + (f",kinds=[{kinds}]" if kinds else "") + "}"
    small = shear.compile(model, f"{choose},erase{{emit=graph}}")
    stats = _erase_stats(small)
    assert isinstance(small, torch.fx.GraphModule) and stats["emitted"] == "graph"
    assert stats["structures"] > 0 and stats["params_after"] < stats["params_before"]
    assert isinstance(stats["max_diff"], float) and stats["max_diff"] <= 1e-5
    assert next(iter(small.parameters())).dtype == dtype  # verification put the graph back as it was
    if dtype == torch.float32:  # the check's figure is the plain difference from the masked model
        masked = shear.compile(model, choose)
        ids = small.meta["shear_inputs"][1]["input_ids"]
        assert _max_diff(small, masked, {"input_ids": ids}) <= 1e-5


def test_graph_emitted_from_batch_1_inputs_takes_any_batch() -> None:
    """The default example inputs have batch 1; export would fix the batch to 1, so the emitter traces
    them at batch 2: the graph (and the program shear.save writes) gives every row its batch-1 logits."""
    from shear.codegen.graph_module import export_graph_module
    from shear.codegen.verify import allowed

    model = _tiny_llama()
    small = shear.compile(model, "random{ratio=0.3,seed=0},erase{emit=graph}")
    masked = shear.compile(model, "random{ratio=0.3,seed=0}")
    ids = torch.randint(0, model.config.vocab_size, (3, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        three = small(input_ids=ids).logits
        ones = torch.cat([small(input_ids=ids[i : i + 1]).logits for i in range(3)])
        reference = masked(input_ids=ids).logits
        saved = export_graph_module(small).module()(input_ids=ids, use_cache=False).logits
    assert three.shape == (3, 11, model.config.vocab_size)
    assert float((three - ones).abs().max()) <= 1e-5
    assert float((three - reference).abs().max()) <= allowed(float(reference.abs().max()))
    assert float((saved - three).abs().max()) <= 1e-5


def _plant_wrong_erase(monkeypatch: pytest.MonkeyPatch) -> None:
    """Erase the wrong MLP channels from each down_proj (the neighbours of the zero ones): the shapes
    still fit, the function does not."""
    import shear.codegen.graph_module as gc

    real = gc._slice_state

    def wrong(ep: object, model: nn.Module, plan: object) -> None:
        for name, dims in plan.cuts.items():
            if name.endswith("mlp.down_proj.weight") and 1 in dims:
                size = model.get_parameter(name).shape[1]
                shifted = torch.unique((dims[1] + 1) % size)
                assert shifted.numel() == dims[1].numel() and not torch.equal(shifted, dims[1])
                dims[1] = shifted
        real(ep, model, plan)

    monkeypatch.setattr(gc, "_slice_state", wrong)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_planted_wrong_graph_erase_fails_verification(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    _plant_wrong_erase(monkeypatch)
    with pytest.raises(PassError, match="small model differs from the masked original"):
        shear.compile(_tiny_llama(dtype), "random{ratio=0.3,seed=0,kinds=[channel]},erase{emit=graph}")


def test_cli_no_verify_skips_every_erase_check(
    monkeypatch: pytest.MonkeyPatch, tmp_path: object, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--no-verify`` reaches erase's own check (it used to skip only the pipeline's): with a planted
    wrong erase the run fails without the flag and saves with it, and no recording is ever taken."""
    from pathlib import Path

    import shear.codegen.verify as verify
    from shear.cli import main
    from shear.zoo import TINY_LLAMA_DIR

    _plant_wrong_erase(monkeypatch)
    out = Path(str(tmp_path))
    argv = ["prune", str(TINY_LLAMA_DIR), "--pipeline", "random{ratio=0.3,seed=0,kinds=[channel]},erase{emit=graph}"]
    assert main([*argv, "-o", str(out / "checked")]) == 1
    assert "VerifyError: verify: small model differs from the masked original" in capsys.readouterr().err
    assert not (out / "checked").exists()
    recordings: list[object] = []
    real = verify.record
    monkeypatch.setattr(verify, "record", lambda *a, **k: recordings.append(a) or real(*a, **k))
    assert main([*argv, "-o", str(out / "unchecked"), "--no-verify"]) == 0
    assert (out / "unchecked" / "shear.json").is_file() and recordings == []
    with pytest.raises(PassError, match="small model differs"):  # the API's verify=True still checks
        shear.compile(_tiny_llama(), "random{ratio=0.3,seed=0,kinds=[channel]},erase{emit=graph}")
    assert len(recordings) == 1


class BatchOfOne(nn.Module):
    """A forward that hard-codes batch 1 (``view(1, ...)``): export cannot keep the batch dynamic."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.head = nn.Embedding(50, 16), nn.Linear(16, 50)
        self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.emb(idx)
        return self.head(x + self.down(torch.relu(self.up(x))).view(1, idx.shape[1], 16))


def test_a_graph_that_fixes_the_batch_refuses_other_batches_with_an_input_error(tmp_path: object) -> None:
    from pathlib import Path

    from shear.errors import InputError
    from shear.io.checkpoint import load, save

    torch.manual_seed(0)
    model, ids = BatchOfOne().eval(), torch.randint(0, 50, (1, 8))
    small = shear.compile(model, "discover-groups,random{ratio=0.5,seed=0},erase{emit=graph}", example_inputs=ids)
    assert isinstance(small, torch.fx.GraphModule) and small.up.weight.shape[0] == 16
    again = load(save(small, Path(str(tmp_path)) / "b1"))
    for gm in (small, again):
        assert gm(torch.randint(0, 50, (1, 5))).shape == (1, 5, 50)  # the sequence length still varies
        with pytest.raises(InputError, match=r"idx has shape \(3, 8\), but this graph fixes its dimension 0 to 1.*"
                           r"idx.shape\[0\] == 1 \(one sequence at a time\)"):
            gm(torch.randint(0, 50, (3, 8)))
