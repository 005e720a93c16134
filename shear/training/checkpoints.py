"""Training checkpoints: everything a run needs to continue bit-identically, written atomically.

``<checkpoint_dir>/step-<n>/`` holds

* ``model.safetensors`` — the model's full state dict (base weights too: hooks such as LHSPG edit
  frozen weights), tensors shared by several names (tied embeddings) stored once;
* ``state.pt`` — optimizer, scheduler, batch-stream and hook states, torch RNG states
  (read back with ``torch.load(weights_only=True)``);
* ``trainer.json`` — step, per-step losses, tokens, the config, python/numpy RNG states, tied
  aliases, the run's fingerprint (:mod:`~shear.training.fingerprint`), whether the run
  finished, and the size and sha256 of every other file (checked on load).

A checkpoint is built in a hidden temporary sibling and swapped in as ``step-<n>`` only when complete
(:func:`shear.io.outputs.atomic_dir`), so a killed run never leaves a ``step-<n>`` that looks valid;
only the newest ``keep`` survive.

Example:
    >>> save_checkpoint("ckpt", 4, model=model, extra={"optimizer": opt.state_dict()},   # doctest: +SKIP
    ...                 info={"losses": [2.3, 2.1, 2.0, 1.9]})
    >>> latest_checkpoint("ckpt")                                                       # doctest: +SKIP
    PosixPath('ckpt/step-4')
    >>> load_checkpoint("ckpt/step-4").step                                             # doctest: +SKIP
    4
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from shear.errors import CheckpointError, OutputError
from shear.io.manifest_schema import file_list_problem, is_int
from shear.io.outputs import atomic_dir, sha256_file
from shear.io.safe_archive import read_json_file

__all__ = [
    "TrainCheckpoint",
    "save_checkpoint",
    "load_checkpoint",
    "list_checkpoints",
    "latest_checkpoint",
    "remove_stale_temporaries",
    "check_checkpoint_dir",
    "check_record",
    "load_record",
    "read_part",
    "check_files",
    "RECORD_FIELDS",
    "FORMAT",
    "SHARDED_FORMAT",
]

FORMAT = "shear-train-checkpoint"
VERSION = 2
"""2: sha256 of every file and the run fingerprint are recorded."""
SHARDED_FORMAT = "shear-train-checkpoint-sharded"
"""The format of an FSDP run's ``trainer.json`` (:mod:`~shear.training.dcp_checkpoints`)."""
_WEIGHTS = "model.safetensors"
_STATE = "state.pt"
_INFO = "trainer.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class TrainCheckpoint:
    """A loaded checkpoint: the model tensors, the binary states and the JSON record."""

    path: Path
    step: int
    model_state: dict[str, torch.Tensor]
    """Full state dict of the (unwrapped) model, aliases of tied tensors included."""
    state: dict[str, Any]
    """Binary part: ``optimizer``, ``scheduler``, ``batches``, ``hooks``, ``rng`` (as saved)."""
    info: dict[str, Any]
    """JSON part: ``losses``, ``tokens``, ``config``, ``rng`` (python/numpy) and whatever else was saved."""


def _root(root: str | os.PathLike[str]) -> Path:
    """A checkpoint folder as given, ``~`` expanded: every reader and writer of checkpoints agrees on it."""
    return Path(root).expanduser()


