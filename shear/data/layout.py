"""Where the committed corpus and instruction set live inside the installed package.

The data ships as package data under ``shear/data/`` (so an installed shear finds it):
``corpus/<source>/<split>.jsonl.xz`` (one JSON object per document: ``id``, ``text``),
``instructions/<split>.jsonl.xz`` (Alpaca records), ``MANIFEST.json`` (sizes and SHA-256 of every
file) and ``DATA_CARD.md``. ``$SHEAR_DATA`` points the loaders at another copy.

Example:
    >>> corpus_file("kjv", "validation").as_posix().endswith("corpus/kjv/validation.jsonl.xz")
    True
"""

from __future__ import annotations

import os
from pathlib import Path

from shear.data.sources import SOURCES, SPLITS
from shear.errors import DataError

__all__ = ["DATA_ENV", "data_root", "corpus_file", "instructions_file", "manifest_file", "check_split"]

DATA_ENV = "SHEAR_DATA"
"""Environment variable naming a data directory to use instead of the packaged one."""


def data_root() -> Path:
    """The data directory: ``$SHEAR_DATA`` if set, else the ``shear/data`` package folder."""
    env = os.environ.get(DATA_ENV)
    return Path(env) if env else Path(__file__).resolve().parent


def check_split(split: str) -> None:
    """Raise :class:`DataError` unless ``split`` is one of train/validation/test."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")


def corpus_file(source: str, split: str) -> Path:
    """The compressed JSONL file of one source and split."""
    if source not in SOURCES:
        raise DataError(f"unknown corpus source {source!r}; the sources are {', '.join(SOURCES)}")
    check_split(split)
    return data_root() / "corpus" / source / f"{split}.jsonl.xz"


def instructions_file(split: str) -> Path:
    """The compressed Alpaca-style instruction JSONL file of one split."""
    check_split(split)
    return data_root() / "instructions" / f"{split}.jsonl.xz"


def manifest_file() -> Path:
    """``MANIFEST.json``: per file its size, document count and SHA-256 (compressed and raw)."""
    return data_root() / "MANIFEST.json"
