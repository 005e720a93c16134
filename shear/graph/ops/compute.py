"""Op rules for compute ops: elementwise math, linear/matmul/conv, embedding, norms, reductions,
attention, pooling, and constants.

Two facts decide every rule. *Which dims are the same space* (joins), and *whether a zeroed channel
stays zero* through the op: ``silu(0) = 0`` keeps a channel prunable, ``sigmoid(0) = 0.5`` does not,
so such ops pin the spaces they touch. Parameters get roles: a dimension that produces an output
channel is **primary** (must be zero for the channel to vanish), one that consumes an input channel
is **secondary**.

Example:
    >>> from shear.graph.ops.registry import lookup_rule
    >>> import torch
    >>> lookup_rule(torch.ops.aten.linear.default) is linear_rule
    True
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx

from shear.graph.analysis import DimAnalysis, Dims
from shear.graph.groups import Role
from shear.graph.ops.registry import fresh_like, op_name, register_op
from shear.graph.ops.registry import norm_dim as _norm

__all__ = ["linear_rule", "ZERO_PRESERVING", "NON_ZERO_PRESERVING", "ALIASING"]

aten = torch.ops.aten


def _set_roles(a: DimAnalysis, arg: Any, role: Role) -> None:
    for i in range(len(a.shape(arg))):
        a.role(arg, i, role)


# ----------------------------------------------------------------------------- elementwise
ZERO_PRESERVING = [
    aten.relu, aten.relu_, aten.gelu, aten.silu, aten.silu_, aten.tanh, aten.neg, aten.clone,
    aten.contiguous, aten.alias, aten.detach, aten.dropout, aten.feature_dropout, aten._to_copy,
    aten.to, aten.type_as, aten.hardtanh, aten.hardtanh_, aten.leaky_relu, aten.elu, aten.sin,
    aten.sqrt, aten.abs, aten.erf, aten.hardswish, aten.mish, aten.lift_fresh_copy, aten.sign,
    aten.relu6, aten.celu, aten.selu, aten.gelu_, aten.alias_copy, aten.positive, aten.square, aten.detach_,
]  # fmt: skip
"""Unary ops with f(0) = 0: a zero channel stays zero; spaces pass through."""

NON_ZERO_PRESERVING = [
    aten.sigmoid, aten.exp, aten.cos, aten.rsqrt, aten.reciprocal, aten.log, aten.softplus,
    aten.hardsigmoid, aten.bitwise_not, aten.logical_not, aten.exp2, aten.expm1, aten.log1p,
    aten.cosh, aten.erfc, aten.isnan, aten.isinf, aten.ones_like, aten.full_like,
]  # fmt: skip
"""Unary ops with f(0) != 0: the spaces pass through but are pinned."""


@register_op(*ZERO_PRESERVING)
def zero_preserving_rule(a: DimAnalysis, node: torch.fx.Node) -> Dims:
    return a.dims(node.args[0])


ALIASING = [
    aten._to_copy, aten.to, aten.type_as, aten.clone, aten.contiguous, aten.alias, aten.detach,
    aten.add, aten.sub, aten.mul, aten.div, aten.neg,
]  # fmt: skip
"""Ops that, applied to one parameter and scalars, give "the same tensor" for role purposes."""

register_op(*ALIASING, alias=True)


@register_op(aten.native_dropout)
def native_dropout_rule(a: DimAnalysis, node: torch.fx.Node) -> list[Dims]:
    d = a.dims(node.args[0])
    return [d, list(d)]


@register_op(*NON_ZERO_PRESERVING)
def non_zero_preserving_rule(a: DimAnalysis, node: torch.fx.Node) -> Dims:
    d = a.dims(node.args[0])
    a.pin_nonzero(d, f"{op_name(node.target)}: f(0) != 0, a zeroed channel would not stay zero")
    return d


@register_op(aten.zeros_like, aten.empty_like)
def zeros_like_rule(a: DimAnalysis, node: torch.fx.Node) -> Dims:
    return a.dims(node.args[0])


def _scalar_operand(node: torch.fx.Node) -> Any:
    other = node.args[1] if len(node.args) > 1 else None
    return None if isinstance(other, torch.fx.Node) else other


@register_op(aten.add, aten.sub, aten.rsub)
def add_rule(a: DimAnalysis, node: torch.fx.Node) -> Dims:
    """Sum of channels: zero only if both are zero, so both sides join and producers are primary."""
    x = node.args[0]
    other = node.args[1] if len(node.args) > 1 else None
    if not isinstance(other, torch.fx.Node):
        d = a.dims(x)
        if other not in (0, 0.0, None) or node.target.overloadpacket is aten.rsub:  # type: ignore[union-attr]
            a.pin_nonzero(d, f"{op_name(node.target)} adds a constant: a zeroed channel would not stay zero")
        return d
    for t in (x, other):
        _set_roles(a, t, Role.PRIMARY)
    return a.join_broadcast(a.dims(x), a.dims(other))


@register_op(aten.mul)
def mul_rule(a: DimAnalysis, node: torch.fx.Node) -> Dims:
    """Product: zero if either side is zero; sides join, parameter factors are secondary."""
    x, other = node.args[0], node.args[1]
    if not isinstance(other, torch.fx.Node):
        return a.dims(x)
    for t in (x, other):
        _set_roles(a, t, Role.SECONDARY)
    return a.join_broadcast(a.dims(x), a.dims(other))


@register_op(aten.div)
def div_rule(a: DimAnalysis, node: torch.fx.Node) -> Dims:
    x, other = node.args[0], node.args[1]
    if not isinstance(other, torch.fx.Node):
        return a.dims(x)
    _set_roles(a, other, Role.SECONDARY)
    a.pin_all(a.dims(other), "divides by a channel (0/0 after pruning)")
    return a.join_broadcast(a.dims(x), a.dims(other))


@register_op(aten.pow)
def pow_rule(a: DimAnalysis, node: torch.fx.Node) -> Dims:
    x, e = node.args[0], node.args[1]
    d = a.dims(x) if isinstance(x, torch.fx.Node) else a.dims(e)
    if isinstance(e, torch.fx.Node) or not isinstance(x, torch.fx.Node) or not float(e) > 0:  # type: ignore[arg-type]
        a.pin_all(a.join_broadcast(a.dims(x), a.dims(e)), "pow with a tensor or non-positive exponent")
    return d


@register_op(
    aten.where, aten.maximum, aten.minimum, aten.eq, aten.ne, aten.lt, aten.le, aten.gt, aten.ge,
    aten.__and__, aten.__or__, aten.bitwise_and, aten.bitwise_or, aten.logical_and, aten.logical_or,
    aten.masked_fill, aten.tril, aten.triu, aten.clamp, aten.clamp_min, aten.clamp_max, aten.atan2, aten.fmod, aten.remainder,
)  # fmt: skip
def pinning_elementwise_rule(a: DimAnalysis, node: torch.fx.Node) -> Dims:
    """Elementwise ops whose zero behaviour is not guaranteed: join operands, pin the result."""
    operands = [a.dims(t) for t in node.args if isinstance(t, torch.fx.Node)]
    out = a.join_broadcast(*operands)
    a.pin_all(out, f"{op_name(node.target)}: zero channels are not guaranteed to stay zero")
    return out


# ----------------------------------------------------------------------------- linear algebra
@register_op(aten.linear)
def linear_rule(a: DimAnalysis, node: torch.fx.Node) -> Dims:
    """``y = x W^T + b``: W dim 0 produces the output space (primary), dim 1 consumes x's last."""
    x, w = node.args[0], node.args[1]
    b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    xd, wd = a.dims(x), a.dims(w)
    a.join(xd[-1], wd[1])
    a.role(w, 0, Role.PRIMARY)
    a.role(w, 1, Role.SECONDARY)
    out_sp = wd[0]
    if isinstance(b, torch.fx.Node):
        out_sp = a.join(out_sp, a.dims(b)[0])
        a.role(b, 0, Role.PRIMARY)
    return xd[:-1] + [out_sp]


