"""One small error hierarchy: every error shear raises derives from :class:`ShearError`.

Each message names the thing that failed (module, node, pass, file) and the fix. Each layer raises
its own: the IR :class:`GraphError`/:class:`TraceError`, the runtime kernels :class:`KernelError`,
model facts :class:`ModelError`, training :class:`TrainingError`, data :class:`DataError`, the pass
layer :class:`PassError`/:class:`PipelineError`; a pass turns a lower layer's error about its options
into a :class:`PipelineError` that names the pass. ``tests/test_layers.py`` fails on a bare built-in
``raise ValueError(...)`` anywhere in the package.

Example:
    >>> try:
    ...     raise TraceError("module 'model.layers.0' could not be traced: ... Try ...")
    ... except ShearError as e:
    ...     print(type(e).__name__)
    TraceError
"""

from __future__ import annotations

__all__ = [
    "ShearError",
    "TraceError",
    "GraphError",
    "VerifyError",
    "PassError",
    "PipelineError",
    "DataError",
    "CheckpointError",
    "OutputError",
    "InputError",
    "ModelLoadError",
    "TrainingError",
    "DistributedError",
    "ExportError",
    "KernelError",
    "ModelError",
]


class ShearError(Exception):
    """Base class of every error raised by shear."""


class TraceError(ShearError):
    """The model could not be traced into the IR (names the failing module/op and what to try)."""


class GraphError(ShearError):
    """The IR is inconsistent, or asked for something it does not hold (no prunable structure, ...)."""


class VerifyError(ShearError):
    """The emitted small model differs from the masked original (names the max diff and first diverging node)."""


class PassError(ShearError):
    """A pass failed; names the pass and the passes that ran before it. The cause is chained."""


class PipelineError(ShearError):
    """A pipeline could not be built: unknown pass name, unknown or badly typed option, missing prerequisite.
    Raised by the pass layer (passes, manager, pipeline parsing), never below it."""


class KernelError(ShearError, ValueError):
    """A runtime kernel (saliency, budget, sparsity masks, LHSPG, recovery weights, block-wise tuning,
    calibration) cannot run on what it was given: an option out of range, statistics not collected, a
    model it does not fit; names the argument and the fix. A ``ValueError`` too, as these once were."""


class ModelError(ShearError, ValueError):
    """The model, or what it returned, lacks what shear needs of it: no output tensor (logits) in its
    output, no plain output head to bypass; names the model's type and the fix. A ``ValueError`` too."""


class DataError(ShearError):
    """Data is missing, empty, too short or malformed."""


class CheckpointError(ShearError):
    """A saved model or checkpoint directory is missing, corrupt, or does not match the architecture."""


class OutputError(ShearError):
    """An output path cannot be written without losing files: it exists, is the input, is a file,
    is not writable or lacks the space. Raised before any work starts; names the fix."""


class InputError(ShearError):
    """An input the caller gave cannot be used as it is: text that is not UTF-8 or not a string, token
    ids outside the vocabulary, a dtype or device the model cannot take, non-finite weights; names the fix."""


class ModelLoadError(ShearError):
    """A model could not be loaded (missing package, hub id instead of a local path, ...)."""


class TrainingError(ShearError):
    """A training run cannot start or go on (nothing trainable, non-finite loss, ...); names the fix."""


class ExportError(ShearError):
    """A model cannot be written in a serving format (architecture, widths or adapters the format cannot
    hold, a missing tokenizer, an existing output path); names what and the fix. Nothing is written."""


class DistributedError(TrainingError):
    """Multi-process training was asked for but cannot run as asked (no process group for FSDP, an
    unknown parallel strategy); names the launch command or setting that fixes it."""
