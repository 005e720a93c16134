"""Parameter budgets: how many structures of each group to remove to cut a given share of parameters.

Erasing ``n_g`` structures of group ``g`` removes ``n_g * k`` indices along every (tensor, dim) the
group runs through; prunable groups never share an index, so the parameter count after erasure
depends only on the counts, not on which structures go:

    numel_after(T) = prod_d (shape_d(T) - sum_{members m on (T, d)} n_{g(m)} * k_m)

:class:`ParamBudget` evaluates that exactly (tied tensors counted once, LoRA adapters and buffers
not counted) and :meth:`ParamBudget.counts` finds per-group counts that hit a target reduction:
the same fraction in every group (``uniform``), topped up by the lowest-scored structures of the
finest groups, or a global ranking of scores normalised per group kind (``global``), or the same
count in every group of the same kind and size (``shared``): every layer keeps the same widths,
so stock loaders (``from_pretrained``, vLLM) rebuild the model; each layer's scores still pick
which of its structures go.

Example:
    >>> budget = ParamBudget(model, graph.prunable_groups)                     # doctest: +SKIP
    >>> counts = budget.counts(0.2, scores)                                      # doctest: +SKIP
    >>> abs(budget.reduction(counts) - 0.2) < 0.01                               # doctest: +SKIP
    True
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from shear.errors import KernelError
from shear.graph.groups import PruningGroup
from shear.model.facts import is_lora_param
from shear.model.target import step_of
from shear.model.tensors import TensorTable

__all__ = ["ParamBudget", "base_param_count", "structure_count", "zero_to_budget"]

def base_param_count(model: nn.Module, *, nonzero: bool = False) -> int:
    """Parameters of ``model`` as budgets count them: tied tensors once, LoRA adapters not at all;
    ``nonzero=True`` counts only non-zero entries (unstructured sparsity).

    Example:
        >>> base_param_count(torch.nn.Linear(4, 2))
        10
    """
    seen: set[int] = set()
    total = 0
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen or is_lora_param(name):
            continue
        seen.add(id(p))
        total += int((p != 0).sum()) if nonzero else p.numel()
    return total


def structure_count(size: int, ratio: float, round_to: int = 1) -> int:
    """Structures a per-group ``ratio`` removes from a group of ``size``: ``round(ratio * size)``, at
    most ``size - 1``; with ``round_to > 1`` the *kept* count is rounded to a multiple of it (when the
    group has at least that many), so pruned widths stay friendly to vectorised kernels.

    Example:
        >>> structure_count(10, 0.3), structure_count(10, 1.0), structure_count(64, 0.3, round_to=8)
        (3, 9, 16)
    """
    n = min(round(ratio * size), size - 1)
    if round_to > 1 and size >= round_to:
        keep = max(round_to, round((size - n) / round_to) * round_to)
        n = size - min(keep, size)
    return max(n, 0)


@dataclass(frozen=True)
class _Cut:
    tensor: str
    dim: int
    per_structure: int


class ParamBudget:
    """Exact parameter count after erasing ``n_g`` structures of each group, and target search."""

    def __init__(self, model: nn.Module, groups: Iterable[PruningGroup]) -> None:
        table = TensorTable(model)
        self.groups: dict[int, PruningGroup] = {g.id: g for g in groups if g.prunable}
        self.shapes: dict[str, tuple[int, ...]] = {
            name: tuple(t.shape)
            for name, t in table.tensors.items()
            if table.is_param[name] and not is_lora_param(name)
        }
        self.total: int = sum(math.prod(s) for s in self.shapes.values())
        """Parameters counted (tied once; no LoRA adapters, no buffers)."""
        self.cuts: dict[int, list[_Cut]] = {}
        for g in self.groups.values():
            cuts = []
            for m in g.members:
                name = table.resolve(m.param)
                if name in self.shapes:
                    cuts.append(_Cut(name, m.dim, m.k))
            self.cuts[g.id] = cuts

    def params_after(self, counts: Mapping[int, int]) -> int:
        """Parameters left after erasing ``counts[g]`` structures of each group ``g``."""
        removed: dict[tuple[str, int], int] = {}
        for gid, n in counts.items():
            for c in self.cuts.get(gid, ()):
                removed[(c.tensor, c.dim)] = removed.get((c.tensor, c.dim), 0) + n * c.per_structure
        total = self.total
        touched: dict[str, list[int]] = {}
        for (name, dim), r in removed.items():
            touched.setdefault(name, list(self.shapes[name]))[dim] -= r
        for name, shape in touched.items():
            total += math.prod(max(s, 0) for s in shape) - math.prod(self.shapes[name])
        return total

    def reduction(self, counts: Mapping[int, int]) -> float:
        """Fraction of the counted parameters that erasing ``counts`` removes."""
        return 1.0 - self.params_after(counts) / self.total

    def max_reduction(self, eligible: Iterable[int] | None = None) -> float:
        """The most this budget can remove when every eligible group keeps one structure."""
        ids = self.groups if eligible is None else eligible
        return self.reduction({g: self.groups[g].size - 1 for g in ids})

    def counts(
        self,
        target: float,
        scores: Mapping[int, torch.Tensor],
        *,
        eligible: Iterable[int] | None = None,
        selection: str = "uniform",
        round_to: int | Mapping[int, int] = 1,
        tolerance: float = 0.005,
        protected: Iterable[int] = (),
        protect_cap: float = math.inf,
        equal: Iterable[int | str] = (),
    ) -> dict[int, int]:
        """Structures to remove per eligible group so the reduction is ``target`` (± ``tolerance``).

        ``uniform`` removes the same fraction of every group (bisection on the fraction; group
        sizes quantise it, so the lowest-scored structures of the finest groups top it up);
        ``global`` ranks all structures by score divided by the mean score of their group kind,
        cheapest first (kept counts rounded up to ``round_to`` and topped up in its steps). ``shared`` is ``uniform`` topped up one whole class of groups (same kind
        and size: the same structure in every layer) at a time, so those groups keep equal counts.
        ``round_to`` keeps multiples of it in groups at least that large; a mapping gives each group id
        its own step (a target's granularity per kind, :func:`shear.model.target.round_steps`), and
        the top-up adds whole steps, so the reduction lands in ``[target - tolerance, target -
        tolerance + one step)``.

        ``equal`` names group ids or kinds whose counts must be equal across their class (same kind
        and size) whatever the selection: a Nemotron-NAS target's kv-head counts. They are topped up
        a whole class at a time (after the other groups), and knowledge distribution's protection
        does not apply to them (a protected layer cannot keep more than its class).
        When a mapping's whole steps cannot reach ``target - tolerance`` (a small model, where one
        step is a large share), single structures make up the rest; :meth:`off_grid` names the groups
        left off their steps. An int ``round_to`` is strict: the result then stays short.

        ``protected`` groups (eligible ones that knowledge distribution marked) lose structures only
        under ``uniform`` selection and only as far as ``protect_cap`` demands: they keep at most
        ``protect_cap`` times the share the other groups keep, and all of theirs when that is more;
        the other groups alone take the top-up. Under ``global`` and ``shared`` they keep everything.
        Raises KernelError when the target is out of reach.
        """
        if not 0.0 < target < 1.0:
            raise KernelError(f"target ratio must be in (0, 1), got {target}")
        ids = sorted(self.groups if eligible is None else set(eligible) & set(self.groups))
        if protect_cap < 1.0:
            raise KernelError(f"protect_cap must be at least 1 (protected groups keep at least the others' share), got {protect_cap}")
        steps = {g: step_of(round_to, g) for g in self.groups}
        same = set(equal)
        tied = frozenset(g for g in ids if g in same or self.groups[g].kind in same)
        shielded = frozenset(g for g in protected if g in ids and g not in tied)
        cap = protect_cap if selection == "uniform" else math.inf
        ids = [g for g in ids if g not in shielded]
        if not ids:
            raise KernelError("no prunable groups are eligible (all unprunable?); nothing can reach the target")
        most = self.reduction(self._fraction_counts(1.0, ids, {}, shielded, cap))
        if most < target - tolerance:
            raise KernelError(
                f"the eligible groups can remove at most {most:.1%} of {self.total:,} parameters, less than the "
                f"target {target:.1%}; lower the ratio, allow more group kinds, or mark fewer groups unprunable"
            )
        if selection in ("uniform", "shared"):
            counts = self._uniform(target, ids, steps, shielded, cap)
        elif selection == "global":
            counts = self._global(target, ids, scores)
            # keep multiples of each step: round each kept count up, the top-up below refills
            counts = {g: n if steps[g] <= 1 or self.groups[g].size < steps[g] else self.groups[g].size - min(
                self.groups[g].size, -(-(self.groups[g].size - n) // steps[g]) * steps[g]) for g, n in counts.items()}  # fmt: skip
            counts = self._equalize(counts, [g for g in ids if g in tied])
        else:
            raise KernelError(f"selection must be 'uniform', 'shared' or 'global', got {selection!r}")
        counts = self._fill(counts, target, ids, scores, steps, tolerance, shielded, tied, selection)
        if isinstance(round_to, Mapping) and self.reduction(counts) < target - tolerance:
            # a target's steps are too coarse for this model: single structures make up the rest
            counts = self._fill(counts, target, ids, scores, {}, tolerance, shielded, tied, selection)
        return counts

    def _fill(
        self, counts: dict[int, int], target: float, ids: list[int], scores: Mapping[int, torch.Tensor],
        steps: Mapping[int, int], tolerance: float, shielded: frozenset[int], tied: frozenset[int], selection: str,
    ) -> dict[int, int]:
        """Top ``counts`` up to the target: whole classes under ``shared``, else the free groups one
        at a time and then the ``tied`` classes; ``shielded`` counts stay."""
        if self.reduction(counts) >= target - tolerance:
            return counts
        fixed = {g: n for g, n in counts.items() if g in shielded}
        others = {g: n for g, n in counts.items() if g not in shielded}
        if selection == "shared":
            return self._top_up_shared(others, target, ids, steps, tolerance, fixed)
        free = [g for g in ids if g not in tied]
        counts = self._top_up(others, target, free, scores, steps, tolerance, fixed)
        if tied and self.reduction(counts) < target - tolerance:
            counts = self._top_up_shared(
                {g: counts[g] for g in tied}, target, sorted(tied), steps, tolerance,
                {g: n for g, n in counts.items() if g not in tied},
            )
        return counts

    def off_grid(self, counts: Mapping[int, int], round_to: int | Mapping[int, int]) -> list[int]:
        """Groups whose kept count is not a multiple of their step (groups smaller than it excepted):
        where :meth:`counts` had to leave a target's steps to reach the parameter target."""
        out = []
        for gid, n in counts.items():
            step, size = step_of(round_to, gid), self.groups[gid].size
            if step > 1 and size >= step and (size - n) % step:
                out.append(gid)
        return out

    def _classes(self, ids: Iterable[int]) -> dict[tuple[str, int], list[int]]:
        """Groups by (kind, size): the same structure in every layer."""
        classes: dict[tuple[str, int], list[int]] = {}
        for gid in ids:
            classes.setdefault((self.groups[gid].kind, self.groups[gid].size), []).append(gid)
        return classes

    def _equalize(self, counts: dict[int, int], ids: list[int]) -> dict[int, int]:
        """Every group of ``ids`` takes the smallest count of its class (the top-up refills)."""
        out = dict(counts)
        for members in self._classes(ids).values():
            low = min(out[g] for g in members)
            out.update({g: low for g in members})
        return out

    @staticmethod
    def _shielded_fraction(r: float, cap: float) -> float:
        """A protected group's fraction to remove when the others remove ``r``: it keeps
        ``min(1, cap * (1 - r))`` (``cap = inf``: everything)."""
        return 0.0 if math.isinf(cap) else max(0.0, 1.0 - cap * (1.0 - r))

    def _top_up_shared(
        self, counts: dict[int, int], target: float, ids: list[int], steps: Mapping[int, int], tolerance: float,
        fixed: Mapping[int, int],
    ) -> dict[int, int]:
        """Add one step to every group of a (kind, size) class at once, the smallest such increment first;
        ``fixed`` counts stay as they are."""
        counts = {**fixed, **counts}
        classes = self._classes(ids)
        while self.reduction(counts) < target - tolerance:
            best: dict[int, int] | None = None
            best_gain = math.inf
            for (_, size), members in classes.items():
                round_to = max(steps.get(g, 1) for g in members)
                step = round_to if round_to > 1 and size >= round_to else 1
                if any(counts[g] + step > size - 1 for g in members):
                    continue
                trial = {**counts, **{g: counts[g] + step for g in members}}
                gain = self.reduction(trial) - self.reduction(counts)
                if 0 < gain < best_gain:
                    best, best_gain = trial, gain
            if best is None:
                break
            counts = best
        return counts

    def _fraction_counts(
        self, r: float, ids: list[int], steps: Mapping[int, int], shielded: frozenset[int], cap: float
    ) -> dict[int, int]:
        counts = {gid: structure_count(self.groups[gid].size, r, steps.get(gid, 1)) for gid in ids}
        r_shielded = self._shielded_fraction(r, cap)
        counts.update({gid: structure_count(self.groups[gid].size, r_shielded, steps.get(gid, 1)) for gid in shielded})
        return counts

    def _uniform(
        self, target: float, ids: list[int], steps: Mapping[int, int], shielded: frozenset[int], cap: float
    ) -> dict[int, int]:
        lo, hi = 0.0, 1.0
        for _ in range(40):
            mid = (lo + hi) / 2
            if self.reduction(self._fraction_counts(mid, ids, steps, shielded, cap)) <= target:
                lo = mid
            else:
                hi = mid
        return self._fraction_counts(lo, ids, steps, shielded, cap)

    def _global(self, target: float, ids: list[int], scores: Mapping[int, torch.Tensor]) -> dict[int, int]:
        by_kind: dict[str, list[float]] = {}
        for gid in ids:
            by_kind.setdefault(self.groups[gid].kind, []).extend(self._score(gid, scores).tolist())
        mean = {k: (sum(v) / len(v)) or 1.0 for k, v in by_kind.items()}
        ranked: list[tuple[float, int]] = []
        for gid in ids:
            s = self._score(gid, scores).sort().values / mean[self.groups[gid].kind]
            ranked.extend((float(v), gid) for v in s[: self.groups[gid].size - 1])
        ranked.sort()
        counts = {gid: 0 for gid in ids}
        for _, gid in ranked:
            counts[gid] += 1
            if self.reduction(counts) >= target:
                break
        return counts

    def _top_up(
        self,
        counts: dict[int, int],
        target: float,
        ids: list[int],
        scores: Mapping[int, torch.Tensor],
        steps: Mapping[int, int],
        tolerance: float,
        fixed: Mapping[int, int],
    ) -> dict[int, int]:
        counts = {**fixed, **counts}
        step = {gid: steps.get(gid, 1) if steps.get(gid, 1) > 1 and self.groups[gid].size >= steps.get(gid, 1) else 1 for gid in ids}
        # cheapest increments first: the finest groups (most structures), lowest next score
        while self.reduction(counts) < target - tolerance:
            best, best_key = None, None
            for gid in ids:
                size = self.groups[gid].size
                if counts[gid] + step[gid] > size - 1:
                    continue
                s = self._score(gid, scores).sort().values
                key = (-size, float(s[counts[gid]]) if counts[gid] < len(s) else 0.0)
                if best_key is None or key < best_key:
                    best, best_key = gid, key
            if best is None:
                break
            counts[best] += step[best]
        return counts

    def _score(self, gid: int, scores: Mapping[int, torch.Tensor]) -> torch.Tensor:
        s = scores.get(gid)
        if s is None:
            return torch.zeros(self.groups[gid].size)
        return s.detach().float().cpu()


