"""Pruning groups: the partition G of prunable variables into minimally removable structures.

A :class:`PruningGroup` is one channel space (an MLP intermediate, the kv-head families of one
attention layer, the residual width, a conv's output channels) with ``size`` structures. For each
parameter (or buffer) dimension that the space runs through, a :class:`Member` holds a
``[size, k]`` index table: row ``i`` lists the ``k`` flat indices along ``dim`` that structure ``i``
owns. Heads therefore expand to ``head_dim`` rows (k = head_dim, or head_dim * q_per_kv for the
query projection of a GQA family), plain channels have k = 1.

Roles follow LoRAShear §3.4: **primary** slices are those that must all be exactly zero for the
structure's activation to vanish (producer rows, bias, lora_B rows, BatchNorm affine); **secondary**
slices are removed together with them but need not be zero (consumer columns, lora_A columns,
RMSNorm weights, BatchNorm running statistics).

Example:
    >>> import torch
    >>> m = Member("fc1.weight", dim=0, role=Role.PRIMARY, positions=torch.arange(4).view(4, 1))
    >>> g = PruningGroup(id=0, name="fc1:out", members=(m,), size=4)
    >>> [s.indices for s in g.slices(2)]
    [(2,)]
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from shear.errors import GraphError

__all__ = ["Role", "Slice", "Member", "PruningGroup", "NormRescale", "GROUP_KINDS"]


class Role(enum.Enum):
    """Whether a slice must be zero for its structure to be removable (primary) or just follows."""

    PRIMARY = "primary"
    SECONDARY = "secondary"


@dataclass(frozen=True)
class Slice:
    """The flat ``indices`` along ``dim`` of the tensor ``param`` that belong to one structure."""

    param: str
    """Qualified name of a parameter or buffer, as in ``model.named_parameters()`` / ``named_buffers()``."""
    dim: int
    """Non-negative dimension of that tensor."""
    indices: tuple[int, ...]
    """Flat indices along ``dim``."""
    role: Role


@dataclass(frozen=True, eq=False)
class Member:
    """One tensor dimension a pruning group runs through, with the index table of its structures."""

    param: str
    """Qualified name of the parameter or buffer."""
    dim: int
    """Non-negative dimension of the tensor."""
    role: Role
    positions: torch.Tensor
    """Long tensor ``[size, k]``: row ``i`` holds the flat indices along ``dim`` of structure ``i``."""
    is_buffer: bool = False

    def __post_init__(self) -> None:
        if self.dim < 0:
            raise GraphError(f"Member {self.param}: dim must be non-negative, got {self.dim}")
        if self.positions.dim() != 2 or self.positions.dtype != torch.long:
            raise GraphError(f"Member {self.param}: positions must be a 2-D long tensor")

    @property
    def k(self) -> int:
        """Indices per structure along ``dim``."""
        return int(self.positions.shape[1])


@dataclass(frozen=True)
class NormRescale:
    """An RMS-style norm whose mean runs over this group's space: erasing channels rescales it.

    After removing channels so the width goes from ``d`` to ``d'``, the norm's weight is multiplied
    by ``sqrt(d / d')`` and its epsilon by ``d / d'``; the small model then equals the masked one
    exactly (the masked model's zero channels still counted in the mean).
    """

    module: str
    """Qualified module name of the norm."""
    width: int
    """The full width ``d`` the norm averages over in the unpruned model."""


GROUP_KINDS: tuple[str, ...] = ("channel", "head", "residual", "block", "expert")
"""The kinds a :class:`PruningGroup` has (its ``kind``); passes take some of them as ``kinds=[...]``."""


@dataclass(frozen=True, eq=False)
class PruningGroup:
    """A channel space with ``size`` minimally removable structures, and what each one owns."""

    id: int
    name: str
    """Stable, human-readable name, e.g. ``model.layers.0.mlp/intermediate``."""
    members: tuple[Member, ...]
    size: int
    """Number of structures (channels, heads, kv-head families)."""
    kind: str = "channel"
    """One of :data:`GROUP_KINDS`: ``channel``, ``head`` (a kv-head family / attention head), or ``residual``."""
    prunable: bool = True
    reasons: tuple[str, ...] = ()
    """Why the group is not prunable (empty when it is)."""
    node_group: int = -1
    """Id of the basic node group whose space this is."""
    norms: tuple[NormRescale, ...] = ()
    """RMS-style norms over this space that erasure must rescale."""
    modules: tuple[str, ...] = field(default=())
    """Modules that own members of this group (producers first), for reports and drawings."""
    min_keep: int = 1
    """Structures that must stay (an MoE router's top-k for ``expert`` groups): selections keep them,
    erasure refuses a model that keeps fewer."""

    def __post_init__(self) -> None:
        if self.size <= 0:
            raise GraphError(f"PruningGroup {self.name}: size must be positive, got {self.size}")
        for m in self.members:
            if m.positions.shape[0] != self.size:
                raise GraphError(
                    f"PruningGroup {self.name}: member {m.param}[dim {m.dim}] has "
                    f"{m.positions.shape[0]} rows, expected {self.size}"
                )
        if self.prunable and not any(m.role is Role.PRIMARY for m in self.members):
            raise GraphError(f"PruningGroup {self.name}: a prunable group needs a primary member")

    @property
    def primary(self) -> tuple[Member, ...]:
        return tuple(m for m in self.members if m.role is Role.PRIMARY)

    @property
    def secondary(self) -> tuple[Member, ...]:
        return tuple(m for m in self.members if m.role is Role.SECONDARY)

    def slices(self, i: int) -> Iterator[Slice]:
        """The slices structure ``i`` owns, primary first."""
        if not 0 <= i < self.size:
            raise GraphError(f"structure {i} out of range for group {self.name} of size {self.size}")
        for m in sorted(self.members, key=lambda m: m.role is not Role.PRIMARY):
            yield Slice(m.param, m.dim, tuple(int(x) for x in m.positions[i]), m.role)

    def structure_numel(self, shapes: dict[str, tuple[int, ...]]) -> int:
        """Parameters one structure owns, given the full shapes of the tensors (params only).

        Elements shared by two members of the same tensor (a weight that is both producer and
        consumer of the space, e.g. a depthwise conv) are counted once per member; such overlaps
        are rare and reported by the erase pass's exact count.
        """
        total = 0
        for m in self.members:
            if m.is_buffer:
                continue
            shape = shapes[m.param]
            other = 1
            for d, s in enumerate(shape):
                if d != m.dim:
                    other *= s
            total += m.k * other
        return total
