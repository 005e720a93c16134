"""GraphModule codegen: the fallback for models whose module tree cannot be sliced.

:func:`~shear.codegen.module_tree.codegen` slices the module tree, which keeps the model's class but
trusts every module to read its sizes from its tensors or attributes. A custom module that hard-codes
a size in ``forward`` (``q.view(B, T, 4, 8)``, ``x.split(32, dim=2)``) breaks that. This module
instead emits the model as a ``torch.fx.GraphModule`` built from ``torch.export``:

1. export the *masked* model again, with every input dimension dynamic where the model allows
   (``Dim.AUTO``; a failed dynamic export falls back to the example shapes), and run the dimension
   analysis on that graph;
2. derive, for every tensor dimension of every graph node, which positions survive the
   :class:`~shear.codegen.module_tree.ErasurePlan` (a position dies when the structure owning it is
   erased; structures are read off the plan's cuts of the parameters of the same leaf space);
3. rewrite the size constants of the graph by the ``size`` facet of each op in the one op table
   (:func:`shear.graph.ops.specs.register_op`; the rules are in :mod:`shear.graph.ops.size`): the
   shape of ``view``/``reshape``/``expand``/``zeros``..., the sizes of ``split``, the bounds of
   ``slice``/``narrow``, ``layer_norm``'s ``normalized_shape``, a grouped convolution's ``groups``;
   a ``mean`` over a shrunk dimension becomes ``sum / old_count`` and ``rms_norm`` is spelled out
   with that mean (exact: the erased positions were zeros, so no norm rescaling is needed);
4. slice the program's parameters and buffers as the plan says and unlift it into a GraphModule.

The caller verifies the result against the masked original, as for the module tree. The graph is
the eval-mode computation (export traces in eval mode): its parameters train, but dropout is gone.
It takes the inputs it was traced with (the same keyword names; non-tensor ones such as
``use_cache`` are filled in), and varies in every dimension that export could keep dynamic. Export
fixes a dimension of size 1, so example inputs of batch 1 are traced repeated to batch 2: the emitted
graph takes any batch (any other dimension of size 1 in the example inputs stays 1).

A 16-bit graph has its dtypes baked in; erase's check runs it in fp32 on a widened copy of its graph
(:func:`shear.codegen.verify.widened_graph`), as it runs a 16-bit module tree in fp32, and compares
it with the masked model itself (the graph keeps the norms of a narrower residual and divides by the
old width, where the module tree rescales them).

Example:
    >>> import torch
    >>> from shear.graph.trace import trace
    >>> from shear.codegen.module_tree import plan_erasure
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

import operator
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
from torch import nn

import shear.graph.ops.size  # noqa: F401  (registers the size facets)
from shear.errors import GraphError, InputError, TraceError
from shear.graph.analysis import DimAnalysis
from shear.graph.live_dims import LiveDims
from shear.graph.ops.specs import SizeRule, lookup_size_rule, register_op
from shear.graph.trace import (
    _canonical_names,
    dynamic_shapes_for,
    export_model,
    normalize_inputs,
    run_analysis,
)
from shear.model.tensors import drop_indices

__all__ = [
    "graph_codegen", "LiveDims", "register_size_rule", "TracedConstants", "FixedDims",
    "finish_graph_module", "export_graph_module", "static_inputs",
]

aten = torch.ops.aten


def register_size_rule(op: Any, *more_ops: Any) -> Callable[[SizeRule], SizeRule]:
    """Decorator: register ``fn`` as the size rule of each op of ``op, *more_ops``. A thin wrapper:
    the one place is ``shear.graph.ops.specs.register_op(op, size=fn)``, which this calls.

    Example:
        >>> from shear.graph.ops.specs import OP_SPECS
        >>> @register_size_rule(torch.ops.aten.special_entr)
        ... def entr_sizes(live, node) -> None: ...
        >>> lookup_size_rule(torch.ops.aten.special_entr.default) is entr_sizes
        True
        >>> del OP_SPECS[torch.ops.aten.special_entr]
    """

    def deco(fn: SizeRule) -> SizeRule:
        register_op(op, *more_ops, size=fn)
        return fn

    return deco


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


class FixedDims:
    """Forward pre-hook: refuses, with an :class:`~shear.errors.InputError` that names the input and
    the size it needs, a tensor input whose size differs in a dimension the graph fixed.

    ``torch.export`` keeps a dimension static where the model needs it (a forward that hard-codes
    ``view(1, ...)`` fixes the batch to 1); the graph's own check would fail with a bare guard
    assertion. ``fixed`` maps an input name to ``{dimension: size}``; ``names`` are the positional
    order of the inputs.

    Example:
        >>> hook = FixedDims(["idx"], {"idx": {0: 1}})
        >>> hook(nn.Identity(), (torch.zeros(3, 5),), {})
        Traceback (most recent call last):
        shear.errors.InputError: idx has shape (3, 5), but this graph fixes its dimension 0 to 1: ...
    """

    def __init__(self, names: list[str], fixed: dict[str, dict[int, int]]) -> None:
        self.names = list(names)
        self.fixed = {k: dict(v) for k, v in fixed.items()}

    def __call__(self, _module: nn.Module, args: tuple[Any, ...], kw: dict[str, Any]) -> None:
        for name, value in [*zip(self.names, args, strict=False), *kw.items()]:
            dims = self.fixed.get(name)
            if not dims or not isinstance(value, torch.Tensor):
                continue
            for dim, size in dims.items():
                if dim < value.dim() and value.shape[dim] != size:
                    what = "batch (dimension 0)" if dim == 0 else f"dimension {dim}"
                    raise InputError(
                        f"{name} has shape {tuple(value.shape)}, but this graph fixes its dimension {dim} to {size}: "
                        f"the model's forward hard-codes that size, so torch.export could not keep the {what} "
                        f"dynamic when shear emitted it. Call it with {name}.shape[{dim}] == {size}"
                        + (" (one sequence at a time)" if dim == 0 and size == 1 else "")
                        + ", or make the forward read that size from its input and prune again"
                    )


def _is_number(size: Any) -> bool:
    """An int, or a symbolic size export specialised to a number (``Dim.AUTO`` that the model fixed)."""
    expr = getattr(getattr(size, "node", None), "expr", None)
    return isinstance(size, int) or (expr is not None and bool(expr.is_number))


def static_inputs(program: torch.export.ExportedProgram) -> dict[str, dict[int, int]]:
    """User input -> ``{dimension: size}`` of the dimensions ``program`` fixed (export kept them static).

    Read it right after export: the unlifted module shows every traced size as a number, fixed or
    not, and reading sizes as ints (the dimension analysis does) specialises the program's own."""
    users = set(program.graph_signature.user_inputs)
    out: dict[str, dict[int, int]] = {}
    for node in program.graph.nodes:
        val = node.meta.get("val")
        if node.op == "placeholder" and node.name in users and isinstance(val, torch.Tensor):
            dims = {d: int(n) for d, n in enumerate(val.shape) if _is_number(n)}
            if dims:
                out[node.name] = dims
    return out


