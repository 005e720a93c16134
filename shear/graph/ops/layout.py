"""Op rules for layout ops: views and reshapes into heads, permutes, expand (GQA's repeat_kv),
slices, splits, cat (fused qkv, RoPE's rotate_half), select/unbind, getitem.

Dimensions are read from the graph's shapes, negative dims normalised; reshapes regroup the
product factors of their input spaces (``[H * D] -> [H, D]`` refines the projection's space into
heads and head_dim); cat builds a sum of its inputs' spaces; slice and split cut them.

Example:
    >>> from shear.graph.ops.registry import lookup_rule
    >>> import torch
    >>> lookup_rule(torch.ops.aten.view.default) is reshape_rule
    True
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx

from shear.graph.analysis import DimAnalysis, Dims
from shear.graph.ops.registry import fresh_like, register_op
from shear.graph.ops.registry import norm_dim as _norm

__all__ = ["reshape_rule", "reshape_dims", "cut_dim", "strided_dim"]

aten = torch.ops.aten


def reshape_dims(a: DimAnalysis, dims: Dims, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> Dims:
    """Spaces of ``out_shape`` when a tensor with ``dims`` is reshaped (row-major) to it."""
    queue: list[int] = []
    for sp in dims:
        if sp is not None:
            queue.extend(a.spaces.prod_atoms(sp))
    out: Dims = []
    for size in out_shape:
        if size == 1:
            out.append(None)
            continue
        taken: list[int] = []
        have = 1
        while have < size:
            if not queue:
                return _reshape_conflict(a, dims, out_shape)
            atom = queue.pop(0)
            asz = a.spaces.size(atom)
            need = size // have
            if size % have:
                return _reshape_conflict(a, dims, out_shape)
            if asz <= need:
                taken.append(atom)
                have *= asz
                continue
            if asz % need:
                return _reshape_conflict(a, dims, out_shape)
            outer, inner = a.spaces.split_prod(atom, (need, asz // need))
            taken.append(outer)
            queue.insert(0, inner)
            have *= need
        if have != size:
            return _reshape_conflict(a, dims, out_shape)
        out.append(a.spaces.compose("prod", taken))
    return out


def _reshape_conflict(a: DimAnalysis, dims: Dims, out_shape: tuple[int, ...]) -> Dims:
    a.pin_all(dims, "reshape that regroups channels across incompatible factors")
    a.diagnose("conflict", "reshape regroups channel factors incompatibly; pinned")
    return a.fresh(out_shape, "reshape", "reshape that regroups channels across incompatible factors")


@register_op(
    aten.view,
    aten.reshape,
    aten._unsafe_view,
    aten.flatten,
    aten.unflatten,
    aten.squeeze,
    aten.unsqueeze,
    aten.view_copy,
)
def reshape_rule(a: DimAnalysis, node: torch.fx.Node) -> Dims:
    src = node.args[0]
    return reshape_dims(a, a.dims(src), a.shape(src), a.out_shape(node))


@register_op(aten.permute)
def permute_rule(a: DimAnalysis, node: torch.fx.Node) -> Dims:
    d = a.dims(node.args[0])
    perm = [_norm(int(p), len(d)) for p in node.args[1]]  # type: ignore[union-attr]
    return [d[p] for p in perm]


@register_op(aten.transpose)
def transpose_rule(a: DimAnalysis, node: torch.fx.Node) -> Dims:
    d = a.dims(node.args[0])
    i, j = _norm(int(node.args[1]), len(d)), _norm(int(node.args[2]), len(d))  # type: ignore[arg-type]
    d[i], d[j] = d[j], d[i]
    return d


@register_op(aten.t, aten.numpy_T)
def t_rule(a: DimAnalysis, node: torch.fx.Node) -> Dims:
    return list(reversed(a.dims(node.args[0])))


@register_op(aten.expand, aten.expand_copy)
def expand_rule(a: DimAnalysis, node: torch.fx.Node) -> Dims:
    d = a.dims(node.args[0])
    out_shape = a.out_shape(node)
    off = len(out_shape) - len(d)
    out: Dims = []
    for i, size in enumerate(out_shape):
        src = d[i - off] if i >= off else None
        if src is None and size > 1:
            (sp,) = a.fresh((size,), f"{node.name}.broadcast")
            a.spaces.pin(sp, "broadcast by expand (e.g. repeat_kv: query heads per kv head stay uniform)")
            out.append(sp)
        else:
            out.append(src)
    return out


def cut_dim(a: DimAnalysis, sp: int, start: int, length: int) -> int | None:
    """The space of indices ``[start, start + length)`` of space ``sp`` (refining it)."""
    n = a.spaces.size(sp)
    if start == 0 and length == n:
        return sp
    ref = a.spaces.refinement(sp)
    if ref is not None and ref.kind == "prod":
        outer, *rest = ref.children
        inner = n // a.spaces.size(outer)
        if start % inner == 0 and length % inner == 0:
            segs = (start // inner, length // inner, a.spaces.size(outer) - (start + length) // inner)
            pieces = a.spaces.split_sum(outer, segs)
            mid = pieces[1] if segs[0] else pieces[0]
            kids = ([mid] if a.spaces.size(mid) > 1 else []) + list(rest)
            return a.spaces.compose("prod", kids)
        a.spaces.pin(sp, "slice across the factors of a product layout")
        (fresh,) = a.fresh((length,), "slice", "slice across the factors of a product layout")
        return fresh
    segs = (start, length, n - start - length)
    pieces = a.spaces.split_sum(sp, segs)
    return pieces[1] if start else pieces[0]


def strided_dim(a: DimAnalysis, sp: int, n: int, start: int, end: int, step: int) -> int | None:
    """The space of ``x[start:end:step]`` along a dimension of space ``sp`` and size ``n``.

    ``x[r::s]`` over the whole dimension (``0 <= r < s``, ``s`` dividing ``n``) is ``x.view(n // s, s)
    [:, r]``: the output is the outer factor of a row-major ``(n // s, s)`` product and the inner
    factor is pinned. Interleaved GLUs (``gate, up = h[..., ::2], h[..., 1::2]``) thereby couple gate
    and up channel ``i`` through the shared outer factor. Any other stride pins ``sp``.
    """
    if n % step == 0 and 0 <= start < step and end >= n and n // step > 1:
        outer, inner = a.spaces.split_prod(sp, (n // step, step))
        a.spaces.pin(inner, "strided slice takes one position of every stride")
        return outer
    a.spaces.pin(sp, "strided slice")
    length = len(range(start, end, step))
    return a.fresh((length,), "slice", "strided slice")[0] if length > 1 else None


@register_op(aten.slice, aten.slice_copy)
def slice_rule(a: DimAnalysis, node: torch.fx.Node) -> Dims:
    src = node.args[0]
    d = a.dims(src)
    shape = a.shape(src)
    dim = _norm(int(node.args[1]) if len(node.args) > 1 else 0, len(d))  # type: ignore[arg-type]
    start = node.args[2] if len(node.args) > 2 else 0
    end = node.args[3] if len(node.args) > 3 else None
    step = node.args[4] if len(node.args) > 4 else 1
    n = shape[dim]
    start = 0 if start is None else int(start)  # type: ignore[arg-type]
    end = n if end is None else min(int(end), n)  # type: ignore[arg-type]
    start = min(max(start + n if start < 0 else start, 0), n)  # Python's clamping: x[-512:] of 12 is x[0:]
    end = min(max(end + n if end < 0 else end, 0), n)
    out = list(d)
    sp = d[dim]
    length = a.out_shape(node)[dim]
    if sp is None:
        return out
    if step != 1:
        out[dim] = strided_dim(a, sp, n, start, end, int(step))  # type: ignore[arg-type]
        return out
    out[dim] = cut_dim(a, sp, start, length) if length > 1 else None
    if length == 1:
        a.spaces.pin(sp, "single index taken by slice")
    return out


@register_op(aten.select, aten.select_copy)
def select_rule(a: DimAnalysis, node: torch.fx.Node) -> Dims:
    d = a.dims(node.args[0])
    dim = _norm(int(node.args[1]), len(d))  # type: ignore[arg-type]
    if d[dim] is not None:
        a.spaces.pin(d[dim], "indexed by select/unbind")  # type: ignore[arg-type]
    return d[:dim] + d[dim + 1 :]


@register_op(aten.unbind)
def unbind_rule(a: DimAnalysis, node: torch.fx.Node) -> list[Dims]:
    d = a.dims(node.args[0])
    dim = _norm(int(node.args[1]) if len(node.args) > 1 else 0, len(d))  # type: ignore[arg-type]
    if d[dim] is not None:
        a.spaces.pin(d[dim], "indexed by select/unbind")  # type: ignore[arg-type]
    n = a.shape(node.args[0])[dim]
    return [d[:dim] + d[dim + 1 :] for _ in range(n)]


@register_op(aten.split, aten.split_with_sizes, aten.chunk, aten.tensor_split, aten.split_copy)
def split_rule(a: DimAnalysis, node: torch.fx.Node) -> list[Dims]:
    src = node.args[0]
    d = a.dims(src)
    dim_arg = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    dim = _norm(int(dim_arg), len(d))  # type: ignore[arg-type]
    vals = node.meta.get("val") or []
    sizes = [int(v.shape[dim]) for v in vals]
    outs: list[Dims] = []
    start = 0
    for size in sizes:
        o = list(d)
        if d[dim] is not None:
            o[dim] = cut_dim(a, d[dim], start, size) if size > 1 else None  # type: ignore[arg-type]
            if size == 1:
                a.spaces.pin(d[dim], "split into single indices")  # type: ignore[arg-type]
        outs.append(o)
        start += size
    return outs


@register_op(aten.cat, aten.concat, aten.concatenate)
def cat_rule(a: DimAnalysis, node: torch.fx.Node) -> Dims:
    tensors = [t for t in node.args[0] if isinstance(t, torch.fx.Node)]  # type: ignore[union-attr]
    out_shape = a.out_shape(node)
    rank = len(out_shape)
    dim_arg = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    dim = _norm(int(dim_arg), rank)  # type: ignore[arg-type]
    tensors = [t for t in tensors if a.shape(t) and a.shape(t)[dim] > 0]
    out: Dims = [None] * rank
    pieces: list[int] = []
    for t in tensors:
        d = a.dims(t)
        for i in range(rank):
            if i != dim:
                out[i] = a.join(out[i], d[i])
        sp = d[dim]
        if sp is None:
            sp = a.spaces.new(1, f"{node.name}.piece")
            a.spaces.pin(sp, "size-1 piece of a cat")
        pieces.append(sp)
    out[dim] = a.spaces.compose("sum", pieces) if out_shape[dim] > 1 else None
    return out


@register_op(aten.stack)
def stack_rule(a: DimAnalysis, node: torch.fx.Node) -> Dims:
    tensors = [t for t in node.args[0] if isinstance(t, torch.fx.Node)]  # type: ignore[union-attr]
    out_shape = a.out_shape(node)
    dim = _norm(int(node.args[1]) if len(node.args) > 1 else 0, len(out_shape))  # type: ignore[arg-type]
    inner: Dims = a.join_broadcast(*[a.dims(t) for t in tensors])
    new = a.fresh((out_shape[dim],), f"{node.name}.stack", "stacked dimension")
    return inner[:dim] + new + inner[dim:]


@register_op(operator.getitem)
def getitem_rule(a: DimAnalysis, node: torch.fx.Node) -> Any:
    src, idx = node.args
    v = a.values.get(src)  # type: ignore[arg-type]
    if isinstance(v, list) and v and isinstance(v[0], list) and isinstance(idx, int) and idx < len(v):
        return list(v[idx])
    return fresh_like(a, node.meta.get("val"), node.name, "getitem of an unknown value")
