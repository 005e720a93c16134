"""Finding passes by name: the built-in pass modules, lookups with "did you mean", friendly names.

The built-in passes live in the method folders of :data:`METHOD_PACKAGES` (the rest of
:mod:`shear.passes` is the infrastructure that runs them); each pass module registers its passes with
:func:`~shear.passes.base.register_pass` when imported. :func:`load_builtin_passes` imports them
all once (a module that fails to import is recorded, not fatal, so one broken pass cannot take the
others down; the failure is shown where the pass is asked for).

Example:
    >>> cls = lookup_pass("discover-groups")           # doctest: +SKIP
    >>> lookup_pass("dicsover-groups")                  # doctest: +SKIP
    Traceback (most recent call last):
    shear.errors.PipelineError: unknown pass 'dicsover-groups'; did you mean 'discover-groups'? ...
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from pathlib import Path

from shear.errors import PipelineError
from shear.passes.base import PASS_REGISTRY, Pass
from shear.passes.keys import set_pass_source

__all__ = [
    "METHOD_PACKAGES",
    "load_builtin_passes",
    "lookup_pass",
    "closest_first",
    "registered_passes",
    "import_errors",
    "friendly_name",
    "find_by_friendly_name",
]

METHOD_PACKAGES = ("shear.passes.core", "shear.passes.lorashear", "shear.passes.baselines", "shear.passes.finetune")
"""The folders that hold passes, one per family of methods; the only ones :func:`load_builtin_passes` scans."""
_IMPORT_ERRORS: dict[str, str] = {}
_LOADED = False


def load_builtin_passes() -> None:
    """Import every pass module of the :data:`METHOD_PACKAGES` once, so their passes are registered."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    for package in METHOD_PACKAGES:
        package_dir = Path(importlib.import_module(package).__file__ or "").parent
        for info in sorted(pkgutil.iter_modules([str(package_dir)]), key=lambda i: i.name):
            if info.name.startswith("_"):
                continue
            module = f"{package}.{info.name}"
            try:
                importlib.import_module(module)
            except Exception as e:  # noqa: BLE001 - recorded and shown where the pass is asked for
                _IMPORT_ERRORS[module] = f"{type(e).__name__}: {e}"


def import_errors() -> dict[str, str]:
    """Pass modules that failed to import, with the error (empty when all is well)."""
    load_builtin_passes()
    return dict(_IMPORT_ERRORS)


def registered_passes() -> dict[str, type[Pass]]:
    """All registered passes by name, built-ins included, sorted by name."""
    load_builtin_passes()
    return dict(sorted(PASS_REGISTRY.items()))


def closest_first(word: str, candidates: list[str] | tuple[str, ...]) -> list[str]:
    """``candidates`` ordered by similarity to ``word`` (difflib ratio), most similar first."""
    ranked = difflib.get_close_matches(word, list(candidates), n=len(candidates), cutoff=0.0)
    return ranked + sorted(c for c in candidates if c not in ranked)


def lookup_pass(name: str) -> type[Pass]:
    """The pass class registered as ``name``; a :class:`PipelineError` listing valid names if none."""
    passes = registered_passes()
    if name in passes:
        return passes[name]
    valid = closest_first(name, list(passes))
    hint = f"; did you mean {valid[0]!r}?" if valid and difflib.SequenceMatcher(None, name, valid[0]).ratio() > 0.6 else ""
    msg = f"unknown pass {name!r}{hint or '.'} Valid passes (closest first): {', '.join(valid) or '(none registered)'}"
    if _IMPORT_ERRORS:
        broken = "; ".join(f"{m} ({err})" for m, err in sorted(_IMPORT_ERRORS.items()))
        msg += f". These pass modules failed to import: {broken}"
    raise PipelineError(msg)


def friendly_name(cls: type[Pass]) -> str:
    """The CamelCase name a pass is re-exported under: ``discover-groups`` → ``DiscoverGroups``."""
    return "".join(part.capitalize() for part in cls.name.split("-"))


def find_by_friendly_name(attr: str) -> type[Pass] | None:
    """The registered pass whose class name or CamelCase name is ``attr`` (case-insensitive).

    ``Random``, ``Erase``, ``DiscoverGroups``, ``LHSPG`` and ``Lhspg`` all resolve.
    """
    key = attr.lower()
    for cls in registered_passes().values():
        if key in (cls.__name__.lower(), cls.name.replace("-", "")):
            return cls
    return None


set_pass_source(lambda: registered_passes().values())