@register_op(aten.addmm)
def addmm_rule(a: DimAnalysis, node: torch.fx.Node) -> Dims:
    """``b + x @ W`` (GPT-2's Conv1D stores W as [in, out])."""
    b, x, w = node.args[0], node.args[1], node.args[2]
    xd, wd = a.dims(x), a.dims(w)
    a.join(xd[-1], wd[0])
    for arg, dims_role in ((x, (Role.PRIMARY, Role.SECONDARY)), (w, (Role.SECONDARY, Role.PRIMARY))):
        a.role(arg, 0, dims_role[0])
        a.role(arg, 1, dims_role[1])
    _set_roles(a, b, Role.PRIMARY)
    return a.join_broadcast([xd[0], wd[1]], a.dims(b))


@register_op(aten.mm, aten.bmm, aten.matmul)
def matmul_rule(a: DimAnalysis, node: torch.fx.Node) -> Dims:
    x, y = node.args[0], node.args[1]
    xd, yd = a.dims(x), a.dims(y)
    if len(xd) < 2 or len(yd) < 2:
        a.pin_all(xd + yd, "matmul with a vector operand")
        return fresh_like(a, node.meta.get("val"), node.name, "matmul with a vector operand")
    a.join(xd[-1], yd[-2])
    for arg, rank in ((x, len(xd)), (y, len(yd))):
        a.role(arg, rank - 2, Role.PRIMARY if arg is x else Role.SECONDARY)
        a.role(arg, rank - 1, Role.SECONDARY if arg is x else Role.PRIMARY)
    batch = a.join_broadcast(xd[:-2], yd[:-2])
    return batch + [xd[-2], yd[-1]]


