"""Read-only, live views of one facet of a registration table (kept for code that reads the old tables).

A registration table maps a key (an op, a module type, a module predicate) to a frozen spec with one
field per facet. A :class:`FacetView` shows the keys whose facet is set, and their facet: what a
separate table per facet used to hold, now derived from the one table, so it can never disagree.

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class Spec:
    ...     colour: str | None = None
    >>> table = {"a": Spec("red"), "b": Spec()}
    >>> view = FacetView(table, "colour")
    >>> dict(view), "b" in view
    ({'a': 'red'}, False)
    >>> table["b"] = Spec("blue")                  # live: the view follows the table
    >>> view["b"]
    'blue'
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

__all__ = ["FacetView"]


def _is_set(value: Any) -> bool:
    return value is not None


class FacetView(Mapping[Any, Any]):
    """The keys of ``table`` whose spec's ``facet`` passes ``present`` (default: is not None), each
    mapped to that facet; ``keys`` narrows which keys count (e.g. only module types)."""

    def __init__(
        self,
        table: Mapping[Any, Any],
        facet: str,
        present: Callable[[Any], bool] = _is_set,
        keys: Callable[[Any], bool] | None = None,
    ) -> None:
        self._table, self._facet, self._present, self._keys = table, facet, present, keys

    def __getitem__(self, key: Any) -> Any:
        spec = self._table[key]
        value = getattr(spec, self._facet)
        if not self._present(value) or (self._keys is not None and not self._keys(key)):
            raise KeyError(key)
        return value

    def __iter__(self) -> Iterator[Any]:
        for key, spec in list(self._table.items()):
            if self._present(getattr(spec, self._facet)) and (self._keys is None or self._keys(key)):
                yield key

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __repr__(self) -> str:
        return f"FacetView({self._facet}: {len(self)} entries)"
