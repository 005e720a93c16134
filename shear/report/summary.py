"""The compile report: what each pass did and cost, and what each pruning group lost.

``shear.compile`` attaches one to the model it returns (``small.shear_report``). It prints as
rich tables (``print(report)`` or ``rich.print(report)``) and converts to plain data
(``report.to_dict()``) for logs and JSON.

Example:
    >>> small = shear.compile(model, ["random{ratio=0.3,seed=0}", "erase"], example_inputs=x)  # doctest: +SKIP
    >>> r = small.shear_report                                                                 # doctest: +SKIP
    >>> r.params_before, r.params_after, r.passes[0].seconds                                   # doctest: +SKIP
    (1024, 736, 0.002)
    >>> print(r)                                                                               # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import io
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from shear.graph.groups import PruningGroup
from shear.model.facts import base_weight_name
from shear.passes.base import Context, Pass
from shear.passes.manager import PassRecord

__all__ = ["CompileReport", "GroupRecord", "PassRecord", "ReportBuilder", "zero_structures"]


@dataclass
class GroupRecord:
    """One pruning group before and after the pipeline."""

    name: str
    kind: str
    prunable: bool
    size_before: int
    """Structures (channels, heads, kv families) before the pipeline."""
    size_after: int
    """Structures left in the returned model (smaller once ``erase`` ran)."""
    params_before: int
    params_after: int
    zeroed: int = 0
    """Structures still present but exactly zero (pruned in place, not yet erased)."""
    pruned: tuple[int, ...] = ()
    """Indices (in the original numbering) of the structures pruned, when known."""

    @property
    def removed(self) -> int:
        return self.size_before - self.size_after


@dataclass
class CompileReport:
    """Per-pass time and result, per-group sizes and parameters before/after, and warnings."""

    pipeline: str
    """The pipeline that ran, auto-inserted prerequisites included, as a pipeline string."""
    passes: list[PassRecord] = field(default_factory=list)
    groups: list[GroupRecord] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    warnings: list[str] = field(default_factory=list)
    verify_max_diff: float | None = None
    """Largest |small - masked| seen by the equivalence check (``None`` when it did not run)."""
    target: dict[str, Any] | None = None
    """The run's resolved target (:meth:`shear.model.target.Target.to_dict`); ``None``: no target."""
    verdict: Any = field(default=None, repr=False, compare=False)
    """The quality verdict (:class:`shear.evaluation.verdict.Verdict`) when ``compile(evaluate=...)`` ran."""
    details: Any = field(default=None, repr=False, compare=False)
    """What the HTML report shows (:class:`shear.report.ReportData`: the graph, the passes' results);
    not part of :meth:`to_dict`."""

    @property
    def seconds(self) -> float:
        """Total wall time of the passes."""
        return sum(p.seconds for p in self.passes)

    @property
    def pruned_groups(self) -> list[GroupRecord]:
        """Groups that lost structures (removed or zeroed)."""
        return [g for g in self.groups if g.removed or g.zeroed]

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-serialisable); ``details`` left out."""
        out = dataclasses.asdict(dataclasses.replace(self, details=None, verdict=None))
        out.pop("details", None)
        out["verdict"] = self.verdict.to_dict() if self.verdict is not None else None
        return out

    def __rich__(self) -> Any:
        from rich.console import Group
        from rich.table import Table

        passes = Table(title=f"passes: {self.pipeline}", title_justify="left")
        for col, just in (("#", "right"), ("pass", "left"), ("time", "right"), ("changed", "center"), ("message", "left")):
            passes.add_column(col, justify=just)  # type: ignore[arg-type]
        for i, p in enumerate(self.passes, 1):
            name = f"{p.spec} [dim](auto)[/dim]" if p.auto else p.spec
            passes.add_row(str(i), name, f"{p.seconds:.3f}s", "yes" if p.changed else "-", p.message)
        parts: list[Any] = [passes]
        if self.groups:
            groups = Table(title="pruning groups", title_justify="left")
            for col in ("group", "kind", "structures", "params", "pruned"):
                groups.add_column(col, justify="left" if col in ("group", "kind") else "right")
            for g in self.groups:
                size = f"{g.size_before}" if g.size_after == g.size_before else f"{g.size_before} → {g.size_after}"
                params = f"{g.params_before:,}" if g.params_after == g.params_before else f"{g.params_before:,} → {g.params_after:,}"
                pruned = "unprunable" if not g.prunable else (f"{g.removed} removed" if g.removed else "")
                if g.zeroed:
                    pruned = (pruned + ", " if pruned else "") + f"{g.zeroed} zero"
                groups.add_row(g.name, g.kind, size, params, pruned)
            parts.append(groups)
        ratio = self.params_after / self.params_before if self.params_before else 1.0
        summary = f"parameters: {self.params_before:,} → {self.params_after:,} ({ratio:.1%}), {self.seconds:.2f}s"
        if self.verify_max_diff is not None:
            summary += f", equivalence max |diff| {self.verify_max_diff:.2e}"
        parts.append(summary)
        parts.extend(f"[yellow]warning:[/yellow] {w}" for w in self.warnings)
        if self.verdict is not None:
            from rich.text import Text

            parts.append(Text(self.verdict.format()))
        return Group(*parts)

    def __str__(self) -> str:
        from rich.console import Console

        buf = io.StringIO()
        Console(file=buf, width=120, color_system=None, force_terminal=False).print(self)
        return buf.getvalue().rstrip()


def _param_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {n: tuple(t.shape) for n, t in model.named_parameters(remove_duplicate=False)}


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    out.update(model.named_buffers(remove_duplicate=False))
    return out


@torch.no_grad()
def zero_structures(group: PruningGroup, tensors: dict[str, torch.Tensor]) -> tuple[int, ...] | None:
    """Indices of the structures whose primary slices are all exactly zero.

    ``None`` when the group has no primary parameter, or one is missing or no longer has the
    group's original size.
    """
    primary = [m for m in group.primary if not m.is_buffer]
    if not primary:
        return None
    zero = torch.ones(group.size, dtype=torch.bool)
    for m in primary:
        t = tensors.get(m.param)
        if t is None or t.dim() <= m.dim or t.device.type == "meta":
            return None
        if int(m.positions.max()) >= t.shape[m.dim]:
            return None
        zero &= ~_nonzero_structures(t.detach(), m.dim, m.positions, group.size)
    return tuple(int(i) for i in torch.nonzero(zero).flatten())


_CHUNK_ELEMENTS = 1 << 24
"""Elements of a tensor :func:`_nonzero_structures` reads at once (32 MiB of bf16): a structure
test over a 128k-vocabulary embedding must not copy the embedding."""


def _nonzero_structures(t: torch.Tensor, dim: int, positions: torch.Tensor, size: int) -> torch.Tensor:
    """Bool ``[size]`` on the CPU: structures with a nonzero (or NaN) entry in their slices of ``t``
    along ``dim``; read in chunks along another dimension, so it allocates a chunk, not a copy of ``t``."""
    flat = positions.flatten().to(t.device)
    others = [d for d in range(t.dim()) if d != dim]
    if not others:
        return (t.index_select(dim, flat).reshape(size, -1) != 0).any(dim=1).cpu()
    along = max(others, key=lambda d: t.shape[d])
    step = max(1, _CHUNK_ELEMENTS * t.shape[along] // max(1, t.numel()))
    hit = torch.zeros(size, dtype=torch.bool, device=t.device)
    for part in t.split(step, dim=along):
        picked = part.index_select(dim, flat).movedim(dim, 0).reshape(size, -1)
        hit |= (picked != 0).any(dim=1)
    return hit.cpu()


class ReportBuilder:
    """A pass hook that builds the :class:`CompileReport` while the pipeline runs.

    It snapshots the zero structures of every group after each pass that changed something,
    while the tensors still have their original sizes; after erasure the last snapshot tells
    which structures were removed.
    """

    def __init__(self, model: nn.Module) -> None:
        self.params_before = sum(t.numel() for t in model.parameters())
        self.shapes_before = _param_shapes(model)
        self.groups: tuple[PruningGroup, ...] = ()
        self.zero: dict[int, tuple[int, ...]] = {}

    def before_pass(self, p: Pass, ctx: Context) -> None:
        return None

    def after_pass(self, p: Pass, record: PassRecord, ctx: Context) -> None:
        graph = ctx.graph
        first = False
        if graph is not None and not self.groups:
            self.groups = tuple(getattr(graph, "pruning_groups", ()) or ())
            first = True
        if not self.groups or not (record.changed or first):
            return
        tensors = _tensors(ctx.model)
        for g in self.groups:
            z = zero_structures(g, tensors)
            if z is not None:
                self.zero[g.id] = z

    def finish(self, ctx: Context, records: list[PassRecord]) -> CompileReport:
        """The report, once the pipeline ran (``records`` from the pass manager)."""
        model = ctx.model
        # a LoRA wrapper renames the weights the groups name; merging it back names them plainly again
        shapes_after = _aliases(_param_shapes(model), self.groups)
        self.shapes_before = _aliases(self.shapes_before, self.groups)
        tensors = _tensors(model)
        groups = []
        for g in self.groups:
            size_after = _size_after(g, self.shapes_before, shapes_after)
            per_before = _structure_numel(g, self.shapes_before)
            per_after = _structure_numel(g, shapes_after) if size_after else 0
            zero_now = zero_structures(g, tensors) if size_after == g.size else ()
            pruned = self.zero.get(g.id, ())
            groups.append(
                GroupRecord(
                    name=g.name,
                    kind=g.kind,
                    prunable=g.prunable,
                    size_before=g.size,
                    size_after=size_after,
                    params_before=per_before * g.size,
                    params_after=per_after * size_after,
                    zeroed=len(zero_now or ()),
                    pruned=pruned if (size_after < g.size or zero_now) else (),
                )
            )
        return CompileReport(
            pipeline=",".join(r.spec for r in records),
            passes=list(records),
            groups=groups,
            params_before=self.params_before,
            params_after=sum(t.numel() for t in model.parameters()),
            warnings=list(ctx.warnings),
        )


def _aliases(shapes: dict[str, tuple[int, ...]], groups: tuple[PruningGroup, ...]) -> dict[str, tuple[int, ...]]:
    """``shapes`` plus, for every member the groups name that it lacks, the shape of the same weight
    under its name with (or without) a peft LoRA wrapper."""
    plain = {base_weight_name(n): v for n, v in shapes.items()}
    out = dict(shapes)
    for g in groups:
        for m in g.members:
            if m.param not in out and base_weight_name(m.param) in plain:
                out[m.param] = plain[base_weight_name(m.param)]
    return out


def _structure_numel(g: PruningGroup, shapes: dict[str, tuple[int, ...]]) -> int:
    """Parameters one structure owns among the tensors in ``shapes`` (adapters a merge removed, or
    that did not exist yet, are not counted)."""
    total = 0
    for m in g.members:
        shape = shapes.get(m.param)
        if m.is_buffer or shape is None or m.dim >= len(shape):
            continue
        total += m.k * math.prod(s for d, s in enumerate(shape) if d != m.dim)
    return total


def _size_after(g: PruningGroup, before: dict[str, tuple[int, ...]], after: dict[str, tuple[int, ...]]) -> int:
    """Structures left: the group's size minus what its first primary tensor lost along its dim."""
    for m in g.primary:
        if m.param in before and m.param in after:
            lost = before[m.param][m.dim] - after[m.param][m.dim]
            return max(g.size - lost // max(m.k, 1), 0)
    return g.size
