"""The dimension analysis that op rules drive: which space each tensor dimension belongs to.

:class:`DimAnalysis` walks an exported FX graph once, in topological order, and asks the op
registry (:mod:`shear.graph.ops`) for a rule per node. A rule reads the spaces of its inputs via
:meth:`DimAnalysis.dims`, joins/refines them through the :class:`~shear.graph.spaces.SpaceTable`,
records parameter roles (primary / secondary), and returns the spaces of its outputs. Ops without
a rule pin every space they touch and leave a diagnostic naming the op and its module.

Example:
    >>> # rules see an analysis object like this one (built by shear.graph.trace):
    >>> # def rule(a: DimAnalysis, node): a.join(a.dims(node.args[0]), a.dims(node.args[1])) ...
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from shear.errors import GraphError
from shear.graph.groups import Role
from shear.graph.ops.specs import is_alias_op
from shear.graph.spaces import SpaceTable

__all__ = ["Dims", "DimAnalysis", "StateRef", "Diagnostic"]

_aten = torch.ops.aten

Dims = list[int | None]
"""Spaces of a tensor's dimensions; ``None`` for size-1 (broadcast) dimensions."""


@dataclass(frozen=True)
class StateRef:
    """A parameter or buffer of the model, as it appears as a graph placeholder."""

    name: str
    is_buffer: bool
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Diagnostic:
    """Something the analysis could not understand and therefore pinned."""

    kind: str
    """``unknown-op``, ``pinned``, ``conflict``, ..."""
    op: str
    module: str
    message: str


