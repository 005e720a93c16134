"""What the HTML report shows, gathered from a finished pipeline as plain data.

:func:`collect` reads the :class:`~shear.report.summary.CompileReport` and the results the passes left in
the context — the traced graph (the LoRA-wrapped one when a pass added adapters), the knowledge
distribution, LHSPG's schedule, the recovery rounds — and turns them into a :class:`ReportData`.
Anything a pipeline did not run stays ``None``, and the page says "not run" for it. Callers add
what only they measured (perplexity before/after, generations) before writing the page.

Example:
    >>> small = shear.compile(model, "random{ratio=0.3,seed=0},erase", example_inputs=x)  # doctest: +SKIP
    >>> data = small.shear_report.details                                                 # doctest: +SKIP
    >>> data.generations = [{"prompt": "Hi", "before": "...", "after": "..."}]             # doctest: +SKIP
    >>> shear.report.write_html(data, "report.html")                                   # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from shear.graph.fold import display_kind, repeated_container, split_block
from shear.graph.ir import Graph
from shear.model.facts import strip_peft_prefix

__all__ = ["ReportData", "WidthRow", "collect", "pick_graph", "layer_widths"]

GRAPH_KEYS: tuple[str, ...] = ("graph-before-erase", "graph-before-merge", "graph", "graph-before-lora")
"""Where the passes leave the traced graph, in the order the report prefers them."""


@dataclass
class WidthRow:
    """One row of the widths heatmap: a group of every layer (e.g. ``mlp: channels``)."""

    label: str
    before: list[int | None]
    """Per layer: structures before the pipeline (``None``: the layer has no such group)."""
    after: list[int | None]
    """Per layer: structures kept (erased and zeroed ones not counted)."""


@dataclass
class ReportData:
    """Everything the HTML report renders; ``None`` marks a stage the pipeline did not run."""

    title: str
    model: str = ""
    pipeline: str = ""
    params_before: int = 0
    params_after: int = 0
    passes: list[dict[str, Any]] = field(default_factory=list)
    """Per pass: ``spec``, ``seconds``, ``changed``, ``auto``, ``message``."""
    verify: list[dict[str, Any]] = field(default_factory=list)
    """Per check: ``what`` (the pass, or the whole compile), ``max_diff``, ``note``."""
    warnings: list[str] = field(default_factory=list)
    layers: list[int] = field(default_factory=list)
    widths: list[WidthRow] = field(default_factory=list)
    other_groups: list[dict[str, Any]] = field(default_factory=list)
    """Prunable groups outside the layers (the residual stream): ``name``, ``kind``, ``before``, ``after``."""
    knowledge: dict[str, Any] | None = None
    lhspg: dict[str, Any] | None = None
    recovery: dict[str, Any] | None = None
    perplexity: dict[str, Any] | None = None
    """``{"before": {source: ppl}, "after": {source: ppl}}`` where the caller measured it."""
    generations: list[dict[str, str]] | None = None
    """``[{"prompt", "before", "after"}]`` where the caller generated text."""
    verdict: dict[str, Any] | None = None
    """The quality verdict (:meth:`shear.evaluation.verdict.Verdict.to_dict`) when the run evaluated."""
    speed: dict[str, Any] | None = None
    """Dense vs pruned tokens/s (:meth:`shear.evaluation.speed.SpeedComparison.to_dict`) when measured."""
    graph: Graph | None = field(default=None, repr=False)
    """The IR the drawing shows (the LoRA-wrapped graph the pipeline pruned, when it had one)."""
    notes: list[str] = field(default_factory=list)
    target: dict[str, Any] | None = None
    """The run's resolved target (:meth:`shear.model.target.Target.to_dict`), ``None`` without one."""


def pick_graph(results: Mapping[str, Any]) -> Graph | None:
    """The graph the pipeline pruned: the first with LoRA composites among :data:`GRAPH_KEYS`, else the first."""
    graphs = [results[k] for k in GRAPH_KEYS if isinstance(results.get(k), Graph)]
    return next((g for g in graphs if g.composites), graphs[0] if graphs else None)