@register_op(aten.convolution, aten.conv1d, aten.conv2d, aten.conv3d)
def conv_rule(a: DimAnalysis, node: torch.fx.Node) -> Dims:
    """Convolution: weight [out, in/groups, *k]; depthwise keeps its input space."""
    x, w = node.args[0], node.args[1]
    b = node.args[2] if len(node.args) > 2 else None
    is_full = node.target.overloadpacket is aten.convolution  # type: ignore[union-attr]
    transposed = bool(node.args[6]) if is_full and len(node.args) > 6 else False
    groups = int(node.args[8] if is_full else (node.args[6] if len(node.args) > 6 else 1))  # type: ignore[arg-type]
    xd, wd = a.dims(x), a.dims(w)
    out_shape = a.out_shape(node)
    spatial = a.fresh(out_shape[2:], f"{node.name}.spatial", "spatial dimension")
    out_idx, in_idx = (1, 0) if transposed else (0, 1)
    cin = a.shape(x)[1]
    if groups == 1:
        a.join(xd[1], wd[in_idx])
        out_sp = wd[out_idx]
        a.role(w, out_idx, Role.PRIMARY)
        a.role(w, in_idx, Role.SECONDARY)
    elif groups == cin and a.shape(w)[in_idx] == 1 and not transposed and a.shape(w)[0] == cin:
        out_sp = a.join(xd[1], wd[0])
        a.role(w, 0, Role.PRIMARY)
    else:
        a.pin_all([xd[1], *wd[:2]], f"grouped convolution (groups={groups})")
        out_sp = wd[out_idx]
    if isinstance(b, torch.fx.Node):
        out_sp = a.join(out_sp, a.dims(b)[0])
        a.role(b, 0, Role.PRIMARY)
    return [xd[0], out_sp, *spatial]


@register_op(aten.embedding)
def embedding_rule(a: DimAnalysis, node: torch.fx.Node) -> Dims:
    w, idx = node.args[0], node.args[1]
    wd = a.dims(w)
    if wd[0] is not None:
        a.spaces.pin(wd[0], "vocabulary (embedding rows are indexed by token ids)")
    a.role(w, 1, Role.PRIMARY)
    return a.dims(idx) + [wd[1]]


