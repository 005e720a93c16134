"""PassManager: order, timing, prerequisites, invariant checks, dumps, progress, hooks, errors."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from shear.errors import GraphError, PassError, PipelineError
from shear.passes import Context, Pass, PassManager, PassRecord, PassResult, register_pass
from shear.passes.manager import checks_enabled
from shear.progress import ProgressBar


class FakeGraph:
    """Stands in for the IR: printable, with a check() that can be told to fail."""

    def __init__(self) -> None:
        self.broken = False
        self.checks = 0

    def check(self) -> None:
        self.checks += 1
        if self.broken:
            raise GraphError("node group 3 has no primary member")

    def __str__(self) -> str:
        return "graph {\n  group 0: fc/out (4)\n}"


@register_pass
@dataclass(frozen=True)
class MakeFact(Pass):
    """Provides the 'fact' result (a stand-in for discover-groups providing 'graph')."""

    name = "test-make-fact"
    ensures = ("fact",)
    value: int = 42

    def run(self, ctx: Context) -> PassResult:
        ctx.results["fact"] = self.value
        return PassResult(changed=False, message=f"fact={self.value}")


@register_pass
@dataclass(frozen=True)
class UseFact(Pass):
    name = "test-use-fact"
    requires = ("fact",)

    def run(self, ctx: Context) -> PassResult:
        ctx.results["used"] = ctx.results["fact"] + 1
        return PassResult(changed=True, stats={"used": ctx.results["used"]})


@register_pass
@dataclass(frozen=True)
class NeedsNothingProvides(Pass):
    name = "test-needs-unicorn"
    requires = ("unicorn",)

    def run(self, ctx: Context) -> PassResult:  # pragma: no cover - never runs
        return PassResult(changed=False)


@register_pass
@dataclass(frozen=True)
class Boom(Pass):
    name = "test-boom"

    def run(self, ctx: Context) -> PassResult:
        raise ValueError("kaboom")


@register_pass
@dataclass(frozen=True)
class Liar(Pass):
    name = "test-liar"
    ensures = ("promise",)

    def run(self, ctx: Context) -> PassResult:
        return PassResult(changed=False)


@register_pass
@dataclass(frozen=True)
class NoResult(Pass):
    name = "test-no-result"

    def run(self, ctx: Context) -> PassResult:
        return None  # type: ignore[return-value]


@register_pass
@dataclass(frozen=True)
class PutGraph(Pass):
    name = "test-put-graph"
    break_it: bool = False

    def run(self, ctx: Context) -> PassResult:
        graph = ctx.results.setdefault("graph", FakeGraph())
        graph.broken = self.break_it
        return PassResult(changed=self.break_it)


@register_pass
@dataclass(frozen=True)
class Slow(Pass):
    name = "test-slow"
    steps: int = 5

    def run(self, ctx: Context) -> PassResult:
        with ctx.progress(total=self.steps, description="slow") as bar:
            for _ in range(self.steps):
                bar.advance()
        return PassResult(changed=False)


def ctx() -> Context:
    return Context(model=torch.nn.Linear(3, 2))


def test_runs_in_order_and_times_each_pass() -> None:
    c = ctx()
    records = PassManager("test-make-fact{value=1},test-use-fact").run(c)
    assert [r.name for r in records] == ["test-make-fact", "test-use-fact"]
    assert [r.spec for r in records] == ["test-make-fact{value=1}", "test-use-fact"]
    assert all(r.seconds >= 0 for r in records)
    assert records[0].message == "fact=1" and records[1].stats == {"used": 2} and records[1].changed
    assert c.results["used"] == 2


def test_missing_prerequisite_runs_its_provider() -> None:
    c = ctx()
    pm = PassManager(["test-use-fact"])
    assert [(p.name, auto) for p, auto in pm.plan()] == [("test-make-fact", True), ("test-use-fact", False)]
    records = pm.run(c)
    assert [(r.name, r.auto) for r in records] == [("test-make-fact", True), ("test-use-fact", False)]
    assert c.results["used"] == 43


def test_available_result_is_not_recomputed() -> None:
    c = ctx()
    c.results["fact"] = 7
    records = PassManager("test-use-fact").run(c)
    assert [r.name for r in records] == ["test-use-fact"] and c.results["used"] == 8


def test_missing_prerequisite_without_provider() -> None:
    with pytest.raises(PipelineError, match=r"pass 'test-needs-unicorn' requires result 'unicorn', and no registered pass ensures it"):
        PassManager("test-make-fact,test-needs-unicorn").run(ctx())


def test_missing_prerequisite_when_auto_is_off() -> None:
    with pytest.raises(PipelineError, match=r"requires result 'fact'; add a pass that ensures it \('test-make-fact'\) before 'test-use-fact'"):
        PassManager("test-use-fact", auto_prerequisites=False).run(ctx())


def test_prerequisite_in_wrong_order() -> None:
    with pytest.raises(PipelineError, match=r"'test-make-fact' runs after it: move 'test-make-fact' before 'test-use-fact'"):
        PassManager("test-use-fact,test-make-fact").run(ctx())


def test_failing_pass_names_itself_and_predecessors() -> None:
    with pytest.raises(PassError, match=r"pass 'test-boom' \(after passes \['test-make-fact', 'test-use-fact'\]\) failed: ValueError: kaboom") as info:
        PassManager("test-make-fact,test-use-fact,test-boom").run(ctx())
    assert isinstance(info.value.__cause__, ValueError)


def test_pass_that_does_not_store_what_it_ensures() -> None:
    with pytest.raises(PassError, match=r"pass 'test-liar' .* declares ensures=\('promise',\) but did not store \['promise'\]"):
        PassManager("test-liar").run(ctx())


def test_pass_that_returns_no_result() -> None:
    with pytest.raises(PassError, match=r"pass 'test-no-result' .*run\(\) returned NoneType, expected PassResult"):
        PassManager("test-no-result").run(ctx())


def test_invariants_checked_after_every_pass_under_pytest() -> None:
    assert checks_enabled()
    c = ctx()
    PassManager("test-put-graph,test-make-fact").run(c)
    assert c.results["graph"].checks == 2
    with pytest.raises(PassError, match=r"IR invariants broken after pass 'test-put-graph' \(after passes \['test-make-fact'\]\): GraphError: node group 3") as info:
        PassManager("test-make-fact,test-put-graph{break_it=true}").run(ctx())
    assert isinstance(info.value.__cause__, GraphError)


def test_checks_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    PassManager("test-put-graph{break_it=true}", check=False).run(ctx())
    monkeypatch.setenv("SHEAR_DEBUG", "0")
    assert not checks_enabled()
    PassManager("test-put-graph{break_it=true}").run(ctx())
    monkeypatch.setenv("SHEAR_DEBUG", "1")
    monkeypatch.delenv("PYTEST_CURRENT_TEST")
    assert checks_enabled()


def test_dump_dir_writes_ir_after_each_pass(tmp_path: Path) -> None:
    PassManager("test-make-fact,test-put-graph", dump_dir=tmp_path / "dump").run(ctx())
    files = sorted(p.name for p in (tmp_path / "dump").iterdir())
    assert files[:3] == ["01-test-make-fact.txt", "02-test-put-graph.txt", "pipeline.txt"]
    assert "no graph in the context yet" in (tmp_path / "dump" / "01-test-make-fact.txt").read_text()
    text = (tmp_path / "dump" / "02-test-put-graph.txt").read_text()
    assert text.startswith("# after pass 2: test-put-graph\n# parameters: 8\n") and "group 0: fc/out" in text
    assert (tmp_path / "dump" / "pipeline.txt").read_text() == "test-make-fact,test-put-graph\n"


class RecordingSink:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, int]] = []

    def start(self, bar: ProgressBar) -> None:
        self.events.append(("start", bar.description, bar.completed))

    def update(self, bar: ProgressBar) -> None:
        self.events.append(("update", bar.description, bar.completed))

    def stop(self, bar: ProgressBar) -> None:
        self.events.append(("stop", bar.description, bar.completed))


def test_progress_reaches_the_sink() -> None:
    c = ctx()
    c.progress_sink = sink = RecordingSink()
    PassManager("test-slow{steps=3}").run(c)
    assert ("stop", "slow", 3) in sink.events
    assert sink.events[0] == ("start", "passes", 0) and sink.events[-1] == ("stop", "pass test-slow", 1)


def test_rich_sink_renders() -> None:
    from shear.progress import RichSink

    c = ctx()
    c.progress_sink = RichSink()
    PassManager("test-slow{steps=2}").run(c)


def test_hooks_see_every_pass() -> None:
    seen: list[tuple[str, str]] = []

    class Hook:
        def before_pass(self, p: Pass, c: Context) -> None:
            seen.append(("before", p.name))

        def after_pass(self, p: Pass, record: PassRecord, c: Context) -> None:
            seen.append(("after", record.name))

    PassManager("test-use-fact", hooks=[Hook()]).run(ctx())
    assert seen == [("before", "test-make-fact"), ("after", "test-make-fact"), ("before", "test-use-fact"), ("after", "test-use-fact")]


def test_repr_and_pipeline_round_trip() -> None:
    pm = PassManager(["test-make-fact{value=3}", UseFact()])
    assert pm.pipeline == "test-make-fact{value=3},test-use-fact"
    assert repr(pm) == "PassManager('test-make-fact{value=3},test-use-fact')"
    assert PassManager(pm.pipeline).passes == pm.passes


def test_default_pipeline_names_discover_groups() -> None:
    from shear.passes import DEFAULT_PIPELINE

    assert DEFAULT_PIPELINE[0] == "discover-groups"