def _q_per_kv(graph: Graph | None, name: str) -> int:
    """Query heads per kv head of a kv-family group (1 when unknown or plain heads)."""
    if graph is None:
        return 1
    for p in graph.pruning_groups:
        if strip_peft_prefix(p.name) == strip_peft_prefix(name) and display_kind(p) == "kv family":
            ks = sorted({m.k for m in p.primary if m.dim == 0})
            return max(ks[-1] // max(ks[0], 1), 1)
    return 1


def layer_widths(
    groups: list[Any], graph: Graph | None
) -> tuple[list[int], list[WidthRow], list[dict[str, Any]]]:
    """Per-layer kept widths from the report's group records: ``(layers, rows, other groups)``.

    A kv-family group gives two rows: kv heads, and the query heads that go with them.
    """
    prunable = [g for g in groups if g.prunable]
    container = repeated_container([g.name for g in prunable])
    per: dict[str, dict[int, Any]] = {}
    others = []
    for g in prunable:
        parts = split_block(container, g.name)
        if parts is None:
            others.append(
                {"name": g.name, "kind": g.kind, "before": g.size_before, "after": g.size_after - g.zeroed}
            )
            continue
        per.setdefault(parts[2].lstrip("./"), {})[parts[1]] = g
    layers = sorted({i for d in per.values() for i in d})
    rows = []
    for tail, by_layer in per.items():
        where = tail.split("/")[0]
        sample = next(iter(by_layer.values()))
        q = _q_per_kv(graph, sample.name) if sample.kind == "head" else 1

        def col(f: Any, by_layer: dict[int, Any] = by_layer) -> list[int | None]:
            return [f(by_layer[i]) if i in by_layer else None for i in layers]

        if sample.kind == "head" and q > 1:
            rows.append(
                WidthRow(
                    f"{where}: kv heads", col(lambda g: g.size_before), col(lambda g: g.size_after - g.zeroed)
                )
            )
            rows.append(
                WidthRow(
                    f"{where}: query heads",
                    col(lambda g, q=q: g.size_before * q),
                    col(lambda g, q=q: (g.size_after - g.zeroed) * q),
                )
            )
        else:
            word = {"head": "heads", "residual": "width", "expert": "experts"}.get(sample.kind, "channels")
            rows.append(
                WidthRow(
                    f"{where}: {word}", col(lambda g: g.size_before), col(lambda g: g.size_after - g.zeroed)
                )
            )
    return layers, rows, others


def _finite(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _knowledge(kd: Any) -> dict[str, Any]:
    return {
        "base_ppl": kd.base_ppl,
        "ratio": kd.ratio,
        "gamma": kd.gamma,
        "proxy": kd.proxy,
        "entries": [
            {
                "name": strip_peft_prefix(e.name),
                "kind": e.kind,
                "structures": e.structures,
                "ppl": _finite(e.ppl),
                "deviation": _finite(e.deviation),
                "unprunable": bool(e.unprunable),
            }
            for e in kd.entries
        ],
    }


def _downsample(values: list[float], limit: int = 400) -> list[tuple[int, float]]:
    step = max(1, math.ceil(len(values) / limit))
    return [(i + 1, float(values[i])) for i in range(0, len(values), step)]


def _lhspg(r: Any, spec: str) -> dict[str, Any]:
    return {
        "spec": spec,
        "target": r.target,
        "predicted_reduction": r.predicted_reduction,
        "params_before": r.params_before,
        "params_after": r.params_after,
        "projected": r.projected,
        "structures": sum(len(v) for v in r.zeroed.values()),
        "losses": _downsample(list(r.losses)),
        "steps": len(r.losses),
        "periods": [
            {
                "period": p.get("period"),
                "moved": p.get("moved"),
                "loss": _finite(p.get("loss")),
                "zero": p.get("zero"),
            }
            for p in r.periods
        ],
        "seconds": r.wall_s,
    }


def _recovery(r: Any) -> dict[str, Any]:
    return {
        "rounds": [
            {
                "stage": x.stage,
                "index": x.index,
                "weights": dict(x.weights),
                "ppl": {k: _finite(v) for k, v in x.ppl.items()},
                "mean_ppl": _finite(x.mean_ppl),
                "instruction_loss": _finite(x.instruction_loss),
                "steps": x.steps,
                "tokens": x.tokens,
                "loss": _finite(x.loss),
                "gain": _finite(x.gain),
                "restored": x.restored,
            }
            for x in r.rounds
        ],
        "dense_ppl": {k: _finite(v) for k, v in r.dense_ppl.items()},
        "dense_instruction_loss": _finite(r.dense_instruction_loss),
        "stopped": dict(r.stopped),
        "seconds": r.wall_s,
    }


def collect(ctx: Any, report: Any, title: str | None = None) -> ReportData:
    """The report data of a finished run: ``ctx`` the pass context, ``report`` its CompileReport."""
    graph = pick_graph(ctx.results)  # the current graph and the retired ones, by their old names
    model = type(ctx.model).__name__
    data = ReportData(
        title=title or f"shear report: {model}",
        model=model,
        pipeline=report.pipeline,
        params_before=report.params_before,
        params_after=report.params_after,
        passes=[
            {"spec": p.spec, "seconds": p.seconds, "changed": p.changed, "auto": p.auto, "message": p.message}
            for p in report.passes
        ],
        warnings=list(report.warnings),
        graph=graph,
        target=getattr(report, "target", None),
    )
    for p in report.passes:
        if "verify_max_diff" in p.stats:
            note = "masked model before the pass vs. the smaller model after it, on the example inputs"
            noise = p.stats.get("verify_rounding_noise")
            if noise is not None:
                note += f" (fp rounding noise {noise:.3g})"
            data.verify.append({"what": p.spec, "max_diff": p.stats["verify_max_diff"], "note": note})
        elif p.name == "erase" and p.stats.get("max_diff") is not None:
            data.verify.append(
                {
                    "what": p.spec,
                    "max_diff": p.stats["max_diff"],
                    "note": "erase's own check: masked vs. erased model",
                }
            )
    if report.verify_max_diff is not None:
        data.verify.append(
            {
                "what": "compile (largest)",
                "max_diff": report.verify_max_diff,
                "note": "every shape-changing pass",
            }
        )
    data.layers, data.widths, data.other_groups = layer_widths(list(report.groups), graph)
    kd = ctx.find("knowledge-distribution")
    if kd is not None and hasattr(kd, "entries"):
        data.knowledge = _knowledge(kd)
    lh = ctx.find("lhspg")
    if lh is not None and hasattr(lh, "periods"):
        spec = next((p.spec for p in report.passes if p.name == "lhspg"), "lhspg")
        data.lhspg = _lhspg(lh, spec)
    verdict = getattr(report, "verdict", None)
    if verdict is not None:
        data.verdict = verdict.to_dict()
        if data.speed is None and verdict.speed is not None:
            data.speed = verdict.speed  # the speed section's data (ReportData.speed)
    rec = ctx.find("recover-dynamic")
    if rec is not None and hasattr(rec, "rounds"):
        data.recovery = _recovery(rec)
    return data
