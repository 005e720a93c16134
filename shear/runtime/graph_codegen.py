"""GraphModule codegen: the fallback for models whose module tree cannot be sliced.

:func:`~shear.runtime.codegen.codegen` slices the module tree, which keeps the model's class but
trusts every module to read its sizes from its tensors or attributes. A custom module that hard-codes
a size in ``forward`` (``q.view(B, T, 4, 8)``, ``x.split(32, dim=2)``) breaks that. This module
instead emits the model as a ``torch.fx.GraphModule`` built from ``torch.export``:

1. export the *masked* model again, with every input dimension dynamic where the model allows
   (``Dim.AUTO``; a failed dynamic export falls back to the example shapes), and run the dimension
   analysis on that graph;
2. derive, for every tensor dimension of every graph node, which positions survive the
   :class:`~shear.runtime.codegen.ErasurePlan` (a position dies when the structure owning it is
   erased; structures are read off the plan's cuts of the parameters of the same leaf space);
3. rewrite the size constants of the graph by a table keyed by aten op (:data:`SIZE_RULES`): the
   shape of ``view``/``reshape``/``expand``/``zeros``..., the sizes of ``split``, the bounds of
   ``slice``/``narrow``, ``layer_norm``'s ``normalized_shape``, a grouped convolution's ``groups``;
   a ``mean`` over a shrunk dimension becomes ``sum / old_count`` and ``rms_norm`` is spelled out
   with that mean (exact: the erased positions were zeros, so no norm rescaling is needed);
4. slice the program's parameters and buffers as the plan says and unlift it into a GraphModule.

The caller verifies the result against the masked original, as for the module tree. The graph is
the eval-mode computation (export traces in eval mode): its parameters train, but dropout is gone.
It takes the inputs it was traced with (the same keyword names; non-tensor ones such as
``use_cache`` are filled in), and varies in every dimension that export could keep dynamic (a
dimension of size 1 in the example inputs stays 1).

Example:
    >>> import torch
    >>> from shear.graph.trace import trace
    >>> from shear.runtime.codegen import plan_erasure
    >>> class Heads(torch.nn.Module):                 # hard-codes 4 heads of 2 in forward
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.qkv, self.out = torch.nn.Linear(8, 24), torch.nn.Linear(8, 8)
    ...     def forward(self, x):
    ...         q, k, v = self.qkv(x).split(8, dim=-1)
    ...         q, k, v = (t.view(x.shape[0], x.shape[1], 4, 2).transpose(1, 2) for t in (q, k, v))
    ...         y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    ...         return self.out(y.transpose(1, 2).reshape(x.shape[0], x.shape[1], 8))
    >>> net, x = Heads().eval(), torch.randn(2, 5, 8)
    >>> heads = next(g for g in trace(net, x).pruning_groups if g.kind == "head" and g.prunable)
    >>> with torch.no_grad():                         # zero head 1 (its q, k, v rows)
    ...     for m in heads.members:
    ...         if m.param.startswith("qkv"):
    ...             net.get_parameter(m.param)[m.positions[1]] = 0
    >>> small = graph_codegen(net, plan_erasure(net, [heads]), x)
    >>> small.qkv.weight.shape, bool(torch.allclose(small(x), net(x), atol=1e-6))
    (torch.Size([18, 8]), True)
    >>> bool(torch.allclose(small(x[:, :3]), net(x[:, :3]), atol=1e-6))     # other lengths work too
    True
"""

from __future__ import annotations

import math
import operator
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn

from shear.errors import GraphError, TraceError
from shear.graph.analysis import DimAnalysis, Dims
from shear.graph.trace import (
    _canonical_names,
    dynamic_shapes_for,
    export_model,
    normalize_inputs,
    run_analysis,
)
from shear.runtime.masks import drop_indices

__all__ = [
    "graph_codegen", "LiveDims", "SIZE_RULES", "register_size_rule", "TracedConstants", "finish_graph_module",
    "export_graph_module",
]

aten = torch.ops.aten