# ----------------------------------------------------------------------------- norms
@register_op(aten.layer_norm, aten.native_layer_norm)
def layer_norm_rule(a: DimAnalysis, node: torch.fx.Node) -> Any:
    x, shape = node.args[0], node.args[1]
    w = node.args[2] if len(node.args) > 2 else None
    b = node.args[3] if len(node.args) > 3 else None
    d = a.dims(x)
    k = len(shape)  # type: ignore[arg-type]
    for param in (w, b):
        if isinstance(param, torch.fx.Node):
            pd = a.dims(param)
            for i in range(k):
                d[len(d) - k + i] = a.join(d[len(d) - k + i], pd[i])
            _set_roles(a, param, Role.PRIMARY)
    a.pin_all(d[len(d) - k :], "LayerNorm centres over the width: removing channels changes its mean and variance")
    if node.target.overloadpacket is aten.native_layer_norm:  # type: ignore[union-attr]
        stats = d[: len(d) - k] + [None] * k
        return [d, list(stats), list(stats)]
    return d


@register_op(aten.rms_norm, aten._fused_rms_norm)
def rms_norm_rule(a: DimAnalysis, node: torch.fx.Node) -> Any:
    x, shape = node.args[0], node.args[1]
    w = node.args[2] if len(node.args) > 2 else None
    d = a.dims(x)
    k = len(shape)  # type: ignore[arg-type]
    if isinstance(w, torch.fx.Node):
        pd = a.dims(w)
        for i in range(k):
            d[len(d) - k + i] = a.join(d[len(d) - k + i], pd[i])
        _set_roles(a, w, Role.SECONDARY)
    for sp in d[len(d) - k :]:
        if sp is not None:
            a.reductions.append((sp, a.module_of(), op_name(node.target)))
    if node.target.overloadpacket is aten._fused_rms_norm:  # type: ignore[union-attr]
        return [d, d[: len(d) - k] + [None] * k]
    return d


_BN_OPS = [
    aten._native_batch_norm_legit_no_training, aten._native_batch_norm_legit, aten.batch_norm,
    aten.native_batch_norm, aten._native_batch_norm_legit_functional, aten.cudnn_batch_norm,
    aten.instance_norm,
]  # fmt: skip


@register_op(*_BN_OPS)
def batch_norm_rule(a: DimAnalysis, node: torch.fx.Node) -> Any:
    """Per-channel affine: weight and bias are primary (an all-zero channel then stays zero)."""
    x = node.args[0]
    d = a.dims(x)
    ch = d[1] if len(d) > 1 else None
    if node.target.overloadpacket is aten.instance_norm:  # type: ignore[union-attr]
        a.pin_all([ch], "instance norm")
    for i, arg in enumerate(node.args[1:5]):
        if isinstance(arg, torch.fx.Node):
            ch = a.join(ch, a.dims(arg)[0])
            a.role(arg, 0, Role.PRIMARY if i < 2 else Role.SECONDARY)
    d[1] = ch
    val = node.meta.get("val")
    if isinstance(val, (tuple, list)):
        return [d] + [[ch] if isinstance(v, torch.Tensor) and v.dim() == 1 else [] for v in val[1:]]
    return d


@register_op(aten.group_norm, aten.native_group_norm)
def group_norm_rule(a: DimAnalysis, node: torch.fx.Node) -> Any:
    d = a.dims(node.args[0])
    a.pin_all(d[1:2], "GroupNorm normalises over channel groups")
    for arg in node.args[1:3]:
        if isinstance(arg, torch.fx.Node):
            a.join(d[1], a.dims(arg)[0])
    val = node.meta.get("val")
    if isinstance(val, (tuple, list)):
        return [d] + [fresh_like(a, v, node.name, "norm statistics") for v in val[1:]]
    return d


