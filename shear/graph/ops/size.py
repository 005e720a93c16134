"""Size rules: how each op's size constants are rewritten once erasure shrinks a dimension.

GraphModule codegen (:mod:`shear.codegen.graph_module`) keeps the exported graph, so every size the
graph spells out must follow the erased tensors: the shape of ``view``/``reshape``/``expand``/
``zeros``..., the sizes of ``split``, the bounds of ``slice``/``narrow``, ``layer_norm``'s
``normalized_shape``, a grouped convolution's ``groups``. A ``mean`` over a shrunk dimension becomes
``sum / old_count`` and ``rms_norm`` is spelled out with that mean (exact: the erased positions were
zeros, so no norm rescaling is needed).

Each rule is the ``size`` facet of its op's entry in the one op table, registered at the end of this
module with :func:`shear.graph.ops.specs.register_op` (``register_op(aten.mean, size=mean_sizes)``).
A rule gets a :class:`~shear.graph.live_dims.LiveDims` and the node, and edits the node in place.

Example:
    >>> import torch
    >>> from shear.graph.ops.specs import lookup_size_rule
    >>> lookup_size_rule(torch.ops.aten.mean.dim) is mean_sizes
    True
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.fx

from shear.errors import GraphError
from shear.graph.live_dims import LiveDims
from shear.graph.ops.specs import SizeRule, register_op

__all__ = [
    "shape_at",
    "split_sizes",
    "layer_norm_sizes",
    "rms_norm_sizes",
    "conv_groups",
    "slice_sizes",
    "narrow_sizes",
    "mean_sizes",
    "complex_view_input",
]

aten = torch.ops.aten


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
        elif isinstance(s, torch.fx.Node):
            out[i] = _symbolic_size(live, node, i, s)
    return type(shape)(out)


def _symbolic_size(live: LiveDims, node: torch.fx.Node, i: int, size: torch.fx.Node) -> Any:
    """A size the graph computes from a dynamic input size, over a pruned dimension: ``bsz * num_heads``
    of attention that folds its heads into the batch (``view(bsz * 4, -1, 16)``).

    The dimension is ``coefficient * symbols``: the symbols are input sizes (never pruned), so the
    erased positions are a static share of every value of them. The new size is
    ``size // coefficient * kept``, ``kept`` of each ``coefficient`` positions staying (read off the
    example's sizes). A size export kept static (``8``) is rewritten like a constant; any other
    expression over a pruned dimension is refused.
    """
    keep = live.keep(node, i)
    if keep is None:
        return size
    expr = live.symbols.get(size)
    if expr is not None and expr.is_Integer:  # computed from sizes export kept static: a constant after all
        return live.size(node, i, int(expr))
    period = 0
    if expr is not None:
        coeff, rest = expr.as_coeff_Mul()
        period = int(coeff) if coeff.is_Integer and (rest.is_Mul or rest.is_Symbol) else 0
    n, kept = keep.numel(), int(keep.sum())
    if period < 1 or n % period or (kept * period) % n:
        raise GraphError(
            f"{node.name}: {node.target} sets dimension {i} to {expr if expr is not None else size}, a dynamic size "
            "over a pruned dimension that is not (input size) x (pruned static factor); mark that space unprunable "
            "or pass example inputs whose size shear can keep fixed"
        )
    graph = node.graph
    with graph.inserting_before(node):
        per = graph.call_function(operator.floordiv, (size, period))
        return graph.call_function(operator.mul, (per, kept * period // n))


def shape_at(position: int) -> SizeRule:
    def rule(live: LiveDims, node: torch.fx.Node) -> None:
        args = list(_args(node))
        if len(args) > position:
            args[position] = _new_shape(live, node, args[position])
            node.args = tuple(args)
        elif "size" in node.kwargs:
            node.kwargs = {**node.kwargs, "size": _new_shape(live, node, node.kwargs["size"])}

    return rule


def split_sizes(live: LiveDims, node: torch.fx.Node) -> None:
    x, _, *rest = _args(node)
    dim = rest[0] if rest else _kwargs(node).get("dim", 0)
    value = live.analysis.values.get(node)
    if not value or not isinstance(value[0], list) or live.keep(x, dim) is None:
        return
    shapes = [tuple(t.shape) for t in node.meta["val"]]
    sizes = [live.size(node, dim, int(shape[dim]), index=i) for i, shape in enumerate(shapes)]
    node.target = aten.split_with_sizes.default
    node.args, node.kwargs = (x, sizes, dim), {}


def layer_norm_sizes(live: LiveDims, node: torch.fx.Node) -> None:
    """``normalized_shape`` follows the input's trailing dimensions."""
    args = list(_args(node))
    x, shape = args[0], args[1]
    n = len(shape)
    old = tuple(x.meta["val"].shape)[-n:]
    args[1] = [live.size(x, len(x.meta["val"].shape) - n + i, int(s)) for i, s in enumerate(old)]
    node.args = tuple(args)


def rms_norm_sizes(live: LiveDims, node: torch.fx.Node) -> None:
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


def conv_groups(live: LiveDims, node: torch.fx.Node) -> None:
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


def slice_sizes(live: LiveDims, node: torch.fx.Node) -> None:
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


def narrow_sizes(live: LiveDims, node: torch.fx.Node) -> None:
    x, dim, start, length = _args(node)
    keep = live.keep(x, dim)
    if keep is None:
        return
    if not isinstance(start, int) or not isinstance(length, int):
        raise GraphError(f"{node.name}: narrow with symbolic bounds over a pruned dimension")
    new_start = _prefix(keep, start)
    node.args = (x, dim, new_start, _prefix(keep, start + length) - new_start)


def mean_sizes(live: LiveDims, node: torch.fx.Node) -> None:
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


def complex_view_input(live: LiveDims, node: torch.fx.Node) -> None:
    """``view_as_complex`` needs an even stride in every dimension but the last. A slice of a narrower
    tensor (DeepSeek-V2's rotary part, cut from a latent whose width was erased) can have an odd
    one: the op reads a contiguous copy (the same values)."""
    del live
    x = node.args[0]
    with node.graph.inserting_before(node):
        copy = node.graph.call_function(aten.clone.default, (x,), {"memory_format": torch.contiguous_format})
    node.args = (copy, *node.args[1:])


def _packet(target: Any) -> Any:
    return getattr(target, "overloadpacket", target)


# --- the size facet of each op -----------------------------------------------------------------------

register_op(aten.view, aten.reshape, aten._unsafe_view, aten.expand, aten.view_copy, aten.expand_copy, size=shape_at(1))
register_op(aten.new_zeros, aten.new_ones, aten.new_empty, aten.new_full, size=shape_at(1))
register_op(aten.zeros, aten.ones, aten.empty, aten.full, aten.rand, aten.randn, size=shape_at(0))
register_op(aten.split, aten.split_with_sizes, size=split_sizes)
register_op(aten.layer_norm, aten.native_layer_norm, size=layer_norm_sizes)
register_op(aten.rms_norm, size=rms_norm_sizes)
register_op(aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution, size=conv_groups)
register_op(aten.slice, size=slice_sizes)
register_op(aten.narrow, size=narrow_sizes)
register_op(aten.mean, size=mean_sizes)
register_op(aten.view_as_complex, size=complex_view_input)