SizeRule = Callable[["LiveDims", torch.fx.Node], None]
"""Rewrites the size constants of one graph node in place, from the surviving positions."""

SIZE_RULES: dict[Any, SizeRule] = {}
"""aten op overload packet -> rule that rewrites its size constants."""


def register_size_rule(*ops: Any) -> Callable[[SizeRule], SizeRule]:
    """Decorator: register a size rule for each aten op overload packet of ``ops``."""

    def deco(fn: SizeRule) -> SizeRule:
        for op in ops:
            SIZE_RULES[op] = fn
        return fn

    return deco


@dataclass
class LiveDims:
    """Which positions of each graph value's dimensions survive erasure.

    ``dead`` maps a leaf space to a bool mask over its structures (True: erased). :meth:`keep` gives
    a bool mask over the positions of one dimension of a node's value (``None`` when nothing dies).
    """

    analysis: DimAnalysis
    dead: dict[int, torch.Tensor]
    _cache: dict[int, torch.Tensor | None] = field(default_factory=dict)

    def keep_space(self, sp: int | None) -> torch.Tensor | None:
        if sp is None:
            return None
        root = self.analysis.spaces.find(sp)
        if root not in self._cache:
            keep = torch.ones(self.analysis.spaces.size(root), dtype=torch.bool)
            for leaf, occs in self.analysis.spaces.expand(root).items():
                dead = self.dead.get(leaf)
                if dead is None or not bool(dead.any()):
                    continue
                for occ in occs:
                    covered = occ >= 0
                    keep[covered] &= ~dead[occ[covered]]
            self._cache[root] = None if bool(keep.all()) else keep
        return self._cache[root]

    def dims(self, node: Any, index: int | None = None) -> Dims:
        value = self.analysis.values.get(node) if isinstance(node, torch.fx.Node) else None
        if not value:
            return []
        if isinstance(value[0], list):
            if index is None:
                raise GraphError(f"node {node.name} is a tuple; name the element")
            return list(value[index])
        return list(value)

    def keep(self, node: Any, dim: int, index: int | None = None) -> torch.Tensor | None:
        dims = self.dims(node, index)
        if not -len(dims) <= dim < len(dims):
            return None
        return self.keep_space(dims[dim])

    def size(self, node: Any, dim: int, old: int, index: int | None = None) -> int:
        """The new size of a dimension whose old size is ``old``."""
        keep = self.keep(node, dim, index)
        return old if keep is None else int(keep.sum())


def _dead_structures(a: DimAnalysis, cuts: dict[str, dict[int, torch.Tensor]]) -> dict[int, torch.Tensor]:
    """Leaf space -> erased structures: those whose positions in the parameters are all cut."""
    totals: dict[int, torch.Tensor] = {}
    hits: dict[int, torch.Tensor] = {}
    for (name, dim), sp in a.state_dims.items():
        cut = cuts.get(name, {}).get(dim)
        for leaf, occs in a.spaces.expand(sp).items():
            size = a.spaces.size(leaf)
            total = totals.setdefault(leaf, torch.zeros(size, dtype=torch.long))
            hit = hits.setdefault(leaf, torch.zeros(size, dtype=torch.long))
            for occ in occs:
                covered = occ >= 0
                total += torch.bincount(occ[covered], minlength=size)
                if cut is not None and cut.numel():
                    mask = torch.zeros(occ.numel(), dtype=torch.bool)
                    mask[cut] = True
                    hit += torch.bincount(occ[covered & mask], minlength=size)
    return {leaf: (totals[leaf] > 0) & (hits[leaf] == totals[leaf]) for leaf in totals}


# --- size rules ---------------------------------------------------------------------------------------


def _args(node: torch.fx.Node) -> tuple[Any, ...]:
    return tuple(node.args)


def _kwargs(node: torch.fx.Node) -> dict[str, Any]:
    return dict(node.kwargs)


