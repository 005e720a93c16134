"""The pass protocol: a pass is a frozen dataclass with a kebab-case name and typed options.

A pass reads and writes a :class:`Context` and returns a :class:`PassResult` saying what changed
and whether the traced graph still describes the model. Passes register by name so that a
pipeline can be written as a string, ``"random{ratio=0.3,seed=0}"``.

The context holds the model, the dense teacher (``ctx.dense``), the options of the run
(``ctx.options``) as fields, and the analyses the passes computed, keyed by their result type:
``ctx.get(Graph)`` (also ``ctx.graph``), ``ctx.get(KnowledgeDistribution)``, ... A pass names the
keys it needs in ``requires`` and the keys it stores in ``ensures``; the pass manager checks both,
runs a missing prerequisite's provider first, and runs discovery again when a pass reports that
it did not preserve the graph. A result without a type of its own (a plain dict) is keyed by a
kebab-case string. No pass runs another pass.

Example:
    >>> import torch
    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class ParamCount:
    ...     n: int
    >>> @register_pass
    ... @dataclass(frozen=True)
    ... class CountParams(Pass):
    ...     name = "count-params-example"
    ...     ensures = (ParamCount,)
    ...     def run(self, ctx: Context) -> PassResult:
    ...         n = sum(p.numel() for p in ctx.model.parameters())
    ...         ctx.put(ParamCount(n))
    ...         return PassResult(changed=False, message=f"{n} parameters")
    >>> ctx = Context(model=torch.nn.Linear(2, 2))
    >>> CountParams().run(ctx).message, ctx.get(ParamCount).n
    ('6 parameters', 6)
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from shear.errors import PipelineError
from shear.passes.context import Context, Options
from shear.passes.keys import (
    _KEBAB,
    DENSE,
    Key,
    OneOf,
    canonical_key,
    ensures_key,
    key_name,
    missing_error,
    register_analysis,
)

__all__ = [
    "Pass",
    "PassResult",
    "Context",
    "Options",
    "OneOf",
    "Key",
    "DENSE",
    "PASS_REGISTRY",
    "register_pass",
    "register_analysis",
    "set_option_check",
    "key_name",
    "canonical_key",
    "ensures_key",
    "missing_error",
    "pruned_kinds",
]

@dataclass
class PassResult:
    """What a pass did: whether it changed weights/masks/IR, a one-line message, and statistics.

    ``preserves_graph`` is False when the pass changed the model's structure (wrapped it in LoRA,
    erased structures): ``ctx.graph`` no longer describes the model, so the pass manager retires it
    and runs discovery again before the next pass that requires the graph.
    """

    changed: bool
    message: str = ""
    stats: dict[str, Any] = field(default_factory=dict)
    preserves_graph: bool = True




_OPTION_CHECK: list[Callable[[Pass], None]] = []
"""The check every pass's options get when the pass is built: :mod:`shear.passes.options` installs
:func:`~shear.passes.options.check_fields` here when imported (see :func:`set_option_check`), so this
module, below the options machinery, never imports it."""


def set_option_check(check: Callable[[Pass], None]) -> None:
    """Install the function that checks a pass's options against their annotations when it is built."""
    _OPTION_CHECK[:] = [check]


def _check_options(p: Pass) -> None:
    for check in _OPTION_CHECK:
        check(p)


class Pass:
    """Base of every pass. Subclasses are frozen dataclasses with options as typed fields.

    Every pass checks its options against their annotations when it is built, before its own
    ``__post_init__`` runs: ``Magnitude(round_to="8")`` from Python is a :class:`PipelineError` naming
    the option, as ``magnitude{round_to=x}`` in a pipeline string is.
    """

    name: ClassVar[str]
    requires: ClassVar[tuple[Key | OneOf, ...]] = ()
    """Keys (result types, names, :data:`DENSE`, :class:`OneOf`) that must be in the context before
    the pass runs; the pass manager provides missing ones or says which pass would."""
    ensures: ClassVar[tuple[Key, ...]] = ()
    """Keys the pass stores in the context (the pass manager checks it did)."""
    reads_weights: ClassVar[bool] = True
    """False for passes that only read the graph (they run on a meta-device skeleton too)."""
    restructures: ClassVar[bool] = False
    """True for passes that may change the model's structure (``lora``, ``erase``); their
    :class:`PassResult` says whether they did, and the pass manager plans a new discovery after them."""
    prunes: ClassVar[bool] = False
    """True for passes that choose structures to remove (their ``kinds`` option, all kinds without
    one): a serving target that holds only some kinds (``nas``: MLP widths and whole blocks) is
    checked against them before the run."""
    auto_insert: ClassVar[bool] = True
    """Whether the pass manager may run this pass by itself to provide a missing prerequisite
    (``keep-dense`` may not: a copy taken late in a pipeline is not the dense model)."""

    def __post_init__(self) -> None:
        _check_options(self)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A subclass's own ``__post_init__`` runs after the option check (it need not call ``super()``)."""
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("__post_init__")
        if own is None or getattr(own, "_after_option_check", False):
            return

        @functools.wraps(own)
        def __post_init__(self: Pass) -> None:
            _check_options(self)
            own(self)

        __post_init__._after_option_check = True  # type: ignore[attr-defined]
        cls.__post_init__ = __post_init__  # type: ignore[method-assign]

    def provider(self, key: Key) -> Pass | None:
        """The pass that should provide the missing prerequisite ``key`` for this one, with options
        chosen from this pass's own (``lhspg{lora_r=16}`` asks for ``lora{r=16}``); ``None``: the
        pass manager picks a registered provider with default options."""
        return None

    def run(self, ctx: Context) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, ctx: Context) -> PassResult:
        return self.run(ctx)


PASS_REGISTRY: dict[str, type[Pass]] = {}
"""Registered pass classes by kebab-case name."""

P = TypeVar("P", bound=type[Pass])


def register_pass(cls: P) -> P:
    """Class decorator: register a pass under its ``name`` (kebab-case, unique)."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not _KEBAB.match(name):
        raise PipelineError(f"pass {cls.__qualname__} needs a kebab-case `name`, got {name!r}")
    existing = PASS_REGISTRY.get(name)
    if existing is not None and existing is not cls and existing.__qualname__ != cls.__qualname__:
        raise PipelineError(f"pass name {name!r} is already registered by {existing.__qualname__}")
    PASS_REGISTRY[name] = cls
    return cls


def pruned_kinds(passes: Sequence[Pass]) -> tuple[str, ...]:
    """The group kinds ``passes`` may remove: the ``kinds`` of every pass that :attr:`~Pass.prunes`
    (every kind for one without a ``kinds`` option).

    Example:
        >>> from shear.passes import lookup_pass
        >>> pruned_kinds([lookup_pass("lhspg")(ratio=0.2), lookup_pass("erase")()])
        ('channel',)
    """
    from shear.graph.groups import GROUP_KINDS

    kinds: set[str] = set()
    for p in passes:
        if p.prunes:
            kinds.update(getattr(p, "kinds", None) or GROUP_KINDS)
    return tuple(k for k in GROUP_KINDS if k in kinds)
