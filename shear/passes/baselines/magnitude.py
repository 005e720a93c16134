"""The ``magnitude`` pass: prune the smallest weights (unstructured, N:M) or structures (structured).

The simplest baseline, in three modes at one budget ``ratio``:

- ``structured`` (the default): in every prunable pruning group of ``ctx.graph``, score
  each structure by the L2 norm of all its slices (primary and secondary: producer rows, consumer
  columns, norm weights, LoRA slices) and zero the primary slices of the lowest ``ratio`` (at
  least one structure stays), so that ``erase`` removes them;
- ``unstructured``: zero the ``ratio`` of each decoder linear's weights with the smallest ``|W|``
  (over the whole matrix, or per output row with ``per_row=true``);
- ``nm``: zero the ``n`` smallest ``|W|`` of every ``m`` consecutive input weights of each row
  (2:4 by default; ``ratio`` is then ``n/m`` and ignored).

Unstructured and N:M keep their :class:`~shear.kernels.sparsity.WeightMasks` in the context
(``ctx.get(WeightMasks)``); the layers are those of :func:`shear.kernels.calibration.target_linears`
(decoder linears; peft LoRA layers prune their frozen base weight, LoRA stays dense).

Example:
    >>> Magnitude(ratio=0.5).mode, Magnitude(mode="nm").n        # "magnitude{ratio=0.5}", "magnitude{mode=nm}"
    ('structured', 2)
    >>> Magnitude.requires == (Graph,), Magnitude(mode="unstructured").requires
    (True, ())
    >>> small = shear.compile(model, "magnitude{ratio=0.3},erase")   # structured; discover-groups runs first  # doctest: +SKIP
    >>> sparse = shear.compile(model, "magnitude{ratio=0.5,mode=unstructured}")   # masks in the report  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from shear.errors import PipelineError
from shear.graph.groups import PruningGroup
from shear.graph.ir import Graph
from shear.kernels.allocation import structure_count, zero_to_budget
from shear.kernels.calibration import target_linears
from shear.kernels.sparsity import (
    WeightMasks,
    check_mode,
    check_nm,
    check_ratio,
    select_mask,
    store_masks,
)
from shear.model.target import layout_selection, round_steps, step_of
from shear.model.tensors import TensorTable, zero_structures
from shear.passes.base import Context, Pass, PassResult, register_pass

__all__ = ["Magnitude", "structure_norms", "prune_lowest_norm", "structure_masks", "magnitude_masks"]


def structure_norms(model: nn.Module | TensorTable, group: PruningGroup) -> torch.Tensor:
    """Float64 ``[group.size]``: L2 norm of every parameter slice each structure owns (all members)."""
    table = model if isinstance(model, TensorTable) else TensorTable(model)
    sq = torch.zeros(group.size, dtype=torch.float64)
    for m in group.members:
        if m.is_buffer or not table.is_param.get(table.resolve(m.param), False):
            continue
        t = table.get(m.param).detach()
        picked = t.index_select(m.dim, m.positions.flatten().to(t.device))
        sq += picked.movedim(m.dim, 0).reshape(group.size, -1).double().pow(2).sum(dim=1).cpu()
    return sq.sqrt()


def prune_lowest_norm(
    model: nn.Module, groups: tuple[PruningGroup, ...], ratio: float, round_to: int | Mapping[int, int] = 1,
    *, counts: Mapping[int, int] | None = None,
) -> dict[int, torch.Tensor]:
    """Zero the lowest-norm ``ratio`` of the structures of every prunable group, group by group (a
    group's norms see the zeros of the groups before it); return the choice. ``round_to`` may give
    each group id its own step; ``counts`` (group id -> structures) replaces ``ratio``."""
    table = TensorTable(model)
    chosen: dict[int, torch.Tensor] = {}
    for g in groups:
        if not g.prunable or counts is not None and g.id not in counts:
            continue
        n = counts[g.id] if counts is not None else structure_count(g.size, ratio, step_of(round_to, g.id))
        n = min(n, g.size - g.min_keep)  # an MoE layer keeps its router's top-k experts
        idx = torch.sort(structure_norms(table, g), stable=True).indices[:n].sort().values
        zero_structures(table, g, idx)
        chosen[g.id] = idx
    return chosen


def structure_masks(model: nn.Module, groups: tuple[PruningGroup, ...], chosen: dict[int, torch.Tensor]) -> WeightMasks:
    """Keep masks that drop the primary parameter slices of the ``chosen`` structures of each group.

    Useful to keep zeroed structures at zero while training before ``erase`` (lora_B rows of a
    zeroed structure included, as in LHSPG).
    """
    table = TensorTable(model)
    out: dict[str, torch.Tensor] = {}
    for g in groups:
        idx = chosen.get(g.id)
        if idx is None or idx.numel() == 0:
            continue
        for m in g.primary:
            canon = table.resolve(m.param)
            if not table.is_param[canon]:
                continue
            t = table.tensors[canon]
            keep = out.setdefault(canon, torch.ones(t.shape, dtype=torch.bool, device=t.device))
            keep.index_fill_(m.dim, m.positions[idx].flatten().to(t.device), False)
    return WeightMasks(out)


@torch.no_grad()
def magnitude_masks(
    layers: dict[str, nn.Linear], mode: str, ratio: float, n: int = 2, m: int = 4, per_row: bool = False
) -> WeightMasks:
    """Prune every layer's weight by ``|W|`` in place; the keep masks by ``<layer>.weight``."""
    out = {}
    for name, layer in layers.items():
        keep = select_mask(layer.weight.abs(), mode, ratio, n, m, per_row)
        layer.weight.mul_(keep.to(layer.weight.dtype))
        out[f"{name}.weight"] = keep
    return WeightMasks(out)


class _RequiresGraphWhenStructured:
    """``requires`` of :class:`Magnitude`: ``(Graph,)`` in structured mode (and on the class, whose
    default mode is structured), nothing in the unstructured / N:M modes."""

    def __get__(self, obj: Magnitude | None, owner: type) -> tuple[type, ...]:
        return (Graph,) if obj is None or obj.mode == "structured" else ()


@register_pass
@dataclass(frozen=True)
class Magnitude(Pass):
    """Zero the smallest-magnitude weights (unstructured / N:M) or structures (structured)."""

    name: ClassVar[str] = "magnitude"
    prunes: ClassVar[bool] = True
    requires: ClassVar[tuple[type, ...]] = _RequiresGraphWhenStructured()  # type: ignore[assignment]
    ensures: ClassVar[tuple[type | str, ...]] = (WeightMasks, "magnitude")

    ratio: float = 0.5
    """Fraction to prune, in (0, 1): of each layer's weights, or of each group's structures."""
    mode: Literal["structured", "unstructured", "nm"] = "structured"
    """``structured`` (whole structures of the pruning groups, for ``erase``), ``unstructured`` (single
    weights), ``nm`` (n of every m consecutive inputs of each row)."""
    n: int = 2
    """N:M: weights zeroed in each group of ``m`` consecutive input weights of a row."""
    m: int = 4
    """N:M: the group length."""
    per_row: bool = False
    """Unstructured: compare weights within each output row instead of the whole matrix."""
    round_to: int = 0
    """Structured: round each group's kept count to a multiple of this; 1 = exact ratio; 0 = the run's
    target (:mod:`shear.model.target`; 1 without one)."""
    params: float = 0.0
    """Structured: when > 0, remove this share of the model's parameters instead of ``ratio`` of every
    group (kv-head families and channels, the parameter budget ``lhspg`` uses)."""

    def __post_init__(self) -> None:
        check_mode(self.name, self.mode, ("unstructured", "nm", "structured"))
        if self.mode == "nm":
            check_nm(self.name, self.n, self.m)
        else:
            check_ratio(self.name, self.ratio)
        if self.round_to < 0:
            raise PipelineError(f"{self.name}: round_to must be >= 0 (0: from the target), got {self.round_to}")
        if not 0.0 <= self.params < 1.0 or (self.params and self.mode != "structured"):
            raise PipelineError(
                f"{self.name}: params must be in [0, 1) and only with mode=structured, got params={self.params} "
                f"with mode={self.mode}; e.g. magnitude{{mode=structured,params=0.2}}"
            )

    def run(self, ctx: Context) -> PassResult:
        if self.mode == "structured":
            return self._structured(ctx)
        layers = target_linears(ctx.model)
        out: dict[str, torch.Tensor] = {}
        with ctx.progress(len(layers), f"magnitude {self.mode}") as bar:
            for name, layer in layers.items():
                out.update(magnitude_masks({name: layer}, self.mode, self.ratio, self.n, self.m, self.per_row))
                bar.advance()
        masks = WeightMasks(out)
        store_masks(ctx.analyses, masks)
        ctx.put(masks, "magnitude")
        stats = masks.sparsity()
        what = f"{self.n}:{self.m}" if self.mode == "nm" else f"ratio {self.ratio}"
        return PassResult(
            changed=bool(masks),
            message=f"magnitude {self.mode} ({what}): {stats.total:.1%} of the weights of {len(masks)} layers zeroed",
            stats=stats.as_dict(),
        )

    def _structured(self, ctx: Context) -> PassResult:
        groups = ctx.get(Graph).pruning_groups
        steps = round_steps(ctx.options.target, groups, self.round_to)
        with ctx.progress(None, "magnitude structured"):
            if self.params > 0:
                table = TensorTable(ctx.model)
                scores = {g.id: structure_norms(table, g) for g in groups if g.prunable}
                selection, equal = layout_selection(ctx.options.target, "auto")
                chosen = zero_to_budget(
                    ctx.model, groups, scores, self.params, round_to=steps, selection=selection, equal=equal
                )
            else:
                chosen = prune_lowest_norm(ctx.model, groups, self.ratio, steps)
        ctx.put(chosen, "magnitude")
        store_masks(ctx.analyses, structure_masks(ctx.model, groups, chosen))
        n = sum(int(v.numel()) for v in chosen.values())
        return PassResult(
            changed=n > 0,
            message=f"zeroed the {n} lowest-norm structures in {len(chosen)} prunable groups ("
            + (f"{self.params:.0%} of parameters)" if self.params else f"ratio {self.ratio})"),
            stats={"structures": n, "groups": len(chosen)},
        )