def _new_shape(live: LiveDims, node: torch.fx.Node, shape: Any) -> Any:
    if not isinstance(shape, (list, tuple)):
        return shape
    out = list(shape)
    for i, s in enumerate(shape):
        if isinstance(s, int) and s != -1:
            out[i] = live.size(node, i, s)
    return type(shape)(out)


def _shape_at(position: int) -> SizeRule:
    def rule(live: LiveDims, node: torch.fx.Node) -> None:
        args = list(_args(node))
        if len(args) > position:
            args[position] = _new_shape(live, node, args[position])
            node.args = tuple(args)
        elif "size" in node.kwargs:
            node.kwargs = {**node.kwargs, "size": _new_shape(live, node, node.kwargs["size"])}

    return rule


register_size_rule(aten.view, aten.reshape, aten._unsafe_view, aten.expand, aten.view_copy, aten.expand_copy)(
    _shape_at(1)
)
register_size_rule(aten.new_zeros, aten.new_ones, aten.new_empty, aten.new_full)(_shape_at(1))
register_size_rule(aten.zeros, aten.ones, aten.empty, aten.full, aten.rand, aten.randn)(_shape_at(0))


@register_size_rule(aten.split, aten.split_with_sizes)
def _split(live: LiveDims, node: torch.fx.Node) -> None:
    x, _, *rest = _args(node)
    dim = rest[0] if rest else _kwargs(node).get("dim", 0)
    value = live.analysis.values.get(node)
    if not value or not isinstance(value[0], list) or live.keep(x, dim) is None:
        return
    shapes = [tuple(t.shape) for t in node.meta["val"]]
    sizes = [live.size(node, dim, int(shape[dim]), index=i) for i, shape in enumerate(shapes)]
    node.target = aten.split_with_sizes.default
    node.args, node.kwargs = (x, sizes, dim), {}


@register_size_rule(aten.layer_norm, aten.native_layer_norm)
def _layer_norm(live: LiveDims, node: torch.fx.Node) -> None:
    """``normalized_shape`` follows the input's trailing dimensions."""
    args = list(_args(node))
    x, shape = args[0], args[1]
    n = len(shape)
    old = tuple(x.meta["val"].shape)[-n:]
    args[1] = [live.size(x, len(x.meta["val"].shape) - n + i, int(s)) for i, s in enumerate(old)]
    node.args = tuple(args)


@register_size_rule(aten.rms_norm)
def _rms_norm(live: LiveDims, node: torch.fx.Node) -> None:
    """RMS norm over a shrunk width: spelled out with the mean taken over the *old* width
    (``x * rsqrt(sum(x^2) / d + eps) * weight``), exact because the erased positions were zeros."""
    args = list(_args(node))
    x, shape = args[0], args[1]
    weight = args[2] if len(args) > 2 else None
    eps = args[3] if len(args) > 3 else None
    full = tuple(x.meta["val"].shape)
    dims = list(range(len(full) - len(shape), len(full)))
    if all(live.keep(x, d) is None for d in dims):
        return
    dtype = x.meta["val"].dtype
    count = math.prod(int(full[d]) for d in dims)
    eps = torch.finfo(dtype).eps if eps is None else float(eps)
    graph = node.graph
    call = graph.call_function
    with graph.inserting_before(node):
        xf = call(aten._to_copy.default, (x,), {"dtype": torch.float32})
        ms = call(aten.div.Tensor, (call(aten.sum.dim_IntList, (call(aten.pow.Tensor_Scalar, (xf, 2)), dims, True)), float(count)))
        y = call(aten.mul.Tensor, (xf, call(aten.rsqrt.default, (call(aten.add.Tensor, (ms, eps)),))))
        y = call(aten._to_copy.default, (y,), {"dtype": dtype})
        if weight is not None:
            y = call(aten.mul.Tensor, (y, weight))
    node.replace_all_uses_with(y)
    graph.erase_node(node)


