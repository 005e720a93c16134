"""The measured width granularity of a device, cached on disk, or pinned by an environment variable.

:func:`device_granularity` answers "which MLP width step does this device run at full speed" for a
target (:mod:`shear.model.target`): ``SHEAR_WIDTH_GRANULARITY=<int>`` pins it without measuring
(tests pin 1); else a cached sweep of this device, dtype and torch version; else a fresh sweep
(:func:`shear.kernels.widths.measure_widths`, seconds), run twice: the answer is cached when both
agree, else the coarser one is used and nothing is cached (a busy machine moved the timings). The cache is one JSON
file per key under ``$SHEAR_CACHE`` (or ``~/.cache/shear``) in ``widths/``, written atomically
(:func:`shear.io.outputs.atomic_file`); an unreadable entry is measured again.

Example:
    >>> import os, tempfile
    >>> pinned = os.environ.pop(GRANULARITY_ENV, None)
    >>> root = tempfile.mkdtemp()
    >>> fixed = lambda dev, dtype, **kw: measure_widths(dev, dtype, base=512, inner=8, tokens=1, repeats=1)
    >>> g, how = device_granularity("cpu", torch.float32, cache_dir=root, measure=fixed)
    >>> how in ("measured", "measured twice, unequal (busy machine): not cached")
    True
    >>> os.environ[GRANULARITY_ENV] = "16"
    >>> device_granularity("cpu", torch.float32)
    (16, 'pinned by SHEAR_WIDTH_GRANULARITY')
    >>> if pinned is None:
    ...     del os.environ[GRANULARITY_ENV]
    ... else:
    ...     os.environ[GRANULARITY_ENV] = pinned
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from shear.errors import InputError, OutputError
from shear.io.outputs import atomic_file
from shear.kernels.widths import WidthTable, device_name, measure_widths

__all__ = [
    "GRANULARITY_ENV", "CACHE_ENV", "cache_root", "cache_key", "read_width_table", "write_width_table",
    "device_granularity", "pinned_granularity",
]

GRANULARITY_ENV = "SHEAR_WIDTH_GRANULARITY"
"""Environment variable that pins every device's width granularity (a positive integer)."""

CACHE_ENV = "SHEAR_CACHE"
"""Environment variable naming shear's cache root (as :mod:`shear.zoo.cache` reads it)."""

_MAX_PIN = 1 << 16


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """``cache_dir``, else ``$SHEAR_CACHE``, else ``~/.cache/shear``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "shear"


def cache_key(device: str | torch.device, dtype: torch.dtype) -> str:
    """What a sweep depends on: the device by name, the dtype and the torch version."""
    return f"{device_name(device)} | {str(dtype).removeprefix('torch.')} | torch {torch.__version__}"


def _path(root: Path, key: str) -> Path:
    return root / "widths" / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.json"


def read_width_table(key: str, cache_dir: str | os.PathLike[str] | None = None) -> WidthTable | None:
    """The cached sweep of ``key``, or ``None`` when there is none or it cannot be read."""
    path = _path(cache_root(cache_dir), key)
    try:
        doc: Any = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(doc, dict) or doc.get("key") != key:
            return None
        table = WidthTable.from_dict(doc["table"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return table if isinstance(table.granularity, int) and table.granularity > 0 else None


def write_width_table(key: str, table: WidthTable, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Store ``table`` under ``key`` (atomically: a reader sees the old entry or the new one)."""
    path = _path(cache_root(cache_dir), key)
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps({"key": key, "table": table.to_dict()}, indent=1, sort_keys=True), encoding="utf-8")
    return path


def pinned_granularity() -> int | None:
    """The granularity ``SHEAR_WIDTH_GRANULARITY`` pins, ``None`` when unset; an
    :class:`~shear.errors.InputError` naming the variable when it is not a positive integer."""
    raw = os.environ.get(GRANULARITY_ENV)
    if raw is None or not raw.strip():
        return None
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if not 1 <= value <= _MAX_PIN:
        raise InputError(
            f"{GRANULARITY_ENV}={raw!r}: give a positive integer width step (e.g. 64), or unset it to measure the device"
        )
    return value


def device_granularity(
    device: str | torch.device, dtype: torch.dtype, *, cache_dir: str | os.PathLike[str] | None = None,
    measure: Callable[..., WidthTable] = measure_widths, **sweep: Any,
) -> tuple[int, str]:
    """The width granularity of ``device`` for ``dtype`` and how it was found: ``pinned by ...``,
    ``cached`` or ``measured``; ``measure(device, dtype, **sweep)`` is the sweep
    (:func:`~shear.kernels.widths.measure_widths`).

    A device this machine does not have (``cuda`` with no GPU: planning for one) cannot be
    measured: it gets the GPU tensor-core tile (:data:`~shear.model.devices.TENSOR_CORE_MULTIPLE`),
    said so in the answer.
    """
    from shear.model.devices import TENSOR_CORE_MULTIPLE

    pinned = pinned_granularity()
    if pinned is not None:
        return pinned, f"pinned by {GRANULARITY_ENV}"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        return TENSOR_CORE_MULTIPLE, "not measured (no CUDA device here): tensor-core tile"
    if dev.type not in ("cpu", "cuda"):
        return 1, f"not measured on {dev.type}"
    key = cache_key(dev, dtype)
    cached = read_width_table(key, cache_dir)
    if cached is not None:
        return cached.granularity, "cached"
    table = measure(dev, dtype, **sweep)
    again = measure(dev, dtype, **sweep)
    if again.granularity != table.granularity:  # other work on the machine moved the timings: not kept
        return max(table.granularity, again.granularity), "measured twice, unequal (busy machine): not cached"
    try:
        write_width_table(key, table, cache_dir)
    except OutputError:  # a cache that cannot be written costs a re-measurement, nothing more
        pass
    return table.granularity, "measured"