# ----------------------------------------------------------------------------- reductions
def _reduced(node: torch.fx.Node, rank: int) -> list[int]:
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if dims is None:
        return list(range(rank))
    if isinstance(dims, int):
        dims = [dims]
    return sorted({_norm(int(x), rank) for x in dims})  # type: ignore[union-attr]


def _keepdim(node: torch.fx.Node) -> bool:
    return bool(node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False))


def _after_reduce(d: Dims, red: list[int], keep: bool) -> Dims:
    return [None if i in red else s for i, s in enumerate(d)] if keep else [s for i, s in enumerate(d) if i not in red]


@register_op(aten.mean)
def mean_rule(a: DimAnalysis, node: torch.fx.Node) -> Dims:
    """A mean over a channel space needs a rescale rule for its module (RMSNorm) or a pin."""
    d = a.dims(node.args[0])
    red = _reduced(node, len(d))
    for i in red:
        if d[i] is not None:
            a.reductions.append((d[i], a.module_of(), op_name(node.target)))  # type: ignore[arg-type]
    return _after_reduce(d, red, _keepdim(node))


@register_op(aten.sum)
def sum_rule(a: DimAnalysis, node: torch.fx.Node) -> Dims:
    d = a.dims(node.args[0])
    return _after_reduce(d, _reduced(node, len(d)), _keepdim(node))


@register_op(
    aten.var, aten.std, aten.amax, aten.amin, aten.logsumexp, aten.norm, aten.linalg_vector_norm,
    aten.prod, aten.any, aten.all, aten.argmax, aten.argmin, aten.var_mean,
)  # fmt: skip
def pinning_reduction_rule(a: DimAnalysis, node: torch.fx.Node) -> Any:
    d = a.dims(node.args[0])
    red = _reduced(node, len(d))
    a.pin_all([d[i] for i in red], f"{op_name(node.target)} over channels changes after pruning")
    out = _after_reduce(d, red, _keepdim(node))
    if isinstance(node.meta.get("val"), (tuple, list)):
        return [out, list(out)]
    return out


@register_op(aten.max, aten.min)
def max_rule(a: DimAnalysis, node: torch.fx.Node) -> Any:
    if len(node.args) == 1:
        a.pin_all(a.dims(node.args[0]), f"{op_name(node.target)} over all elements")
        return []
    if isinstance(node.args[1], torch.fx.Node):
        return pinning_elementwise_rule(a, node)
    return pinning_reduction_rule(a, node)


@register_op(aten._softmax, aten.softmax, aten._log_softmax, aten.log_softmax, aten.cumsum, aten.cumprod)
def softmax_rule(a: DimAnalysis, node: torch.fx.Node) -> Dims:
    d = a.dims(node.args[0])
    dim = _norm(int(node.args[1]), len(d))  # type: ignore[arg-type]
    if d[dim] is not None:
        a.spaces.pin(d[dim], f"{op_name(node.target)} along this dimension")  # type: ignore[arg-type]
    return d


# ----------------------------------------------------------------------------- attention
_SDPA = [
    aten.scaled_dot_product_attention, aten._scaled_dot_product_flash_attention_for_cpu,
    aten._scaled_dot_product_efficient_attention, aten._scaled_dot_product_flash_attention,
    aten._scaled_dot_product_attention_math,
]  # fmt: skip

HEAD_DIM_REASON = "head_dim (attention scale and rotary embedding depend on it)"


