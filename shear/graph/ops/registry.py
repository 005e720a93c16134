"""The op registry: how each aten op moves tensor dimensions between channel spaces.

Rules are plain functions ``rule(a: DimAnalysis, node: torch.fx.Node) -> Dims | list[Dims]``, the
``channel`` facet of the op's entry in the one table of per-op facts (:mod:`shear.graph.ops.specs`,
whose :func:`register_op` and :func:`lookup_rule` are re-exported here), keyed by the op (an
``OpOverload``, its ``OpOverloadPacket`` for all overloads, or a Python callable such as
``operator.getitem``). Lookup tries the exact overload first, then the packet. An op with no rule
pins every space it touches (:func:`unknown_rule`).

Teach shear a new op with the decorator (``alias=`` and ``size=`` add the op's other facets):

Example:
    >>> import torch
    >>> @register_op(torch.ops.aten.special_entr)          # doctest: +SKIP
    ... def entr(a, node):
    ...     return a.dims(node.args[0])                      # elementwise: same spaces
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx

from shear.graph.analysis import DimAnalysis
from shear.graph.ops.specs import Rule, lookup_rule, register_op

__all__ = ["Rule", "register_op", "lookup_rule", "unknown_rule", "op_name", "fresh_like", "norm_dim", "traced_size"]


def op_name(target: Any) -> str:
    """A stable, readable name for an op target (``aten.linear.default``, ``getitem``)."""
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    if isinstance(target, torch._ops.HigherOrderOperator):
        return f"higher_order.{target.name()}"
    return getattr(target, "__name__", str(target))


def unknown_rule(a: DimAnalysis, node: torch.fx.Node) -> Any:
    """Pin every space the op touches and say so: unknown is unprunable, never guessed."""
    name = op_name(node.target)
    touched = 0
    for arg in node.all_input_nodes:
        for sp in a.dims(arg) if not _is_tuple(a, arg) else []:
            if sp is not None:
                a.spaces.pin(sp, f"unknown op {name}")
                touched += 1
    a.diagnose(
        "unknown-op",
        f"op {name} has no channel rule; pinned {touched} input space(s). "
        f"Teach shear with @shear.graph.register_op({name.rsplit('.', 1)[0]}) if it is prunable",
    )
    return fresh_like(a, node.meta.get("val"), f"{node.name}", f"unknown op {name}")


def _is_tuple(a: DimAnalysis, arg: torch.fx.Node) -> bool:
    v = a.values.get(arg)
    return bool(v) and isinstance(v[0], list)


def fresh_like(a: DimAnalysis, val: Any, label: str, pin: str | None) -> Any:
    """Fresh spaces shaped like a node's meta value (a tensor, or a tuple/list of them)."""
    if isinstance(val, torch.Tensor):
        return a.fresh(tuple(traced_size(s) for s in val.shape), label, pin)
    if isinstance(val, (list, tuple)):
        return [fresh_like(a, v, f"{label}.{i}", pin) or [] for i, v in enumerate(val)]
    return []


def traced_size(size: Any) -> int:
    """A traced size as an int; -1 for a data-dependent one (the tokens routed to an MoE expert): it
    has no value to read, and a size that depends on the data is never a channel (no space).

    >>> traced_size(torch.Size([3, 4])[1])
    4
    """
    node = getattr(size, "node", None)
    if node is not None and not node.has_hint():
        return -1
    return int(size)


def norm_dim(dim: int, rank: int) -> int:
    """A dimension index made non-negative (graphs carry -1 for the last dim)."""
    return dim % rank if rank else 0
