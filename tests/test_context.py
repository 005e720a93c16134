"""The typed pass context: analyses by result type, the dense teacher and options as fields, graph
invalidation through ``PassResult.preserves_graph``, and the rule that no pass runs another pass."""

from __future__ import annotations

import ast
import copy
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import pytest
import torch
from models import build

from shear.errors import PipelineError
from shear.graph import trace
from shear.graph.ir import Graph
from shear.model.facts import strip_peft_prefix
from shear.passes import PassManager, parse_pipeline
from shear.passes.base import DENSE, Context, OneOf, Pass, PassResult, register_pass
from shear.passes.core.lora import AddLora, LoraState
from shear.passes.finetune.ebft import EBFT, KeepDense
from shear.passes.lorashear.knowledge import KnowledgeDistribution
from shear.passes.lorashear.lhspg import LHSPG, _unprunable
from shear.passes.lorashear.recovery import DensePerplexity, RecoverDynamic
from shear.training import ensure_lora

PASSES = Path(__file__).resolve().parents[1] / "shear" / "passes"
INFRASTRUCTURE = {"manager.py", "base.py"}
"""The pass manager runs passes; ``Pass.__call__`` is ``self.run``."""


def _mlp() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    return net, torch.randn(1, 4)


# -- no pass runs another pass ------------------------------------------------------------------


def _pass_runs(path: Path) -> list[str]:
    """Calls in ``path`` that run a pass: ``x.run(...)`` / ``x.__call__(...)`` on anything but
    ``self``, ``SomePass(...)(ctx)``, and any use of ``PassManager``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Attribute) and f.attr in ("run", "__call__"):
                if not (isinstance(f.value, ast.Name) and f.value.id == "self"):
                    found.append(f"{path.name}:{node.lineno}: .{f.attr}(")
            if isinstance(f, ast.Call) and isinstance(f.func, ast.Name) and f.func.id[:1].isupper():
                found.append(f"{path.name}:{node.lineno}: {f.func.id}(...)(...)")
        if isinstance(node, ast.Name) and node.id == "PassManager":
            found.append(f"{path.name}:{node.lineno}: PassManager")
    return found


def test_no_pass_runs_another_pass() -> None:
    found = [hit for p in sorted(PASSES.glob("*.py")) if p.name not in INFRASTRUCTURE for hit in _pass_runs(p)]
    assert not found, (
        "a pass runs another pass; declare it in `requires` (the pass manager runs providers, and "
        "re-runs discovery when a PassResult says preserves_graph=False):\n" + "\n".join(found)
    )


def test_the_scan_sees_a_pass_running_a_pass(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        "def run(self, ctx):\n    DiscoverGroups().run(ctx)\n    Erase()(ctx)\n    self.run(ctx)\n"
        "    PassManager(['erase']).run(ctx)\n"
    )
    assert _pass_runs(bad) == [
        "bad.py:2: .run(", "bad.py:3: Erase(...)(...)", "bad.py:5: .run(", "bad.py:5: PassManager"
    ]


# -- the typed API --------------------------------------------------------------------------------


def test_analyses_are_keyed_by_type_or_name() -> None:
    net, x = _mlp()
    ctx = Context(model=net, example_inputs=x)
    assert ctx.graph is None and not ctx.has(Graph) and ctx.find(Graph) is None
    with pytest.raises(PipelineError, match=r"holds no 'graph'; add a pass that ensures it \('discover-groups'.*\) first"):
        ctx.get(Graph)
    graph = trace(net, x)
    ctx.put(graph)
    assert ctx.get(Graph) is graph is ctx.graph and ctx.has("graph") and ctx.get("graph") is graph
    ctx.put({0: [1]}, "chosen")
    assert ctx.get("chosen") == {0: [1]} and ctx.basis("chosen") is graph
    with pytest.raises(PipelineError, match="'graph' must be a Graph, got dict"):
        ctx.put({}, Graph)
    with pytest.raises(PipelineError, match="holds no 'nothing-here', and no registered pass ensures it"):
        ctx.get("nothing-here")
    assert ctx.pop(Graph) is graph and ctx.graph is None
    assert not ctx.has(DENSE) and ctx.has(OneOf((DENSE, "chosen")))
    ctx.dense = net
    assert ctx.get(DENSE) is net and ctx.get(OneOf((DENSE, "chosen"))) is net


def test_results_is_a_view_of_the_typed_fields(tmp_path: Path) -> None:
    net, x = _mlp()
    dense = copy.deepcopy(net)
    graph = trace(net, x)
    ctx = Context(model=net, results={"dense-model": dense, "graph": graph, "dump_dir": str(tmp_path), "mine": 3})
    assert ctx.dense is dense and ctx.graph is graph and ctx.options.dump_dir == tmp_path and ctx.get("mine") == 3
    assert ctx.results["dense-model"] is dense and ctx.results["dump_dir"] == str(tmp_path)
    assert set(ctx.results) == {"graph", "mine", "dense-model", "dump_dir"} and len(ctx.results) == 4
    ctx.results["verify"] = False
    assert ctx.options.verify is False and ctx.results["verify"] is False
    ctx.results["dense-perplexity"] = {"kjv": 20.0}
    assert ctx.find(DensePerplexity) == {"kjv": 20.0}
    assert ctx.retire_graph("erase") is graph and "graph" not in ctx.results
    assert ctx.results["graph-before-erase"] is graph is ctx.retired_graph("erase")
    del ctx.results["dense-model"]
    assert ctx.dense is None and "dense-model" not in ctx.results and ctx.results.get("graph") is None


# -- the manager: preserved graphs, providers, the dense teacher ---------------------------------


@register_pass
@dataclass(frozen=True)
class Rewire(Pass):
    """Pretends to change the model's structure."""

    name: ClassVar[str] = "test-rewire"
    restructures: ClassVar[bool] = True

    def run(self, ctx: Context) -> PassResult:
        return PassResult(changed=True, message="rewired", preserves_graph=False)


