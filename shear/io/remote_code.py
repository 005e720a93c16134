"""Refusing model folders that ask transformers to run code shipped with them.

A ``config.json`` or ``tokenizer_config.json`` with an ``auto_map`` names Python classes in files
of the folder; transformers asks "run the custom code? [y/N]" (or runs it, given
``trust_remote_code``), and answering yes runs whatever the folder holds. shear never needs remote
code, so :func:`refuse_remote_code` reads the folder's JSON configs itself and raises
:class:`~shear.errors.ModelLoadError` naming the file before transformers sees the folder. It is
called wherever shear opens a user's folder: :func:`shear.load`, the CLI's model and tokenizer
loaders, the config readers of ``shear plan`` / ``stream-prune`` and the GGUF tokenizer reader.

Example:
    >>> import json, pathlib, tempfile
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "config.json").write_text(json.dumps({"auto_map": {"AutoModel": "evil.Model"}}))
    >>> try:
    ...     refuse_remote_code(d)
    ... except ModelLoadError as e:
    ...     print(type(e).__name__)
    ModelLoadError
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from shear.errors import ModelLoadError

__all__ = ["REMOTE_CODE_KEYS", "refuse_remote_code", "remote_code_files"]

REMOTE_CODE_KEYS = ("auto_map", "trust_remote_code", "custom_pipelines")
"""Keys of a transformers JSON config that make it load code from the folder (or the hub)."""

_MAX_CONFIG = 64 << 20
"""Largest config JSON read; transformers' configs are kilobytes (tokenizer.json is not a config)."""


def _configs(folder: Path) -> list[Path]:
    """The JSON files of ``folder`` (and its ``adapter/``) that transformers or peft read as configs."""
    out: list[Path] = []
    for sub in (folder, folder / "adapter"):
        if sub.is_dir():
            out += sorted(p for p in sub.iterdir() if p.suffix == ".json" and "config" in p.name and p.is_file())
    return out


def _asks_for_code(doc: Any) -> list[str]:
    if not isinstance(doc, dict):
        return []
    found = [k for k in REMOTE_CODE_KEYS if doc.get(k)]
    for nested in ("text_config", "vision_config", "tokenizer_config", "generation_config"):
        found += [f"{nested}.{k}" for k in _asks_for_code(doc.get(nested))]
    return found


def remote_code_files(folder: str | os.PathLike[str]) -> dict[str, list[str]]:
    """``{file: keys}`` for each config JSON of ``folder`` that asks for remote code (empty: none does).
    A config that is not readable JSON asks for nothing: the reader that needs it says it is broken."""
    found: dict[str, list[str]] = {}
    for f in _configs(Path(folder)):
        try:
            if f.stat().st_size > _MAX_CONFIG:
                continue
            keys = _asks_for_code(json.loads(f.read_bytes().decode("utf-8")))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError):
            continue
        if keys:
            found[str(f)] = keys
    return found


def refuse_remote_code(folder: str | os.PathLike[str]) -> None:
    """Raise :class:`ModelLoadError` naming the file when a config of ``folder`` asks transformers for
    remote code (:data:`REMOTE_CODE_KEYS`); nothing is imported or run either way."""
    found = remote_code_files(folder)
    if not found:
        return
    file, keys = next(iter(found.items()))
    raise ModelLoadError(
        f"{file} asks for code shipped with the model ({', '.join(keys)}); shear never runs a model folder's code. "
        f"Use a model whose architecture transformers ships, or remove {keys[0]!r} from {Path(file).name} if the "
        "folder's weights fit a built-in class"
    )