def zero_to_budget(
    model: nn.Module,
    groups: Iterable[PruningGroup],
    scores: Mapping[int, torch.Tensor],
    target: float,
    *,
    kinds: tuple[str, ...] = ("channel", "head"),
    selection: str = "uniform",
    round_to: int | Mapping[int, int] = 1,
    tolerance: float = 0.005,
    equal: Iterable[int | str] = (),
) -> dict[int, torch.Tensor]:
    """One-shot pruning to a parameter budget: zero the lowest-scored structures, ``target`` of params.

    The counts per group come from :meth:`ParamBudget.counts` (the budget LHSPG uses), so one-shot
    baselines and LHSPG remove the same number of parameters. Returns the zeroed indices per group.

    Example:
        >>> chosen = zero_to_budget(model, graph.pruning_groups, scores, 0.2)   # doctest: +SKIP
    """
    from shear.model.tensors import TensorTable, zero_structures

    eligible = [g for g in groups if g.prunable and g.kind in kinds]
    budget = ParamBudget(model, eligible)
    counts = budget.counts(target, scores, selection=selection, round_to=round_to, tolerance=tolerance, equal=equal)
    table = TensorTable(model)
    chosen: dict[int, torch.Tensor] = {}
    for g in eligible:
        n = counts.get(g.id, 0)
        if n == 0:
            continue
        s = scores[g.id].detach().float().cpu()
        chosen[g.id] = s.argsort()[:n].sort().values
        zero_structures(table, g, chosen[g.id])
    return chosen