def _fixed_dims(gm: torch.fx.GraphModule, static: dict[str, dict[int, int]] | None = None) -> FixedDims | None:
    """The :class:`FixedDims` of ``gm``'s tensor inputs: ``static`` (:func:`static_inputs` of the program
    ``gm`` was unlifted from) where given, else the static sizes in ``gm``'s traced metadata."""
    names: list[str] = []
    fixed: dict[str, dict[int, int]] = {}
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        names.append(str(node.target))
        val = node.meta.get("val")
        if static is not None:
            dims = static.get(str(node.target), {})
        elif isinstance(val, torch.Tensor):
            dims = {d: int(n) for d, n in enumerate(val.shape) if isinstance(n, int)}
        else:
            dims = {}
        if dims:
            fixed[str(node.target)] = dims
    return FixedDims(names, fixed) if fixed else None


def finish_graph_module(
    gm: torch.fx.GraphModule, constants: dict[str, Any], static: dict[str, dict[int, int]] | None = None,
) -> torch.fx.GraphModule:
    """Make an unlifted exported program usable as a model: traced constants filled in, inputs of a
    size the graph fixed refused with a clear error (:class:`FixedDims`; ``static`` is
    :func:`static_inputs` of the program, which only it can tell), and ``train()``/``eval()`` allowed
    (torch blocks both because the graph is fixed to the traced mode; shear traces in eval mode, so
    the flag changes nothing)."""
    fixed = _fixed_dims(gm, static)
    if fixed is not None:
        gm.register_forward_pre_hook(fixed, with_kwargs=True)
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
    """Emit the small model of ``plan`` (an :class:`~shear.codegen.module_tree.ErasurePlan` of the masked
    ``model``) as a ``GraphModule``; ``model`` is not changed.

    Raises :class:`GraphError` when a graph op sets a size over a pruned dimension that no rule of
    the op table rewrites (register one with ``register_op(op, size=rule)``, or mark that space
    unprunable).
    """
    ep, traced = _export_dynamic(model, example_inputs)
    static = static_inputs(ep)
    symbols = {n: v.node.expr for n in ep.graph.nodes if isinstance(v := n.meta.get("val"), torch.SymInt)}
    a = run_analysis(ep, model)
    live = LiveDims(a, _dead_structures(a, plan.cuts), symbols)
    for node in list(ep.graph.nodes):
        if node.op != "call_function" or node.target is operator.getitem:
            continue
        rule = lookup_size_rule(node.target)
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
    args, kwargs = normalize_inputs(model, traced)
    gm.meta["shear_inputs"] = (_detached(args), _detached(kwargs))
    return finish_graph_module(gm, {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}, static)


