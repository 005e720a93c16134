"""One table of what shear knows about each op: its channel rule, whether it aliases, its size rule.

Every fact about an aten op (an ``OpOverload``, its ``OpOverloadPacket`` for all overloads, or a
Python callable such as ``operator.getitem``) is one :class:`OpSpec` in :data:`OP_SPECS`, written by
:func:`register_op` and read by the consumers through the lookups here:

- ``channel``: how the op moves tensor dimensions between channel spaces
  (``rule(a: DimAnalysis, node) -> Dims | list[Dims]``), read by the dimension analysis
  (:func:`lookup_rule`);
- ``alias``: applied to one parameter and scalars, keeping its shape, the op gives "the same tensor"
  for role purposes (``.to``, ``clone``, ``w * 2``), read by :meth:`DimAnalysis.alias_state`
  (:func:`is_alias_op`);
- ``size``: how the op's size constants are rewritten after erasure
  (``rule(live: LiveDims, node) -> None``, edits the node in place), read by GraphModule codegen
  (:func:`lookup_size_rule`).

Lookup tries the exact overload first, then its packet, facet by facet. A registration sets only
the facets it names, so an op's facets can be given in one call or added later.

Example:
    >>> import torch
    >>> aten = torch.ops.aten
    >>> def entr_sizes(live, node) -> None:            # no size constants to rewrite
    ...     return None
    >>> @register_op(aten.special_entr, size=entr_sizes)
    ... def entr(a, node):
    ...     return a.dims(node.args[0])                  # elementwise: same spaces
    >>> spec = OP_SPECS[aten.special_entr]
    >>> spec.channel is entr, spec.size is entr_sizes, spec.alias
    (True, True, None)
    >>> lookup_rule(aten.special_entr.default) is entr  # an overload finds its packet's facets
    True
    >>> del OP_SPECS[aten.special_entr]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.fx

__all__ = [
    "Rule",
    "SizeRule",
    "OpSpec",
    "OP_SPECS",
    "register_op",
    "lookup_op",
    "lookup_rule",
    "lookup_size_rule",
    "is_alias_op",
    "alias_ops",
]

Rule = Callable[[Any, torch.fx.Node], Any]
"""A channel rule ``rule(a, node)``: the spaces of the op's output(s) from those of its inputs, read from
``a``, the :class:`~shear.graph.analysis.DimAnalysis` (typed ``Any`` here: the table sits below the
analysis that reads it)."""

SizeRule = Callable[[Any, torch.fx.Node], None]
"""``rule(live, node)`` rewrites the size constants of one graph node in place, from the surviving
positions in ``live``, a :class:`~shear.graph.live_dims.LiveDims`."""


@dataclass(frozen=True)
class OpSpec:
    """Everything shear knows about one op; ``None`` means "not said" (lookup falls back to the packet)."""

    channel: Rule | None = None
    """How the op moves dimensions between channel spaces; without one, the op pins what it touches."""
    alias: bool | None = None
    """The op, on one parameter and scalars with the shape kept, gives the same tensor for role purposes."""
    size: SizeRule | None = None
    """Rewrites the op's size constants after erasure (GraphModule codegen)."""


OP_SPECS: dict[Any, OpSpec] = {}
"""Op (overload, packet or Python callable) -> its spec. Write it with :func:`register_op`."""


def _set(targets: tuple[Any, ...], **facets: Any) -> None:
    for t in targets:
        OP_SPECS[t] = replace(OP_SPECS.get(t, OpSpec()), **facets)


def register_op(
    target: Any,
    *more_targets: Any,
    channel: Rule | None = None,
    alias: bool | None = None,
    size: SizeRule | None = None,
) -> Callable[[Rule], Rule]:
    """Register facets of each of ``target, *more_targets``; the facets given now are set, the
    others are kept.

    Returns a decorator that registers the function it decorates as the channel rule, so
    ``@register_op(aten.mean, size=mean_sizes)`` above a channel rule registers both facets, and
    a plain call (``register_op(aten.clone, alias=True)``) sets facets without a channel rule.
    """
    targets = (target, *more_targets)
    given = {"channel": channel, "alias": alias, "size": size}
    _set(targets, **{k: v for k, v in given.items() if v is not None})

    def deco(rule: Rule) -> Rule:
        _set(targets, channel=rule)
        return rule

    return deco


def lookup_op(target: Any, facet: str) -> Any:
    """One facet of ``target``'s spec: the exact key's if set, else its packet's; None if neither."""
    keys = [target]
    if isinstance(target, torch._ops.OpOverload):
        keys.append(target.overloadpacket)
    for key in keys:
        spec = OP_SPECS.get(key)
        value = None if spec is None else getattr(spec, facet)
        if value is not None:
            return value
    return None


def lookup_rule(target: Any) -> Rule | None:
    """The channel rule of ``target`` (an overload finds its packet's), or None."""
    rule: Rule | None = lookup_op(target, "channel")
    return rule


def lookup_size_rule(target: Any) -> SizeRule | None:
    """The size rule of ``target`` (an overload finds its packet's), or None."""
    rule: SizeRule | None = lookup_op(target, "size")
    return rule


def is_alias_op(target: Any) -> bool:
    """Whether ``target`` is registered as aliasing its one tensor input when the shape is kept."""
    return bool(lookup_op(target, "alias"))


def alias_ops() -> set[Any]:
    """The ops registered with ``alias=True`` (keys of :data:`OP_SPECS`)."""
    return {op for op, spec in OP_SPECS.items() if spec.alias}