def list_checkpoints(root: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``step-<n>`` directory under ``root`` (``~`` expanded), oldest first."""
    root = _root(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(root: str | os.PathLike[str]) -> Path | None:
    """The newest ``step-<n>`` directory under ``root``, or None."""
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def _dedup(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors once each (safetensors refuses shared storage) and ``alias -> stored name``."""
    seen: dict[tuple[int, tuple[int, ...], tuple[int, ...], torch.dtype], str] = {}
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for name, t in state.items():
        key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().to("cpu", copy=True).contiguous()
    return tensors, aliases


def save_checkpoint(
    root: str | os.PathLike[str],
    step: int,
    *,
    model: nn.Module,
    extra: dict[str, Any],
    info: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write ``root/step-<step>`` atomically and delete all but the newest ``keep`` checkpoints.

    ``extra`` (tensors and plain data) goes to ``state.pt``; ``info`` (JSON-able) to ``trainer.json``.
    """
    root = check_checkpoint_dir(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tensors, aliases = _dedup(model.state_dict())
    with atomic_dir(final) as tmp:
        save_file(tensors, str(tmp / _WEIGHTS), metadata={"format": "pt"})
        torch.save(extra, tmp / _STATE)
        files = {f: {"size": (tmp / f).stat().st_size, "sha256": sha256_file(tmp / f)} for f in (_WEIGHTS, _STATE)}
        record = {"format": FORMAT, "version": VERSION, "step": step, "aliases": aliases, "files": files, **info}
        (tmp / _INFO).write_text(json.dumps(record))
    for _, p in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
    return final


def check_checkpoint_dir(root: str | os.PathLike[str]) -> Path:
    """``root`` as a checkpoint folder: refused with :class:`~shear.errors.OutputError` when it, or a
    folder above it, is a file or a symbolic link to nowhere, so a run fails before it trains, not at
    its first checkpoint.

    Example:
        >>> import tempfile, pathlib
        >>> f = pathlib.Path(tempfile.mkdtemp()) / "ckpt"
        >>> _ = f.write_text("mine")
        >>> check_checkpoint_dir(f)
        Traceback (most recent call last):
        ...
        shear.errors.OutputError: checkpoint_dir ... is a file, not a folder; ...
    """
    path = _root(root)
    if path.is_symlink() and not path.exists():
        raise OutputError(f"checkpoint_dir {path} is a symbolic link to nowhere; give a real folder (new or one of this run's)")
    place = path
    while not place.exists() and place != place.parent:
        place = place.parent
    if not place.is_dir():
        what = "is a file" if place == path else f"is inside {place}, which is a file"
        raise OutputError(f"checkpoint_dir {path} {what}, not a folder; give a new folder (or this run's checkpoint folder)")
    if not os.access(place, os.W_OK | os.X_OK):
        raise OutputError(f"checkpoint_dir {path}: no write permission in {place}; choose a folder you can write")
    return path


def remove_stale_temporaries(root: str | os.PathLike[str]) -> None:
    """Delete the half-written ``.step-*.tmp-*`` directories (and replaced ``.step-*.old-*`` ones) a killed
    run left behind. Checks ``root`` first (:func:`check_checkpoint_dir`): training calls this before
    its first step."""
    root = check_checkpoint_dir(root)
    if root.is_dir():
        for p in [*root.glob(".step-*.tmp-*"), *root.glob(".step-*.old-*"), *root.glob(".tmp-step-*")]:
            shutil.rmtree(p, ignore_errors=True)


def _corrupt(path: Path, why: str) -> CheckpointError:
    found = [p for _, p in list_checkpoints(path.parent) if p != path]
    older = f" (the previous one is {found[-1].name})" if found else ""
    return CheckpointError(
        f"checkpoint {path} is corrupt or incomplete: {why}. Delete {path} to resume from the previous "
        f"checkpoint{older}, or start over with resume=False or a new checkpoint_dir"
    )


def _clone_tree(obj: Any) -> Any:
    """Fresh (aligned, unshared) copies of every tensor in a nested state."""
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: _clone_tree(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clone_tree(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_clone_tree(v) for v in obj)
    return obj


_MAX_INFO = 256 << 20
"""The largest ``trainer.json`` read (per-step losses of a long run are a few MiB)."""
_KEY = re.compile(r"[A-Za-z0-9_.\-]{1,512}")
_MAX_COUNT = (1 << 62) - 1
_WORD = (1 << 32) - 1


def _count(v: Any, lo: int = 0) -> bool:
    return is_int(v, lo, _MAX_COUNT)


def _plain(v: Any, depth: int = 0) -> bool:
    """JSON made of finite numbers, strings, bools, null, lists and objects, at most 8 levels deep."""
    if depth > 8:
        return False
    if isinstance(v, float):
        return math.isfinite(v)
    if v is None or isinstance(v, (bool, int, str)):
        return True
    if isinstance(v, list):
        return all(_plain(x, depth + 1) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _plain(x, depth + 1) for k, x in v.items())
    return False


def _rng_ok(v: Any) -> bool:
    """The JSON half of :func:`~shear.training.rng.capture_rng`: python's and numpy's MT states."""
    if not isinstance(v, dict) or set(v) != {"python", "numpy"}:
        return False
    py, np_ = v["python"], v["numpy"]
    py_ok = (isinstance(py, list) and len(py) == 3 and _count(py[0]) and isinstance(py[1], list) and len(py[1]) == 625
             and all(is_int(x, 0, _WORD) for x in py[1][:624]) and _count(py[1][624])
             and (py[2] is None or (isinstance(py[2], float) and math.isfinite(py[2]))))
    np_ok = (isinstance(np_, list) and len(np_) == 5 and np_[0] == "MT19937" and isinstance(np_[1], list)
             and len(np_[1]) == 624 and all(is_int(x, 0, _WORD) for x in np_[1]) and _count(np_[2])
             and np_[2] <= 624 and np_[3] in (0, 1) and isinstance(np_[4], (int, float)) and math.isfinite(np_[4]))
    return bool(py_ok and np_ok)


RECORD_FIELDS: dict[str, Callable[[Any], bool]] = {
    "step": _count,
    "aliases": lambda v: isinstance(v, dict) and all(
        isinstance(k, str) and _KEY.fullmatch(k) and isinstance(x, str) and _KEY.fullmatch(x) for k, x in v.items()),
    "files": lambda v: file_list_problem(v) is None,
    "losses": lambda v: isinstance(v, list) and all(  # NaN and inf too: a diverged run logs them
        isinstance(x, (int, float)) and not isinstance(x, bool) for x in v),
    "tokens": _count,
    "world_size": lambda v: _count(v, 1),
    "finished": lambda v: isinstance(v, bool),
    "config": lambda v: isinstance(v, dict) and _plain(v),
    "fingerprint": lambda v: isinstance(v, dict) and _plain(v),
    "rng": _rng_ok,
}
"""Every field ``trainer.json`` may hold besides ``format`` and ``version`` (which :func:`load_record`
checks first), with its check. A field not listed is refused, like a value that fails its check."""
_REQUIRED = {FORMAT: ("step", "aliases", "files"), SHARDED_FORMAT: ("step", "world_size", "files")}
"""The fields each format's record must hold."""


def check_record(info: dict[str, Any], path: Path, fmt: str = FORMAT) -> None:
    """``trainer.json``'s ``info`` (a ``fmt`` record) checked field by field (:data:`RECORD_FIELDS`): no
    unknown field, each value of its type and range, the step that of the folder's name, aliases naming
    saved tensors only once loaded. :class:`CheckpointError` names the field and the fix."""
    unknown = sorted(set(info) - set(RECORD_FIELDS) - {"format", "version"})
    if unknown:
        raise _corrupt(path, f"{_INFO} holds unknown fields {unknown[:5]} (known: {sorted(RECORD_FIELDS)})")
    missing = [k for k in _REQUIRED[fmt] if k not in info]
    if missing:
        raise _corrupt(path, f"{_INFO} lacks {missing}")
    bad = [k for k, v in info.items() if k in RECORD_FIELDS and not RECORD_FIELDS[k](v)]
    if bad:
        raise _corrupt(path, f"{_INFO}'s field {bad[0]!r} has a value of the wrong type or out of range")
    m = _STEP_DIR.match(path.name)
    if m and int(m.group(1)) != info["step"]:
        raise _corrupt(path, f"{_INFO} says step {info['step']}, the folder is {path.name}")


def read_part(path: Path, name: str, ok: Callable[[Any], bool], what: str) -> Any:
    """The JSON file ``path/name`` of a checkpoint, read bounded (:func:`~shear.io.safe_archive.read_json_file`)
    and passing ``ok`` (``what`` it must be, for the message); :class:`CheckpointError` names the fix otherwise."""
    file = path / name
    if not file.is_file():
        raise _corrupt(path, f"{name} is missing")
    try:
        doc = read_json_file(file, str(file), _MAX_INFO)
    except CheckpointError as e:
        raise _corrupt(path, f"{name} does not parse ({e})") from e
    if not ok(doc):
        raise _corrupt(path, f"{name} is not {what}")
    return doc


def check_files(path: Path, files: dict[str, dict[str, Any]]) -> None:
    """Each file of a record's checked ``files`` list is in ``path`` with its size and sha256."""
    for f, entry in files.items():
        p = path / f
        if not p.is_file():
            raise _corrupt(path, f"{f} is missing")
        if p.stat().st_size != entry["size"]:
            raise _corrupt(path, f"{f} has {p.stat().st_size} bytes, the record says {entry['size']}")
        if sha256_file(p) != entry["sha256"]:
            raise _corrupt(path, f"{f} fails its sha256 check")


def load_record(path: Path, fmt: str = FORMAT, version: int = VERSION) -> dict[str, Any]:
    """``path/trainer.json`` read (:func:`read_part`) and checked: a ``fmt`` record of format ``version``
    whose fields pass :func:`check_record`. :class:`CheckpointError` names what is wrong and the fix."""
    info = read_part(path, _INFO, lambda v: isinstance(v, dict) and v.get("format") == fmt, f"a {fmt} record")
    saved = info.get("version", 0)
    if not is_int(saved, 0, _MAX_COUNT):
        raise _corrupt(path, f"{_INFO}'s version is {saved!r}, not a number")
    if saved > version:
        raise CheckpointError(f"{path} has format version {saved}; this shear reads up to {version}")
    if saved < version:
        raise CheckpointError(
            f"{path} was written by an older shear (format {saved}, without file hashes or the run fingerprint "
            "this one checks); start over with resume=False or a new checkpoint_dir"
        )
    check_record(info, path, fmt)
    return info


def load_checkpoint(path: str | os.PathLike[str]) -> TrainCheckpoint:
    """Read and validate ``path`` (a ``step-<n>`` directory); :class:`CheckpointError` says what is wrong."""
    path = Path(path)
    info = load_record(path)
    files = info["files"]
    if set(files) != {_WEIGHTS, _STATE}:
        raise _corrupt(path, f"{_INFO} does not list {_WEIGHTS} and {_STATE} with their hashes")
    unlisted = sorted(p.name for p in path.iterdir() if p.name not in files and p.name != _INFO)
    if unlisted:
        raise _corrupt(path, f"{unlisted} are not in {_INFO}'s file list")
    check_files(path, files)
    try:
        weights = load_file(str(path / _WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise _corrupt(path, f"{_WEIGHTS} cannot be read ({e})") from e
    model_state = {k: v.clone() for k, v in weights.items()}
    for alias, name in info["aliases"].items():
        if name not in model_state or alias in weights:
            raise _corrupt(path, f"{_INFO} aliases {alias!r} to {name!r}, which is not a single saved tensor")
        model_state[alias] = model_state[name]
    try:
        state = torch.load(path / _STATE, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for a damaged pickle/zip
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise _corrupt(path, f"{_STATE} cannot be read ({type(e).__name__}: {first})") from e
    return TrainCheckpoint(path=path, step=int(info["step"]), model_state=model_state, state=_clone_tree(state), info=info)