@register_size_rule(aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution)
def _conv_groups(live: LiveDims, node: torch.fx.Node) -> None:
    """Grouped (e.g. depthwise) convolutions: ``groups = input channels / weight's input channels``."""
    args = list(_args(node))
    position = 8 if _packet(node.target) is aten.convolution else 6
    if len(args) <= position or args[position] == 1:
        return
    x, weight = args[0], args[1]
    channels = live.size(x, 1, int(x.meta["val"].shape[1]))
    per_group = live.size(weight, 1, int(weight.meta["val"].shape[1]))
    args[position] = channels // per_group
    node.args = tuple(args)


def _prefix(keep: torch.Tensor, bound: int) -> int:
    n = keep.numel()
    bound = bound + n if bound < 0 else bound
    return int(keep[: max(0, min(bound, n))].sum())


@register_size_rule(aten.slice)
def _slice(live: LiveDims, node: torch.fx.Node) -> None:
    x, *rest = _args(node)
    dim = rest[0] if rest else 0
    keep = live.keep(x, dim)
    if keep is None:
        return
    start = rest[1] if len(rest) > 1 else None
    end = rest[2] if len(rest) > 2 else None
    step = rest[3] if len(rest) > 3 else 1
    if not all(isinstance(b, int) or b is None for b in (start, end, step)):
        raise GraphError(f"{node.name}: slice with symbolic bounds over a pruned dimension")
    if step == 1:
        new_start = None if start is None else _prefix(keep, start)
        new_end = None if end is None else _prefix(keep, end)
        node.args = (x, dim, new_start, new_end, 1)
        return
    # a strided slice: the surviving taken positions, renumbered, must again be a stride
    n = keep.numel()
    taken = torch.arange(n)[slice(start, end, step)]
    new_index = torch.cumsum(keep.long(), 0) - 1
    kept = new_index[taken[keep[taken]]].tolist()
    strides = {b - a for a, b in zip(kept, kept[1:], strict=False)}
    if len(strides) > 1 or not kept:
        raise GraphError(
            f"{node.name}: slice [{start}:{end}:{step}] over a pruned dimension keeps positions {kept[:8]}..., "
            "which no slice of the smaller tensor gives; prune that dimension in whole strides"
        )
    new_step = strides.pop() if strides else 1
    node.args = (x, dim, kept[0], kept[-1] + 1, new_step)


@register_size_rule(aten.narrow)
def _narrow(live: LiveDims, node: torch.fx.Node) -> None:
    x, dim, start, length = _args(node)
    keep = live.keep(x, dim)
    if keep is None:
        return
    if not isinstance(start, int) or not isinstance(length, int):
        raise GraphError(f"{node.name}: narrow with symbolic bounds over a pruned dimension")
    new_start = _prefix(keep, start)
    node.args = (x, dim, new_start, _prefix(keep, start + length) - new_start)


@register_size_rule(aten.mean)
def _mean(live: LiveDims, node: torch.fx.Node) -> None:
    """``mean`` over a shrunk dimension divides by the old count: ``sum(x, dims) / count``."""
    args, kwargs = _args(node), _kwargs(node)
    x = args[0]
    dims = args[1] if len(args) > 1 else kwargs.get("dim")
    keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
    shape = tuple(x.meta["val"].shape) if isinstance(x, torch.fx.Node) else ()
    reduced = list(range(len(shape))) if dims is None else [d % len(shape) for d in dims]
    if all(live.keep(x, d) is None for d in reduced):
        return
    if any(not isinstance(shape[d], int) for d in reduced):
        raise GraphError(f"{node.name}: mean over a pruned and a dynamic dimension")
    count = math.prod(int(shape[d]) for d in reduced)
    graph = node.graph
    with graph.inserting_after(node):
        total = graph.call_function(aten.sum.dim_IntList, (x, reduced, keepdim))
        with graph.inserting_after(total):
            div = graph.call_function(aten.div.Tensor, (total, float(count)))
    node.replace_all_uses_with(div)
    graph.erase_node(node)


def _packet(target: Any) -> Any:
    return getattr(target, "overloadpacket", target)


# --- the emitter -------------------------------------------------------------------------------------