def _export_dynamic(model: nn.Module, example_inputs: Any) -> tuple[torch.export.ExportedProgram, Any]:
    """Export ``model`` with dynamic input dimensions; return the program and the inputs it was traced with.

    ``Dim.AUTO`` keeps a dimension of size 1 static (export specialises it), so a batch of one would
    fix the emitted graph to batch 1. When every tensor input has batch 1, the trace runs on the
    same inputs repeated to batch 2 instead (the values do not matter to the graph), and falls back
    to the given inputs when the model does not take them (it hard-codes batch 1), then to fixed shapes.
    """
    tries = [example_inputs]
    doubled = _batch_of_two(example_inputs)
    if doubled is not None:
        tries.insert(0, doubled)
    for inputs in tries:
        try:
            return export_model(model, inputs, dynamic=True), inputs
        except TraceError:
            continue
    return export_model(model, example_inputs), example_inputs


def _batch_of_two(x: Any) -> Any:
    """``x`` with every tensor repeated to batch 2 along dim 0, or None unless every tensor has batch 1."""
    tensors = _tensors(x)
    if not tensors or any(t.dim() == 0 or t.shape[0] != 1 for t in tensors):
        return None
    return _map_tensors(x, lambda t: t.expand(2, *t.shape[1:]).clone())


def _tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, dict) or hasattr(x, "keys") and not isinstance(x, nn.Module):
        return [t for k in x.keys() for t in _tensors(x[k])]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in _tensors(v)]
    return []


def _map_tensors(x: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, dict) or hasattr(x, "keys") and not isinstance(x, nn.Module):
        return {k: _map_tensors(x[k], fn) for k in x.keys()}
    if isinstance(x, (tuple, list)):
        return type(x)(_map_tensors(v, fn) for v in x)
    return x


def _detached(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: _detached(v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_detached(v) for v in x)
    return x
