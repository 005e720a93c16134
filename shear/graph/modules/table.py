"""One table of what shear knows about each module type: its attribute rule, whether it preserves
zeros, and how it is rescaled as an RMS norm.

Every fact about a module type (or a family recognised by a predicate on the module) is one
:class:`ModuleSpec` in :data:`MODULE_SPECS`, written by :func:`register_module` and read through
:func:`lookup_module`:

- ``attributes``: after erasure, rewrite the module's size attributes from its sliced tensors
  (``nn.Linear.in_features``, an attention's head counts), read by
  :func:`shear.codegen.module_rules.update_module_attributes`;
- ``zero_preserving``: the module as a whole maps a zeroed channel to zero although its inner ops do
  not (a tanh-GELU), read by :func:`shear.graph.modules.composites.is_zero_preserving_module`;
- ``rms_norm``: the module computes ``x * rsqrt(mean(x^2) + eps) * (w + offset)`` written as the
  :class:`~shear.graph.modules.rms_norm_spec.RmsNormSpec` says; the analysis accepts a mean over a pruned
  width inside it and erasure rescales it (:func:`shear.graph.modules.norms.find_rms_norm`).

Lookup, facet by facet: the module's type and its bases along the MRO (most specific first), then
the predicates, newest first. A registration sets only the facets it names, so a type's facets can
be given in one call or added later. The old registration functions
(``register_module_rule``, ``register_structural_rule``, ``register_zero_preserving_module``,
``register_rms_norm``, ``register_norm_rescale``) are thin wrappers over :func:`register_module`.

Example:
    >>> import torch
    >>> from torch import nn
    >>> class MyNorm(nn.Module):
    ...     def __init__(self, d: int = 4) -> None:
    ...         super().__init__()
    ...         self.weight, self.eps = nn.Parameter(torch.ones(d)), 1e-6
    ...         self.width = d
    ...     def forward(self, x: torch.Tensor) -> torch.Tensor:
    ...         return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight
    >>> def my_norm_attributes(m: nn.Module) -> None:
    ...     m.width = int(m.weight.shape[0])
    >>> register_module(MyNorm, attributes=my_norm_attributes, rms_norm=RmsNormSpec("eps"))
    >>> lookup_module(MyNorm(), "attributes") is my_norm_attributes, lookup_module(MyNorm(), "rms_norm")
    (True, RmsNormSpec(eps_attr='eps', weight_offset=0.0))
    >>> del MODULE_SPECS[MyNorm]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from shear.errors import GraphError
from shear.graph.modules.rms_norm_spec import RmsNormSpec

__all__ = [
    "ModuleRule",
    "ModulePredicate",
    "ModuleSpec",
    "MODULE_SPECS",
    "register_module",
    "lookup_module",
    "PredicateView",
    "types_only",
    "RmsNormSpec",
]

ModuleRule = Callable[[nn.Module], None]
"""Rewrites a module's size attributes from its current tensors, in place."""

ModulePredicate = Callable[[nn.Module], bool]
"""Recognises a family of modules by structure (any transformers attention with ``head_dim``...)."""


@dataclass(frozen=True)
class ModuleSpec:
    """Everything shear knows about one module type or family; ``None`` means "not said"."""

    attributes: ModuleRule | None = None
    """Rewrites the module's size attributes after erasure (children are updated first)."""
    zero_preserving: bool | None = None
    """The module as a whole maps a zeroed channel to zero (f(0) = 0, elementwise)."""
    rms_norm: RmsNormSpec | None = None
    """The module is an RMS norm written as this spec says (erasure rescales it)."""
    experts: Any = None
    """The module holds fused MoE experts (a :class:`shear.graph.modules.experts.ExpertSpec`)."""
    router: Any = None
    """The module is an MoE top-k router (a :class:`shear.graph.modules.experts.RouterSpec`)."""


MODULE_SPECS: dict[type | ModulePredicate, ModuleSpec] = {}
"""Module type or predicate -> its spec, in registration order. Write it with :func:`register_module`."""


def register_module(
    type_or_predicate: type | ModulePredicate,
    *,
    attributes: ModuleRule | None = None,
    zero_preserving: bool | None = None,
    rms_norm: RmsNormSpec | None = None,
    experts: Any = None,
    router: Any = None,
) -> None:
    """Register facets of a module type (and its subclasses) or of the modules a predicate accepts;
    the facets given now are set, the others are kept. A predicate registered (again) becomes the
    newest, which is tried first.

    Example:
        >>> from torch import nn
        >>> register_module(lambda m: type(m).__name__ == "Swish", zero_preserving=True)
    """
    if not callable(type_or_predicate):
        raise GraphError(f"register_module takes a module type or a predicate, not {type_or_predicate!r}")
    given = {"attributes": attributes, "zero_preserving": zero_preserving, "rms_norm": rms_norm,
             "experts": experts, "router": router}
    old = MODULE_SPECS.pop(type_or_predicate, ModuleSpec())
    MODULE_SPECS[type_or_predicate] = replace(old, **{k: v for k, v in given.items() if v is not None})


def _predicates_newest_first() -> list[tuple[ModulePredicate, ModuleSpec]]:
    return [(k, s) for k, s in reversed(list(MODULE_SPECS.items())) if not isinstance(k, type)]


def lookup_module(module: nn.Module, facet: str) -> Any:
    """One facet of ``module``: its type's or nearest registered base's, else that of the newest
    predicate that accepts it (predicates are only asked when they set the facet); None if none.

    Example:
        >>> from torch import nn
        >>> lookup_module(nn.Identity(), "attributes") is None     # no size attributes to rewrite
        True
    """
    for klass in type(module).__mro__:
        spec = MODULE_SPECS.get(klass)
        value = None if spec is None else getattr(spec, facet)
        if value is not None:
            return value
    for predicate, spec in _predicates_newest_first():
        value = getattr(spec, facet)
        if value is not None and predicate(module):
            return value
    return None


class PredicateView(Sequence[Any]):
    """Read-only, live view of the predicates that set ``facet``, newest first: each predicate, or
    ``(predicate, facet value)`` with ``pairs=True`` (what the old per-facet lists held)."""

    def __init__(self, facet: str, pairs: bool = False) -> None:
        self._facet, self._pairs = facet, pairs

    def _items(self) -> list[Any]:
        out: list[Any] = []
        for predicate, spec in _predicates_newest_first():
            value = getattr(spec, self._facet)
            if value is not None:
                out.append((predicate, value) if self._pairs else predicate)
        return out

    def __getitem__(self, index: Any) -> Any:
        return self._items()[index]

    def __len__(self) -> int:
        return len(self._items())

    def __repr__(self) -> str:
        return f"PredicateView({self._facet}: {len(self)} predicates)"


def types_only(key: Any) -> bool:
    """A key of :data:`MODULE_SPECS` that is a module type (not a predicate)."""
    return isinstance(key, type)