@register_op(*_SDPA)
def sdpa_rule(a: DimAnalysis, node: torch.fx.Node) -> Any:
    """q [.., Hq, T, D] k [.., Hk, S, D] v [.., Hk, S, Dv]: heads join (GQA: Hq = Hk x rep)."""
    q, k, v = node.args[:3]
    qd, kd, vd = a.dims(q), a.dims(k), a.dims(v)
    hq, hk = a.shape(q)[-3], a.shape(k)[-3]
    batch = a.join_broadcast(qd[:-3], kd[:-3], vd[:-3])
    heads = qd[-3]
    if hq == hk:
        heads = a.join(a.join(qd[-3], kd[-3]), vd[-3])
    elif qd[-3] is not None and hk > 1 and hq % hk == 0:
        outer, rep = a.spaces.split_prod(qd[-3], (hk, hq // hk))
        a.spaces.pin(rep, "GQA: query heads per kv head stay uniform")
        a.join(outer, a.join(kd[-3], vd[-3]))
    else:
        a.pin_all([qd[-3], kd[-3], vd[-3]], "attention heads with incompatible counts")
    a.join(qd[-1], kd[-1])
    a.pin_all([qd[-1], vd[-1]], HEAD_DIM_REASON)
    s = a.join(kd[-2], vd[-2])
    mask = node.kwargs.get("attn_mask")
    if mask is None and node.target is aten.scaled_dot_product_attention.default and len(node.args) > 3:
        mask = node.args[3]
    if isinstance(mask, torch.fx.Node):
        a.join_broadcast(batch + [heads, qd[-2], s], a.dims(mask))
    out = batch + [heads, qd[-2], vd[-1]]
    val = node.meta.get("val")
    if isinstance(val, (tuple, list)):
        return [out] + [fresh_like(a, x, f"{node.name}.aux", "attention statistics") for x in val[1:]]
    return out


# ----------------------------------------------------------------------------- pooling
@register_op(
    aten.adaptive_avg_pool1d, aten.adaptive_avg_pool2d, aten._adaptive_avg_pool2d, aten.avg_pool1d,
    aten.avg_pool2d, aten.max_pool1d, aten.max_pool2d, aten.max_pool2d_with_indices,
    aten.adaptive_max_pool2d, aten.upsample_nearest2d, aten.upsample_bilinear2d,
)  # fmt: skip
def pool_rule(a: DimAnalysis, node: torch.fx.Node) -> Any:
    d = a.dims(node.args[0])
    val = node.meta.get("val")
    first = val[0] if isinstance(val, (tuple, list)) else val
    out_shape = tuple(int(s) for s in first.shape)
    nsp = len(out_shape) - 2 if len(out_shape) >= 3 else len(out_shape) - 1
    lead = d[: len(d) - nsp]
    out = lead + a.fresh(out_shape[len(lead) :], f"{node.name}.spatial", "spatial dimension")
    if isinstance(val, (tuple, list)):
        return [out, list(out)]
    return out


# ----------------------------------------------------------------------------- constants, no-ops
_CREATION = [
    aten.arange, aten.zeros, aten.ones, aten.full, aten.empty, aten.new_ones, aten.new_zeros,
    aten.new_full, aten.new_empty, aten.scalar_tensor, aten.rand, aten.randn, aten.randint,
    aten.eye, aten.empty_strided, aten.new_empty_strided,
]  # fmt: skip


@register_op(*_CREATION)
def creation_rule(a: DimAnalysis, node: torch.fx.Node) -> Any:
    return fresh_like(a, node.meta.get("val"), node.name, "constant tensor")


@register_op(
    aten.index, aten.index_select, aten.gather, aten.scatter, aten.scatter_add, aten.index_put,
    aten.diff, aten.embedding_dense_backward, aten.take_along_dim, aten.flip, aten.roll, aten.repeat,
    aten.repeat_interleave, aten.nonzero, aten.sort, aten.topk, aten.masked_select,
)  # fmt: skip
def indexing_rule(a: DimAnalysis, node: torch.fx.Node) -> Any:
    """Data-dependent or reordering index ops: pin what they read, fresh pinned outputs."""
    reason = f"indexed/reordered by {op_name(node.target)}"
    for arg in node.all_input_nodes:
        v = a.values.get(arg)
        if v and not isinstance(v[0], list):
            a.pin_all(v, reason)
    return fresh_like(a, node.meta.get("val"), node.name, reason)


@register_op(aten._assert_tensor_metadata, aten.sym_size, aten.sym_numel, aten.sym_stride, aten._assert_scalar)
def no_tensor_rule(a: DimAnalysis, node: torch.fx.Node) -> Dims:
    return []
