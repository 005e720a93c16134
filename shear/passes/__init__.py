"""shear.passes: the pass protocol, the pass manager, pipelines, and every pass by a friendly name.

Passes are re-exported by CamelCase name, resolved lazily from the registry, so a pass module
that fails to import cannot break ``import shear.passes``: ``shear.passes.Random``,
``shear.passes.Erase``, ``shear.passes.DiscoverGroups``, ``shear.passes.LHSPG`` (any casing of
the kebab name without dashes, or the class's own name).

Example:
    >>> import shear.passes as sp
    >>> sp.parse_pipeline("random{ratio=0.3,seed=0},erase") == [sp.Random(ratio=0.3, seed=0), sp.Erase()]
    True
    >>> sp.format_pipeline([sp.Random(ratio=0.5)])
    'random{ratio=0.5}'
"""

from __future__ import annotations

from typing import Any

from shear.passes.base import (
    DENSE,
    PASS_REGISTRY,
    Context,
    OneOf,
    Options,
    Pass,
    PassResult,
    register_analysis,
    register_pass,
)
from shear.passes.manager import PassHook, PassManager, PassRecord
from shear.passes.options import OptionInfo, build_pass, format_pass, pass_doc, pass_options
from shear.passes.pipeline import (
    DEFAULT_PIPELINE,
    LORASHEAR_PIPELINE,
    default_pipeline,
    format_pipeline,
    load_pipeline,
    parse_pipeline,
    resolve_pipeline,
)
from shear.passes.registry import import_errors, load_builtin_passes, lookup_pass, registered_passes

__all__ = [
    "Pass",
    "PassResult",
    "Context",
    "Options",
    "OneOf",
    "DENSE",
    "PASS_REGISTRY",
    "register_pass",
    "register_analysis",
    "PassManager",
    "PassRecord",
    "PassHook",
    "OptionInfo",
    "pass_options",
    "pass_doc",
    "build_pass",
    "format_pass",
    "DEFAULT_PIPELINE",
    "LORASHEAR_PIPELINE",
    "default_pipeline",
    "parse_pipeline",
    "load_pipeline",
    "resolve_pipeline",
    "format_pipeline",
    "lookup_pass",
    "registered_passes",
    "load_builtin_passes",
    "import_errors",
]


def __getattr__(attr: str) -> Any:
    """``shear.passes.Random`` and friends: registered passes by CamelCase name, loaded lazily."""
    if attr.startswith("_") or not attr[:1].isupper():
        raise AttributeError(f"module 'shear.passes' has no attribute {attr!r}")
    from shear.passes.registry import find_by_friendly_name, friendly_name

    cls = find_by_friendly_name(attr)
    if cls is None:
        known = sorted(friendly_name(c) for c in registered_passes().values())
        raise AttributeError(f"module 'shear.passes' has no pass {attr!r}; registered passes: {', '.join(known)}")
    return cls


def __dir__() -> list[str]:
    from shear.passes.registry import friendly_name

    return sorted(set(__all__) | {friendly_name(c) for c in registered_passes().values()})
