"""The value a zoo loader returns: a model, its tokenizer, and where they were loaded from.

Example:
    >>> from torch import nn
    >>> m = LoadedModel(model=nn.Linear(2, 2), tokenizer=None, path=None, name="toy")
    >>> model, tokenizer = m[:2]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

from torch import nn

__all__ = ["LoadedModel"]


class LoadedModel(NamedTuple):
    """A loaded reference model; unpacks as ``model, tokenizer, path, name``."""

    model: nn.Module
    """The model, in eval mode, float32 unless asked otherwise."""
    tokenizer: Any
    """Its tokenizer (a transformers ``PreTrainedTokenizerBase``)."""
    path: Path | None
    """The directory it was loaded from (the cache entry), ``None`` for in-memory toys."""
    name: str
    """Short name, e.g. ``"smollm2-135m-instruct"``."""
