"""shear: a graph compiler for structured pruning of PyTorch models, large language models first.

Example:
    >>> import shear                                            # doctest: +SKIP
    >>> graph = shear.trace(model, example_inputs)              # doctest: +SKIP
    >>> print(graph)                                            # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

from shear.errors import (
    CheckpointError,
    DataError,
    ExportError,
    GraphError,
    InputError,
    KernelError,
    ModelError,
    ModelLoadError,
    OutputError,
    PassError,
    PipelineError,
    ShearError,
    TraceError,
    VerifyError,
)
from shear.version import __version__

_LAZY = {
    "compile": ("shear.compiler", "compile"),
    "trace": ("shear.graph", "trace"),
    "draw": ("shear.graph", "draw"),
    "save": ("shear.io.checkpoint", "save"),
    "load": ("shear.io.checkpoint", "load"),
    "export": ("shear.io.export", "export"),
    "describe_folder": ("shear.io.folder_formats", "describe_folder"),
    "plan": ("shear.scale.plan", "plan"),
    "prune_streamed": ("shear.scale.stream", "prune_streamed"),
}
"""Public functions imported on first use, so ``import shear`` stays light (torch loads later)."""


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'shear' has no attribute {name!r}")
    import importlib

    module, attr = _LAZY[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value

__all__ = [
    "CheckpointError",
    "DataError",
    "ExportError",
    "GraphError",
    "InputError",
    "KernelError",
    "ModelError",
    "ModelLoadError",
    "OutputError",
    "PassError",
    "PipelineError",
    "ShearError",
    "TraceError",
    "VerifyError",
    "__version__",
    "compile",
    "trace",
    "draw",
    "save",
    "load",
    "export",
    "describe_folder",
    "plan",
    "prune_streamed",
]
