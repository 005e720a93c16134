"""Codegen: turn zero structures into a smaller dense model that equals the masked original.

LoRAShear §3.4 builds the compressed model by a two-pass traversal over the dependency graph:

* **pass 1** removes the *primary* dimension of every zero structure: producer rows, biases,
  lora_B rows (everything that had to be zero for the structure to be removable);
* **pass 2** removes the *secondary* dimension of every consumer from the pruned status of its
  incoming structures: consumer columns, lora_A columns, norm weights, embedding columns.

Both passes only *collect* flat indices per (tensor, dim); tensors are sliced once afterwards, so a
tensor dimension touched by several members or overlapping groups is erased once and consistently.
Before the passes, :func:`plan_erasure` resolves overlaps like dead-code elimination resolves
liveness (mark live until fixpoint, then sweep): an index owned by any structure that stays
(a non-zero one, or one of an unprunable group) is live, and a zero structure that owns a live index
stays as well.

:func:`codegen` slices the module tree of a copy of the model (or the model itself with
``inplace=True``), so the result keeps its class (``LlamaForCausalLM``, ``PeftModel``) and
``generate()`` works; module attributes follow from :mod:`shear.codegen.module_rules`, RMS norms
over a shrunk width are rescaled (weight × sqrt(d/d'), epsilon × d/d') so the result is exact, and
the transformers config is refreshed (:mod:`shear.codegen.hf_config`).

Example:
    >>> import torch
    >>> from shear.graph.groups import Member, PruningGroup, Role
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> rows = torch.arange(4).view(4, 1)
    >>> g = PruningGroup(0, "0:out", (Member("0.weight", 0, Role.PRIMARY, rows),
    ...                              Member("0.bias", 0, Role.PRIMARY, rows),
    ...                              Member("2.weight", 1, Role.SECONDARY, rows)), 4)
    >>> with torch.no_grad():
    ...     net[0].weight[1] = 0; net[0].bias[1] = 0
    >>> small, report = codegen(net, [g], example_inputs=torch.randn(5, 3))
    >>> small[0].out_features, small[2].in_features, net[0].out_features
    (3, 3, 4)
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from shear.codegen import verify as _verify
from shear.codegen.depth import BLOCK_KIND, check_blocks, chosen_blocks, remove_blocks, zero_blocks
from shear.codegen.hf_config import refresh_config
from shear.codegen.module_rules import find_rms_norm, update_module_attributes
from shear.errors import GraphError, VerifyError
from shear.graph.groups import Member, PruningGroup, Role
from shear.model.experts import check_min_keep, route_around_absent_experts
from shear.model.tensors import TensorTable, drop_indices, nonzero_structures

__all__ = [
    "ErasurePlan", "ErasureReport", "plan_erasure", "plan_removal", "apply_plan", "codegen", "EMIT_MODES", "drop_indices",
]


@dataclass
class ErasurePlan:
    """What erasure removes: structures per group, and the resulting flat indices per tensor dim."""

    removed: dict[int, torch.Tensor]
    """Group id -> sorted indices of the structures that are erased."""
    zero_kept: dict[int, torch.Tensor]
    """Group id -> zero structures that stay (overlap with a live structure, or ``min_keep``)."""
    cuts: dict[str, dict[int, torch.Tensor]]
    """Canonical tensor name -> dim -> sorted unique flat indices removed along that dim."""
    norms: dict[str, tuple[int, int]]
    """RMS-norm module -> (width before, width after)."""
    shapes: dict[str, tuple[int, ...]]
    """Canonical tensor name -> shape before erasure."""
    params: frozenset[str]
    """Canonical names that are parameters (the rest are buffers)."""
    group_names: dict[int, str] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)
    blocks: dict[int, tuple[str, ...]] = field(default_factory=dict)
    """Group id -> modules (branch, norm, output projection) of the decoder-layer branches erased
    whole (kind ``block``, :mod:`shear.codegen.depth`); they are also in :attr:`removed`."""

    @property
    def empty(self) -> bool:
        """True when nothing is erased."""
        return not any(len(v) for v in self.removed.values())

    def shape_after(self, name: str) -> tuple[int, ...]:
        shape = list(self.shapes[name])
        for dim, idx in self.cuts.get(name, {}).items():
            shape[dim] -= int(idx.numel())
        return tuple(shape)

    def numel(self, after: bool = True) -> int:
        """Parameter count of the model before or (predicted) after erasure; tied tensors count once."""
        get = self.shape_after if after else self.shapes.__getitem__
        return sum(math.prod(get(n)) for n in self.params)


@dataclass
class ErasureReport:
    """What :func:`codegen` did."""

    plan: ErasurePlan
    params_before: int
    params_after: int
    max_diff: float | None = None
    """Max |small - masked| on the example inputs when verified."""
    from_pretrained_compatible: bool = False
    """Whether the refreshed transformers config rebuilds exactly these shapes."""
    emitted: str = "module"
    """``"module"``: the sliced module tree (same class); ``"graph"``: a ``torch.fx.GraphModule``."""
    fallback_reason: str = ""
    """Why the module tree was not used (``emitted == "graph"`` under ``emit="auto"``)."""

    def summary(self) -> str:
        n = sum(int(v.numel()) for v in self.plan.removed.values())
        groups = sum(1 for v in self.plan.removed.values() if v.numel())
        ratio = 1 - self.params_after / max(self.params_before, 1)
        msg = (
            f"erased {n} structures in {groups} groups: {self.params_before:,} -> {self.params_after:,} "
            f"parameters (-{ratio:.1%})"
        )
        if self.max_diff is not None:
            msg += f"; verified, max |diff| {self.max_diff:.2g}"
        if self.emitted == "graph":
            msg += "; emitted a torch.fx GraphModule" + (f" ({self.fallback_reason})" if self.fallback_reason else "")
        return msg


def _key(table: TensorTable, m: Member) -> tuple[str, int]:
    return table.resolve(m.param), m.dim


def _live_indices(table: TensorTable, groups: Sequence[PruningGroup], zero: dict[int, torch.Tensor]) -> dict:
    """(tensor, dim) -> bool mask of indices owned by a structure of ``groups`` that stays.

    Called with the prunable groups only: an unprunable group over the same indices is another
    factor of that space (head_dim inside a kv-head family, RoPE frequencies) or a pin on it, so
    removing a whole structure of the prunable group removes a slice of each of its structures,
    never one whole, and does not conflict with it.
    """
    live: dict[tuple[str, int], torch.Tensor] = {}
    for g in groups:
        stays = ~zero[g.id] if g.id in zero else torch.ones(g.size, dtype=torch.bool)
        if not bool(stays.any()):
            continue
        for m in g.members:
            key = _key(table, m)
            if key not in live:
                live[key] = torch.zeros(table.tensors[key[0]].shape[key[1]], dtype=torch.bool)
            live[key][m.positions[stays].flatten()] = True
    return live


def plan_erasure(model: nn.Module, groups: Iterable[PruningGroup], *, min_keep: int = 1) -> ErasurePlan:
    """Find the zero structures of prunable ``groups`` and what erasing them removes (nothing mutates).

    A structure is removable iff every primary slice is exactly zero. ``min_keep`` structures of each
    group stay even when all are zero (a zero-width attention cannot reshape to ``(-1, head_dim)``).
    """
    groups = tuple(groups)
    table = TensorTable(model)
    prunable = [g for g in groups if g.prunable and g.kind != BLOCK_KIND]
    messages: list[str] = []

    zero: dict[int, torch.Tensor] = {g.id: ~nonzero_structures(table, g) for g in prunable}
    found = {gid: z.clone() for gid, z in zero.items()}
    for g in prunable:
        z = zero[g.id]
        surplus = min_keep - int((~z).sum())
        if surplus > 0:
            z[z.nonzero().flatten()[:surplus]] = False
            messages.append(f"{g.name}: all {g.size} structures are zero; kept {min(surplus, g.size)} (min_keep)")

    return _with_blocks(model, _plan(model, table, groups, prunable, zero, found, messages), zero_blocks(table, groups))


def _with_blocks(model: nn.Module, plan: ErasurePlan, blocks: dict[int, tuple[str, ...]]) -> ErasurePlan:
    check_blocks(model, blocks.values())
    plan.blocks = blocks
    plan.removed.update({gid: torch.zeros(1, dtype=torch.long) for gid in blocks})
    return plan


def plan_removal(model: nn.Module, groups: Iterable[PruningGroup], removed: Mapping[int, torch.Tensor]) -> ErasurePlan:
    """Plan erasing the structures ``removed[g.id]`` (indices) of each prunable group; no weight is read.

    The weights need not exist: a model on the meta device gives the same plan, which is how
    :mod:`shear.scale` plans models larger than memory. The overlap fixpoint of :func:`plan_erasure`
    still applies (a chosen structure that owns an index a staying structure owns stays).

    Example:
        >>> import torch
        >>> from shear.graph.groups import Member, PruningGroup, Role
        >>> with torch.device("meta"):
        ...     net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
        >>> rows = torch.arange(4).view(4, 1)
        >>> g = PruningGroup(0, "0:out", (Member("0.weight", 0, Role.PRIMARY, rows),
        ...                              Member("1.weight", 1, Role.SECONDARY, rows)), 4)
        >>> plan_removal(net, [g], {0: torch.tensor([1, 2])}).shape_after("1.weight")
        (2, 2)
    """
    groups = tuple(groups)
    table = TensorTable(model)
    prunable = [g for g in groups if g.prunable and g.kind != BLOCK_KIND]
    zero: dict[int, torch.Tensor] = {}
    for g in prunable:
        mask = torch.zeros(g.size, dtype=torch.bool)
        idx = removed.get(g.id)
        if idx is not None and len(idx):
            mask[torch.as_tensor(idx, dtype=torch.long)] = True
        zero[g.id] = mask
    found = {gid: z.clone() for gid, z in zero.items()}
    return _with_blocks(model, _plan(model, table, groups, prunable, zero, found, []), chosen_blocks(groups, removed))


def _plan(
    model: nn.Module, table: TensorTable, groups: tuple[PruningGroup, ...], prunable: list[PruningGroup],
    zero: dict[int, torch.Tensor], found: dict[int, torch.Tensor], messages: list[str],
) -> ErasurePlan:
    """The overlap fixpoint and the two collection passes, from the structures marked in ``zero``."""
    check_min_keep(prunable, found)  # an MoE layer keeps its router's top-k live experts
    # Overlaps: mark live until fixpoint. Zero structures that own an index a staying structure owns, stay.
    while True:
        live = _live_indices(table, prunable, zero)
        demoted = False
        for g in prunable:
            z = zero[g.id]
            if not bool(z.any()):
                continue
            clash = torch.zeros(g.size, dtype=torch.bool)
            for m in g.members:
                mask = live.get(_key(table, m))
                if mask is not None:
                    clash |= mask[m.positions].any(dim=1)
            clash &= z
            if bool(clash.any()):
                z &= ~clash
                demoted = True
                messages.append(
                    f"{g.name}: {int(clash.sum())} zero structures overlap structures that stay; kept"
                )
        if not demoted:
            break

    cuts: dict[tuple[str, int], list[torch.Tensor]] = {}

    def collect(role: Role) -> None:
        for g in prunable:
            idx = zero[g.id].nonzero().flatten()
            if idx.numel() == 0:
                continue
            for m in g.members:
                if m.role is role:
                    cuts.setdefault(_key(table, m), []).append(m.positions[idx].flatten())

    collect(Role.PRIMARY)  # pass 1: primary dims (producer rows, bias, lora_B rows) of zero structures
    collect(Role.SECONDARY)  # pass 2: secondary dims of consumers, from the pruned status of their inputs

    by_tensor: dict[str, dict[int, torch.Tensor]] = {}
    for (name, dim), parts in cuts.items():
        by_tensor.setdefault(name, {})[dim] = torch.unique(torch.cat(parts))

    norms: dict[str, tuple[int, int]] = {}
    for g in prunable:
        n_removed = int(zero[g.id].sum())
        for nr in g.norms:
            module = _get_module(model, nr.module)
            if find_rms_norm(module) is None:
                raise GraphError(
                    f"group {g.name}: norm {nr.module} ({type(module).__name__}) averages over this space but is "
                    "not a known RMS norm, so erasing channels would change its statistics; register it with "
                    "shear.graph.register_rms_norm or mark the space unprunable"
                )
            if nr.width % g.size:
                raise GraphError(f"group {g.name}: norm width {nr.width} is not a multiple of {g.size} structures")
            d, d_new = norms.get(nr.module, (nr.width, nr.width))
            norms[nr.module] = (d, d_new - n_removed * (nr.width // g.size))

    removed = {g.id: zero[g.id].nonzero().flatten() for g in prunable}
    zero_kept = {g.id: (found[g.id] & ~zero[g.id]).nonzero().flatten() for g in prunable}
    return ErasurePlan(
        removed=removed,
        zero_kept=zero_kept,
        cuts=by_tensor,
        norms=norms,
        shapes={n: tuple(t.shape) for n, t in table.tensors.items()},
        params=frozenset(n for n, p in table.is_param.items() if p),
        group_names={g.id: g.name for g in groups},
        messages=messages,
    )


def _get_module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise GraphError(f"pruning group names module {name!r}, which the model does not have") from None


def apply_plan(model: nn.Module, plan: ErasurePlan, *, attributes: bool = True) -> None:
    """Slice ``model`` in place as ``plan`` says, rescale norms, erase whole blocks, and (with
    ``attributes``) update module attributes/config."""
    table = TensorTable(model)
    with torch.no_grad():
        for name, dims in plan.cuts.items():
            canon = table.resolve(name)
            t = table.tensors[canon]
            if tuple(t.shape) != plan.shapes[name]:
                raise GraphError(f"tensor {name} has shape {tuple(t.shape)}, the plan expected {plan.shapes[name]}")
            table.replace(canon, drop_indices(t, dims))
        for module_name, (d, d_new) in plan.norms.items():
            module = _get_module(model, module_name)
            spec = find_rms_norm(module)
            assert spec is not None  # checked by plan_erasure
            spec.rescale(module, d, d_new)
    remove_blocks(model, plan.blocks.values())
    if attributes:
        update_module_attributes(model)


def codegen(
    model: nn.Module,
    groups: Iterable[PruningGroup],
    *,
    example_inputs: Any = None,
    verify: bool = True,
    inplace: bool = False,
    min_keep: int = 1,
    atol: float | None = None,
    rtol: float | None = None,
    emit: str = "auto",
) -> tuple[nn.Module, ErasureReport]:
    """Erase the zero structures of ``groups``; return the small model and a report.

    With ``verify`` and ``example_inputs``, the masked model's outputs are recorded before slicing and
    compared with the small model's (VerifyError on mismatch). The caller's ``model`` is untouched
    unless ``inplace``. ``emit``: ``"module"`` slices the module tree; ``"graph"`` emits a
    ``GraphModule`` (:mod:`shear.codegen.graph_module`); ``"auto"`` slices the module tree and falls
    back to the GraphModule when verification finds that the sliced tree cannot run (a module
    hard-codes a pruned size); without ``verify`` it is ``"module"``.
    """
    if emit not in EMIT_MODES:
        raise GraphError(f"emit must be one of {EMIT_MODES}, got {emit!r}")
    if emit != "module" and example_inputs is None:
        if emit == "graph":
            raise GraphError("emit='graph' traces the model again and needs example_inputs")
        emit = "module"
    plan = plan_erasure(model, groups, min_keep=min_keep)
    params_before = plan.numel(after=False)
    if plan.empty:
        return model, ErasureReport(plan, params_before, params_before)
    route_around_absent_experts(model)  # MoE: in the masked model a zero router row is an absent expert
    # the module tree rescales (and in 16 bits rounds) the norms of a narrower residual; the graph
    # keeps them and divides by the old width instead, so it is compared with the plain masked model
    overrides = _norm_references(model, plan) if emit != "graph" else {}
    recording = (
        _verify.record(model, example_inputs, overrides=overrides)
        if verify and example_inputs is not None
        else None
    )
    if emit == "graph":
        return _emit_graph(model, plan, example_inputs, recording, params_before, atol, rtol, "")
    masked = (_masked_skeleton(model, plan) if inplace else model) if emit == "auto" else None
    small = model if inplace else copy.deepcopy(model)
    apply_plan(small, plan, attributes=False)
    try:
        update_module_attributes(small)
    except GraphError as e:  # a module rule cannot say the sliced sizes (head_dim cut inside every head)
        if masked is None:
            raise
        if inplace:
            masked = _refill(masked, small, plan)
        if recording is not None and overrides:  # recorded with the module tree's rescaled norms
            recording = _verify.record(masked, example_inputs)
        reason = f"no module rule can describe the sliced module tree: {e}"
        return _emit_graph(masked, plan, example_inputs, recording, params_before, atol, rtol, reason)
    compatible = refresh_config(small)
    report = ErasureReport(
        plan,
        params_before=params_before,
        params_after=sum(p.numel() for p in small.parameters()),
        from_pretrained_compatible=compatible,
    )
    if recording is not None:
        try:
            report.max_diff = _verify.check(small, recording, example_inputs, atol=atol, rtol=rtol)
        except VerifyError as e:
            if masked is None or e.__cause__ is None:  # a numeric mismatch, not a failure to run
                raise
            reason = f"the sliced module tree cannot run: {str(e).split('. A module')[0].removeprefix('verify: ')}"
            if inplace:
                masked = _refill(masked, small, plan)
            if overrides:  # recorded with the rescaled norms of the module tree: not what the graph computes
                recording = _verify.record(masked, example_inputs)
            return _emit_graph(masked, plan, example_inputs, recording, params_before, atol, rtol, reason)
    return small, report


def _norm_references(model: nn.Module, plan: ErasurePlan) -> dict[int, torch.Tensor]:
    """``id(norm weight)`` -> the fp32 weight with which the masked model computes what the small
    model's rescaled and (in 16 bits) rounded norm computes; empty for fp32 and wider models."""
    out: dict[int, torch.Tensor] = {}
    for module_name, (d, d_new) in plan.norms.items():
        module = _get_module(model, module_name)
        spec = find_rms_norm(module)
        w = getattr(module, "weight", None)
        if spec is None or not isinstance(w, torch.Tensor) or d == d_new:
            continue
        if w.dtype in (torch.float16, torch.bfloat16):
            out[id(w)] = spec.reference_weight(w, d, d_new)
    return out