def _slice_state(ep: torch.export.ExportedProgram, model: nn.Module, plan: Any) -> None:
    canonical = _canonical_names(model)
    for store in (ep.state_dict, ep.constants):
        for name, tensor in list(store.items()):
            dims = plan.cuts.get(canonical.get(name, name))
            if not dims or not isinstance(tensor, torch.Tensor):
                continue
            new = drop_indices(tensor, dims)
            store[name] = nn.Parameter(new, requires_grad=tensor.requires_grad) if isinstance(tensor, nn.Parameter) else new


class TracedConstants:
    """Forward pre-hook: calls may leave out the non-tensor keyword arguments the graph was traced
    with (transformers' ``use_cache=False``, which shear adds); this puts the traced values back."""

    def __init__(self, constants: dict[str, Any]) -> None:
        self.constants = dict(constants)

    def __call__(self, _module: nn.Module, args: tuple[Any, ...], kw: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return args, {**self.constants, **kw}


def finish_graph_module(gm: torch.fx.GraphModule, constants: dict[str, Any]) -> torch.fx.GraphModule:
    """Make an unlifted exported program usable as a model: traced constants filled in, and
    ``train()``/``eval()`` allowed (torch blocks both because the graph is fixed to the traced mode;
    shear traces in eval mode, so the flag changes nothing)."""
    if constants:
        gm.register_forward_pre_hook(TracedConstants(constants), with_kwargs=True, prepend=True)
    for attr in ("train", "eval"):
        gm.__dict__.pop(attr, None)
    gm.meta["shear_constants"] = dict(constants)
    return gm.eval()


def export_graph_module(gm: torch.fx.GraphModule) -> torch.export.ExportedProgram:
    """Export a GraphModule that :func:`graph_codegen` emitted again, with the example inputs it keeps
    (``gm.meta["shear_inputs"]``) and dynamic dims where possible: what ``shear.save`` writes."""
    inputs = gm.meta.get("shear_inputs")
    if inputs is None:
        raise GraphError("this GraphModule was not emitted by shear (no example inputs kept); export it yourself")
    args, kwargs = inputs
    with torch.no_grad():
        try:
            shapes = dynamic_shapes_for(gm, args, kwargs)
            return torch.export.export(gm, args, kwargs, dynamic_shapes=shapes, strict=False)
        except Exception:  # noqa: BLE001 - fixed shapes are the fallback, as when it was emitted
            return torch.export.export(gm, args, kwargs, strict=False)


def graph_codegen(model: nn.Module, plan: Any, example_inputs: Any) -> torch.fx.GraphModule:
    """Emit the small model of ``plan`` (an :class:`~shear.runtime.codegen.ErasurePlan` of the masked
    ``model``) as a ``GraphModule``; ``model`` is not changed.

    Raises :class:`GraphError` when a graph op sets a size over a pruned dimension that no rule of
    :data:`SIZE_RULES` rewrites (register one, or mark that space unprunable).
    """
    try:
        ep = export_model(model, example_inputs, dynamic=True)
    except TraceError:
        ep = export_model(model, example_inputs)
    a = run_analysis(ep, model)
    live = LiveDims(a, _dead_structures(a, plan.cuts))
    for node in list(ep.graph.nodes):
        if node.op != "call_function" or node.target is operator.getitem:
            continue
        rule = SIZE_RULES.get(_packet(node.target))
        if rule is not None:
            rule(live, node)
    ep.graph.eliminate_dead_code()
    ep.graph_module.recompile()
    _slice_state(ep, model, plan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = ep.module()
    if not isinstance(gm, torch.fx.GraphModule):  # pragma: no cover - torch always returns one
        raise GraphError(f"torch.export gave a {type(gm).__name__}, not a GraphModule")
    args, kwargs = normalize_inputs(model, example_inputs)
    gm.meta["shear_inputs"] = (_detached(args), _detached(kwargs))
    return finish_graph_module(gm, {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)})


def _detached(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: _detached(v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_detached(v) for v in x)
    return x
