"""What analyses are stored under in a :class:`~shear.passes.context.Context`: their result type, or a
kebab-case name; and :class:`OneOf`, a requirement that any of several keys meets.

Example:
    >>> from shear.graph.ir import Graph
    >>> canonical_key("graph") is Graph, key_name(Graph)
    (True, 'graph')
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, overload

from shear.errors import PipelineError
from shear.graph.ir import Graph
from shear.kernels.sparsity import WeightMasks

__all__ = [
    "Key", "DENSE", "OneOf", "register_analysis", "key_name", "canonical_key", "ensures_key", "missing_error",
    "DeclaresEnsures", "set_pass_source",
]  # fmt: skip


class DeclaresEnsures(Protocol):
    """What this module reads of a pass (an instance or a class): its name and the keys it ensures."""

    name: str
    ensures: Any


_PASS_SOURCE: list[Callable[[], Iterable[DeclaresEnsures]]] = []
"""Where the registered passes come from: :mod:`shear.passes.registry` installs its lookup here when
imported (see :func:`set_pass_source`), so this module, below the passes, never imports them."""


def set_pass_source(source: Callable[[], Iterable[DeclaresEnsures]]) -> None:
    """Install the function that lists the registered passes (loading the built-in ones on first call)."""
    _PASS_SOURCE[:] = [source]


def _registered() -> list[DeclaresEnsures]:
    return [p for source in _PASS_SOURCE for p in source()]



_KEBAB = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")

Key = type | str
"""What an analysis is stored under: its result type, or a kebab-case name for an untyped result."""

DENSE = "dense-model"
"""The key that names ``ctx.dense`` in ``requires``/``ensures`` (``keep-dense`` ensures it)."""

T = TypeVar("T")

_ANALYSIS_NAMES: dict[str, type] = {}
_TYPE_NAMES: dict[type, str] = {}


def register_analysis(name: str, cls: type) -> type:
    """Name a result type: how messages print it and which ``ctx.results[name]`` it answers.

    Example:
        >>> register_analysis("graph", Graph) is Graph and key_name(Graph)
        'graph'
    """
    if not _KEBAB.match(name):
        raise PipelineError(f"analysis name {name!r} of {cls.__qualname__} must be kebab-case")
    old = _ANALYSIS_NAMES.get(name)
    if old is not None and old is not cls and old.__qualname__ != cls.__qualname__:
        raise PipelineError(f"analysis name {name!r} is already the name of {old.__qualname__}")
    _ANALYSIS_NAMES[name] = cls
    _TYPE_NAMES[cls] = name
    return cls


register_analysis("graph", Graph)
register_analysis("masks", WeightMasks)


def key_name(key: Key | OneOf) -> str:
    """How a key prints: its registered name, a string key itself, else the type's name."""
    if isinstance(key, OneOf):
        return " or ".join(key_name(k) for k in key.keys)
    if isinstance(key, str):
        return key
    return _TYPE_NAMES.get(key, key.__name__)


_HINTS: dict[Key, str] = {
    DENSE: "shear.compile stores the caller's model there unless inplace=True",
}


def missing_error(key: Key | OneOf, needed_by: str | None = None) -> PipelineError:
    """The standard missing-prerequisite error: what is missing, and which passes would provide it.

    Example:
        >>> str(missing_error("unicorn", "horse-pass"))
        "pass 'horse-pass' requires result 'unicorn', and no registered pass ensures it. Store it with ctx.put(value, 'unicorn') before running it"
    """
    first = canonical_key(key.keys[0] if isinstance(key, OneOf) else key)
    providers = [cls.name for cls in _registered() if ensures_key(cls, first)]
    hint = _HINTS.get(first)
    what = f"pass {needed_by!r} requires result {key_name(key)!r}" if needed_by else f"the context holds no {key_name(key)!r}"
    what += f" ({hint})" if hint else ""
    if not providers:
        store = f"ctx.put(value, {first!r})" if isinstance(first, str) else f"ctx.put({first.__name__}(...))"
        return PipelineError(f"{what}, and no registered pass ensures it. Store it with {store} before running it")
    where = f" before {needed_by!r}" if needed_by else " first"
    return PipelineError(f"{what}; add a pass that ensures it ({', '.join(repr(n) for n in providers)}){where}")


def _key_of(name: str) -> Key:
    """The key a ``ctx.results`` name stands for: a registered result type, else the name itself."""
    if name not in _ANALYSIS_NAMES and name != DENSE:
        _registered()  # pass modules register their result names when they load
    return _ANALYSIS_NAMES.get(name, name)


@overload
def canonical_key(key: OneOf) -> OneOf: ...
@overload
def canonical_key(key: Key) -> Key: ...


def canonical_key(key: Key | OneOf) -> Key | OneOf:
    """``key`` with the name of a registered result type replaced by the type (``"graph"`` -> ``Graph``),
    so that passes declaring string keys (the old spelling) and typed ones meet.

    Example:
        >>> canonical_key("graph") is Graph, canonical_key("my-scores")
        (True, 'my-scores')
    """
    if isinstance(key, OneOf):
        return OneOf(tuple(canonical_key(k) for k in key.keys))
    return _key_of(key) if isinstance(key, str) else key


@dataclass(frozen=True)
class OneOf:
    """A requirement any one of whose keys satisfies it; the manager provides the first when none is there.

    Example:
        >>> key_name(OneOf((DENSE, "dense-perplexity")))
        'dense-model or dense-perplexity'
    """

    keys: tuple[Key, ...]

    def __post_init__(self) -> None:
        if not self.keys:
            raise PipelineError("OneOf needs at least one key")

def ensures_key(p: DeclaresEnsures, key: Key) -> bool:
    """Whether pass ``p`` (an instance or a class) declares that it ensures ``key``."""
    key = canonical_key(key)
    return any(canonical_key(k) == key for k in p.ensures)
