"""``shear.export``: write a model in a serving format (GGUF for llama.cpp so far).

Example:
    >>> import shear                                                        # doctest: +SKIP
    >>> shear.export(small, "small.gguf", format="gguf", tokenizer=tok)     # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from shear.errors import ExportError

__all__ = ["FORMATS", "export"]


def _gguf(model: nn.Module, path: str | os.PathLike[str], **options: Any) -> Path:
    from shear.io.gguf import export_gguf

    return export_gguf(model, path, **options)


FORMATS: dict[str, Callable[..., Path]] = {"gguf": _gguf}
"""Format name -> writer ``(model, path, **options) -> path``."""


def export(model: nn.Module, path: str | os.PathLike[str], format: str = "gguf", **options: Any) -> Path:
    """Write ``model`` to ``path`` in ``format``; ``options`` go to the format's writer.

    ``gguf`` (:func:`shear.io.gguf.export_gguf`): ``tokenizer``, ``dtype``
    (``f16``/``bf16``/``f32``), ``merge_lora``, ``force``, ``name``, ``pre``.
    """
    writer = FORMATS.get(format)
    if writer is None:
        raise ExportError(f"unknown export format {format!r}; known: {sorted(FORMATS)}")
    return writer(model, path, **options)