EMIT_MODES = ("auto", "module", "graph")
"""What :func:`codegen` may emit: see its ``emit`` argument."""


def _masked_skeleton(model: nn.Module, plan: ErasurePlan) -> nn.Module:
    """A copy of the module tree for the fallback to a GraphModule that costs no second model.

    Tensors that erasing cuts become meta placeholders (:func:`_refill` rebuilds them from the small
    model, only if the fallback runs); all others, and the norm weights that erasing rescales, are
    shared (``apply_plan`` rebinds tensors and never writes the old ones). Erasing in place thus
    peaks near the size of the model, not twice it.
    """
    table = TensorTable(model)
    keep = {id(getattr(_get_module(model, n), "weight", None)) for n in plan.norms}
    memo: dict[int, Any] = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    for name in plan.cuts:
        t = table.tensors[table.resolve(name)]
        if id(t) not in keep:
            ph = torch.empty(t.shape, dtype=t.dtype, device="meta")
            memo[id(t)] = nn.Parameter(ph, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else ph
    return copy.deepcopy(model, memo)


def _refill(skeleton: nn.Module, small: nn.Module, plan: ErasurePlan) -> nn.Module:
    """The masked model again: every placeholder of ``skeleton`` becomes the small model's tensor with
    zeros at the erased indices. Erased primary slices were zero; erased secondary slices only ever
    multiplied them, so the function is the masked model's."""
    st, kt = TensorTable(skeleton), TensorTable(small)
    for name, dims in plan.cuts.items():
        canon = st.resolve(name)
        if st.tensors[canon].device.type != "meta":
            continue
        t = kt.tensors[kt.resolve(name)].detach()
        for dim, idx in sorted(dims.items()):
            shape = list(t.shape)
            shape[dim] = plan.shapes[name][dim]
            stays = torch.ones(shape[dim], dtype=torch.bool)
            stays[idx] = False
            t = t.new_zeros(shape).index_copy_(dim, stays.nonzero().flatten().to(t.device), t)
        st.replace(canon, t)
    return skeleton


def _emit_graph(
    masked: nn.Module, plan: ErasurePlan, example_inputs: Any, recording: _verify.Recording | None,
    params_before: int, atol: float | None, rtol: float | None, reason: str,
) -> tuple[nn.Module, ErasureReport]:
    from shear.codegen.graph_module import graph_codegen

    small = graph_codegen(masked, plan, example_inputs)
    report = ErasureReport(
        plan, params_before=params_before, params_after=sum(p.numel() for p in small.parameters()),
        emitted="graph", fallback_reason=reason,
    )
    if recording is not None:
        report.max_diff = _verify.check(small, recording, example_inputs, atol=atol, rtol=rtol)
    return small, report
