"""Read text and JSONL files, plain or compressed (``.xz``, ``.gz``), with errors that say what to fix.

Example:
    >>> import json, tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.jsonl"
    >>> _ = p.write_text(json.dumps({"text": "hi"}) + "\\n")
    >>> read_jsonl(p)
    [{'text': 'hi'}]
"""

from __future__ import annotations

import gzip
import json
import lzma
import os
from pathlib import Path
from typing import Any

from shear.errors import DataError

__all__ = ["read_bytes", "read_text", "read_jsonl"]


def read_bytes(path: str | os.PathLike[str]) -> bytes:
    """The (decompressed) bytes of ``path``; ``.xz`` and ``.gz`` are decompressed."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such file. Check the path (shear's own data ships under shear/data/; "
                        f"rebuild it with `python -m tools.build_corpus`).")  # fmt: skip
    try:
        if p.suffix == ".xz":
            return lzma.decompress(p.read_bytes())
        if p.suffix == ".gz":
            return gzip.decompress(p.read_bytes())
        return p.read_bytes()
    except (lzma.LZMAError, OSError, EOFError) as e:
        raise DataError(f"{p}: cannot decompress ({e}); the file is truncated or corrupt, restore it "
                        f"from git or rebuild it with `python -m tools.build_corpus`.") from e  # fmt: skip


def read_text(path: str | os.PathLike[str]) -> str:
    """UTF-8 text of ``path`` (plain or compressed)."""
    data = read_bytes(path)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e}); convert it with `iconv -t UTF-8`.") from e


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """One JSON object per non-empty line of ``path`` (plain or compressed)."""
    records: list[dict[str, Any]] = []
    for lineno, line in enumerate(read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}:{lineno}: not valid JSON ({e.msg}); each line must be one JSON object."
            ) from e
        if not isinstance(record, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}.")
        records.append(record)
    return records
