"""Refusing model folders that ask transformers to run code shipped with them.

A ``config.json`` or ``tokenizer_config.json`` with an ``auto_map`` names Python classes in files
of the folder; transformers asks "run the custom code? [y/N]" (or runs it, given
``trust_remote_code``), and answering yes runs whatever the folder holds. shear never needs remote
code, so :func:`refuse_remote_code` reads the folder's JSON configs itself and raises
:class:`~shear.errors.ModelLoadError` naming the file before transformers sees the folder. The one
exception is the config class shear itself writes into a Nemotron-NAS folder for vLLM
(:mod:`shear.io.nas_config_code`), accepted only byte-identical and never imported by shear. It is
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

import os
from pathlib import Path
from typing import Any

from shear.errors import CheckpointError, ModelLoadError
from shear.io.nas_config_code import AUTO_MAP, is_shear_config_code
from shear.io.safe_archive import read_json_file

__all__ = ["REMOTE_CODE_KEYS", "refuse_remote_code", "remote_code_files"]

REMOTE_CODE_KEYS = ("auto_map", "trust_remote_code", "custom_pipelines")
"""Keys of a transformers JSON config that make it load code from the folder (or the hub)."""

_MAX_CONFIG = 64 << 20
"""Largest config JSON read; transformers' configs are kilobytes (tokenizer.json is not a config)."""
_NESTED = ("text_config", "vision_config", "tokenizer_config", "generation_config")
"""Configs transformers reads from inside a config (a composite model's parts)."""
_MAX_NESTING = 8
"""Deepest chain of nested configs checked; transformers' nest one or two levels."""


def _configs(folder: Path) -> list[Path]:
    """The JSON files of ``folder`` (and its ``adapter/``) that transformers or peft read as configs."""
    out: list[Path] = []
    for sub in (folder, folder / "adapter"):
        if sub.is_dir():
            out += sorted(p for p in sub.iterdir() if p.suffix == ".json" and "config" in p.name and p.is_file())
    return out


def _asks_for_code(doc: Any, file: Path) -> list[str]:
    """The :data:`REMOTE_CODE_KEYS` set in ``doc`` and its nested configs, outermost first (level by level,
    so a top-level ``auto_map`` is found whatever lies below it)."""
    found: list[str] = []
    level = [("", doc)]
    for _ in range(_MAX_NESTING + 1):
        below = []
        for prefix, d in level:
            if isinstance(d, dict):
                found += [prefix + k for k in REMOTE_CODE_KEYS if d.get(k)]
                below += [(f"{prefix}{n}.", d[n]) for n in _NESTED if isinstance(d.get(n), dict)]
        if not below:
            return found
        level = below
    if found:
        return found
    raise ModelLoadError(
        f"{file} nests configs more than {_MAX_NESTING} deep ({level[0][0]}...), which shear cannot check for "
        f"code shipped with the model; transformers' configs nest one or two. Fix or remove {file.name}"
    )


def _shear_nas_config(file: Path, doc: Any) -> bool:
    """``file`` is the ``config.json`` of a Nemotron-NAS folder shear wrote: its ``auto_map`` names only the
    config class shear ships, and the folder's copy of it is byte-identical (:mod:`shear.io.nas_config_code`)."""
    return (file.name == "config.json" and isinstance(doc, dict) and doc.get("auto_map") == AUTO_MAP
            and is_shear_config_code(file.parent))


def remote_code_files(folder: str | os.PathLike[str]) -> dict[str, list[str]]:
    """``{file: keys}`` for each config JSON of ``folder`` that asks for remote code (empty: none does).
    A config that cannot be checked (larger than 64 MiB, not UTF-8 JSON, nested too deep) is refused with
    :class:`ModelLoadError`: transformers would still read it."""
    found: dict[str, list[str]] = {}
    for f in _configs(Path(folder)):
        try:
            doc = read_json_file(f, str(f), _MAX_CONFIG)
        except CheckpointError as e:
            raise ModelLoadError(
                f"{e}: shear cannot check it for code shipped with the model, and transformers would read it. "
                f"Fix or remove {f.name}"
            ) from e
        keys = _asks_for_code(doc, f)
        if keys and not (keys == ["auto_map"] and _shear_nas_config(f, doc)):
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
