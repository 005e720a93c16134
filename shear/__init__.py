"""shear: a graph compiler for structured pruning of PyTorch models, large language models first.

Example:
    >>> import shear                                            # doctest: +SKIP
    >>> graph = shear.trace(model, example_inputs)              # doctest: +SKIP
    >>> print(graph)                                            # doctest: +SKIP
"""

from __future__ import annotations

from shear.errors import (
    CheckpointError,
    DataError,
    GraphError,
    ModelLoadError,
    PassError,
    PipelineError,
    ShearError,
    TraceError,
    VerifyError,
)

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "DataError",
    "GraphError",
    "ModelLoadError",
    "PassError",
    "PipelineError",
    "ShearError",
    "TraceError",
    "VerifyError",
    "__version__",
]