@register_pass
@dataclass(frozen=True)
class NeedsGraph(Pass):
    name: ClassVar[str] = "test-needs-graph"
    requires: ClassVar[tuple[type, ...]] = (Graph,)

    def run(self, ctx: Context) -> PassResult:
        return PassResult(changed=False, message=f"{len(ctx.get(Graph).pruning_groups)} groups")


def test_the_manager_retires_a_stale_graph_and_discovers_again() -> None:
    net, x = _mlp()
    ctx = Context(model=net, example_inputs=x)
    pm = PassManager("discover-groups,test-rewire,test-needs-graph")
    assert [(p.name, auto) for p, auto in pm.plan()] == [
        ("discover-groups", False), ("test-rewire", False), ("discover-groups", True), ("test-needs-graph", False)
    ]
    records = pm.run(ctx)
    assert [(r.name, r.auto) for r in records] == [(p.name, auto) for p, auto in pm.plan()]
    first = ctx.retired_graph("test-rewire")
    assert first is not None and ctx.graph is not None and ctx.graph is not first


def test_lhspg_asks_for_lora_with_its_rank_and_discovery_runs_again() -> None:
    planned = PassManager(["discover-groups", LHSPG(lora_r=4)]).plan()
    assert [(p.name, auto) for p, auto in planned] == [
        ("discover-groups", False), ("lora", True), ("discover-groups", True), ("lhspg", False)
    ]
    assert planned[1][0] == AddLora(r=4)
    planned = PassManager("lora,discover-groups,lhspg").plan()
    assert [(p.name, auto) for p, auto in planned] == [("lora", False), ("discover-groups", False), ("lhspg", False)]


def test_lhspg_carries_unprunable_groups_to_the_lora_graph() -> None:
    model, inputs = build("llama")
    plain = trace(model, inputs)
    ctx = Context(model=model, example_inputs=inputs)
    ctx.put(plain)
    marked = frozenset(g.id for g in plain.prunable_groups[:2])
    ctx.results["knowledge-distribution"] = SimpleNamespace(unprunable_groups=marked)
    assert ctx.basis(KnowledgeDistribution) is plain and _unprunable(ctx, plain) == marked
    wrapped, _ = ensure_lora(copy.deepcopy(model), r=4)
    lora = trace(wrapped, inputs)
    ctx.retire_graph("lora")
    ctx.put(lora)
    names = {strip_peft_prefix(plain.pruning_groups[i].name) for i in marked}
    mapped = _unprunable(ctx, lora)
    assert len(mapped) == len(marked) and {strip_peft_prefix(lora.pruning_groups[i].name) for i in mapped} == names


def test_a_missing_dense_model_is_the_managers_standard_error() -> None:
    message = r"pass 'ebft' requires result 'dense-model' \(shear.compile stores the caller's model there unless " \
              r"inplace=True\); add a pass that ensures it \('keep-dense'\) before 'ebft'"
    with pytest.raises(PipelineError, match=message):
        PassManager("magnitude{mode=unstructured},ebft").plan()
    assert KeepDense.auto_insert is False and EBFT(teacher="mine").requires == ("mine",)
    assert [p.name for p, _ in PassManager("keep-dense,magnitude{mode=unstructured},ebft").plan()][0] == "keep-dense"
    assert [p.name for p, _ in PassManager("ebft").plan({DENSE})] == ["ebft"]
    with pytest.raises(PipelineError, match=r"requires result 'dense-model or dense-perplexity'.*'keep-dense'"):
        PassManager("recover-dynamic").plan()
    assert PassManager("recover-dynamic").plan({DensePerplexity})[0][0] == RecoverDynamic()
    assert PassManager("recover-dynamic{stages=instruct}").plan()[0][0].name == "recover-dynamic"
    with pytest.raises(PipelineError, match=r"pass 'lhspg' requires result 'dense-model'"):
        PassManager(parse_pipeline("lora,discover-groups,lhspg{distill=0.5}")).plan()


def test_lora_state_is_typed() -> None:
    net, x = _mlp()
    ctx = Context(model=net, results={"lora": LoraState(added=True, r=8)})
    assert ctx.get(LoraState).added


def test_lora_seed_sets_the_adapters_and_leaves_the_global_rng() -> None:
    def adapters(seed: int) -> dict[str, torch.Tensor]:
        model, _ = build("llama")
        ctx = Context(model=model)
        state = torch.random.get_rng_state()
        AddLora(r=4, seed=seed).run(ctx)
        assert torch.equal(torch.random.get_rng_state(), state)
        return {n: p.detach().clone() for n, p in ctx.model.named_parameters() if "lora_A" in n}

    a0, again, a1 = adapters(0), adapters(0), adapters(1)
    assert a0 and a0.keys() == a1.keys()
    assert all(torch.equal(a0[n], again[n]) for n in a0)
    assert not any(torch.equal(a0[n], a1[n]) for n in a0)
    with pytest.raises(PipelineError, match="lora: seed must be >= 0"):
        AddLora(seed=-1)