@dataclass
class DimAnalysis:
    """State of one dimension analysis over an exported graph."""

    spaces: SpaceTable = field(default_factory=SpaceTable)
    values: dict[torch.fx.Node, Any] = field(default_factory=dict)
    """Spaces of each node's value: ``Dims`` for a tensor, a list of ``Dims`` for a tuple output."""
    state: dict[torch.fx.Node, StateRef] = field(default_factory=dict)
    """Placeholders that are parameters or buffers."""
    aliases: dict[torch.fx.Node, tuple[StateRef, tuple[int, ...]]] = field(default_factory=dict)
    """Nodes that are a parameter or buffer under an elementwise recast (``w.float()``, Gemma's
    ``1 + w``) or a transpose (Falcon's ``x @ w.T``), with the tensor dimension behind each of the
    node's dimensions. A role given to such a node is the tensor's role."""
    state_dims: dict[tuple[str, int], int] = field(default_factory=dict)
    """(tensor name, dim) -> space."""
    roles: dict[tuple[str, int], Role] = field(default_factory=dict)
    reductions: list[tuple[int, str, str]] = field(default_factory=list)
    """(space, module, op) for each mean over a channel space (needs a rescale rule or a pin)."""
    diagnostics: list[Diagnostic] = field(default_factory=list)
    node_spaces: dict[torch.fx.Node, set[int]] = field(default_factory=dict)
    """Spaces each call node touches (for node groups and drawings)."""
    current: torch.fx.Node | None = None
    zero_scope: str | None = None
    """Set while analysing ops inside a module known to map 0 to 0 (e.g. a tanh-GELU)."""

    # ---------------------------------------------------------------- reading
    def dims(self, arg: Any) -> Dims:
        """Spaces of a tensor argument (a node), or [] for a Python scalar / None."""
        if isinstance(arg, torch.fx.Node):
            v = self.values.get(arg)
            if v is None:
                return []
            if v and isinstance(v[0], list):
                raise GraphError(f"node {arg.name} is a tuple; use getitem")
            return list(v)
        return []

    @staticmethod
    def shape(arg: Any) -> tuple[int, ...]:
        if isinstance(arg, torch.fx.Node):
            val = arg.meta.get("val")
            if isinstance(val, torch.Tensor):
                return tuple(int(s) for s in val.shape)
        return ()

    def out_shape(self, node: torch.fx.Node) -> tuple[int, ...]:
        return self.shape(node)

    def module_of(self, node: torch.fx.Node | None = None) -> str:
        node = node if node is not None else self.current
        if node is None:
            return ""
        stack = node.meta.get("nn_module_stack") or {}
        if not stack:
            return ""
        return str(list(stack.values())[-1][0])

    def state_of(self, arg: Any) -> StateRef | None:
        """The parameter or buffer ``arg`` is (directly or through :attr:`aliases`), or None."""
        if not isinstance(arg, torch.fx.Node):
            return None
        ref = self.state.get(arg)
        if ref is not None:
            return ref
        alias = self.aliases.get(arg)
        return alias[0] if alias is not None else None

    def _state_dim(self, arg: torch.fx.Node, dim: int) -> int:
        alias = self.aliases.get(arg)
        return dim if alias is None else alias[1][dim]

    def alias_state(self, node: torch.fx.Node) -> None:
        """Record ``node`` as an alias of its input's tensor: one tensor argument that is a
        parameter/buffer (or an alias) and an op registered with ``alias=True`` (:func:`is_alias_op`)
        that keeps the shape, or a transpose/permute of it."""
        packet = getattr(node.target, "overloadpacket", None)
        tensors = [x for x in node.args if isinstance(x, torch.fx.Node)]
        src = node.args[0] if node.args else None
        if len(tensors) != 1 or tensors[0] is not src or self.state_of(src) is None:
            return
        assert isinstance(src, torch.fx.Node)
        rank = len(self.shape(src))
        order = list(range(rank))
        if is_alias_op(node.target) and self.shape(node) == self.shape(src):
            pass
        elif packet in (_aten.t, _aten.numpy_T) and rank == 2:
            order = [1, 0]
        elif packet is _aten.transpose and rank:
            i, j = (int(d) % rank for d in node.args[1:3])  # type: ignore[call-overload]
            order[i], order[j] = order[j], order[i]
        elif packet is _aten.permute and rank:
            order = [int(d) % rank for d in node.args[1]]  # type: ignore[union-attr, call-overload]
        else:
            return
        ref = self.state_of(src)
        assert ref is not None
        self.aliases[node] = (ref, tuple(self._state_dim(src, d) for d in order))

    # ---------------------------------------------------------------- writing
    def fresh(self, shape: Sequence[int], label: str, pin: str | None = None) -> Dims:
        """New spaces for a tensor of ``shape`` (size-1, empty and data-dependent (-1) dims get ``None``)."""
        out: Dims = []
        for i, s in enumerate(shape):
            if s <= 1:
                out.append(None)
                continue
            sp = self.spaces.new(s, f"{label}[{i}]")
            if pin:
                self.spaces.pin(sp, pin)
            out.append(sp)
        return out

    def join(self, a: int | None, b: int | None) -> int | None:
        """Join two spaces (size-1 ``None`` joins nothing). Returns the survivor."""
        if a is None:
            return b
        if b is None:
            return a
        if self.spaces.size(a) != self.spaces.size(b):
            self.pin_all([a, b], "joined dimensions of different sizes")
            return a
        return self.spaces.union(a, b)

    def join_broadcast(self, *operands: Dims) -> Dims:
        """Align dims from the right (numpy broadcasting) and join them; returns the result dims."""
        rank = max((len(d) for d in operands), default=0)
        out: Dims = [None] * rank
        for d in operands:
            off = rank - len(d)
            for i, sp in enumerate(d):
                out[off + i] = self.join(out[off + i], sp)
        return out

    def pin_all(self, dims: Sequence[int | None], reason: str) -> None:
        for sp in dims:
            if sp is not None:
                self.spaces.pin(sp, reason)

    def pin_nonzero(self, dims: Sequence[int | None], reason: str) -> None:
        """Pin spaces because an op maps 0 to a non-zero value, unless the op sits inside a module
        registered as zero-preserving as a whole (``0.5 * x * (1 + tanh(...))`` is 0 at x = 0)."""
        if self.zero_scope is None:
            self.pin_all(dims, reason)

    def role(self, arg: Any, dim: int, role: Role) -> None:
        """Record the role of dimension ``dim`` of a parameter/buffer argument (primary wins)."""
        ref = self.state_of(arg)
        if ref is None:
            return
        dim = self._state_dim(arg, dim % max(len(ref.shape), 1))
        key = (ref.name, dim)
        if self.roles.get(key) is not Role.PRIMARY:
            self.roles[key] = role

    def diagnose(self, kind: str, message: str) -> None:
        node = self.current
        op = str(node.target) if node is not None else ""
        self.diagnostics.append(Diagnostic(kind, op, self.module_of(), message))
