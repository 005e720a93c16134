"""Sharded training checkpoints for FSDP2 runs, through ``torch.distributed.checkpoint`` (DCP).

``<checkpoint_dir>/step-<n>/`` of an FSDP run holds

* ``dcp/`` — the model (base weights too: LHSPG edits them) and the AdamW state, each rank writing
  its own shards (``torch.distributed.checkpoint.save`` of ``get_state_dict(model, optimizer)``);
* ``rank<r>.pt`` — rank ``r``'s scheduler, batch-stream and hook states and torch RNG states
  (read back with ``torch.load(weights_only=True)``); ``rank<r>.json`` its python/numpy RNG states;
* ``trainer.json`` — as for a single-process checkpoint (step, losses, config, fingerprint, ...) plus
  ``world_size``, and the size and sha256 of every other file (checked on load).

Every rank writes into one hidden temporary sibling that rank 0 created (its name is broadcast);
rank 0 renames it to ``step-<n>`` once every rank is done (:func:`shear.io.outputs.atomic_dir`),
so a killed run never leaves a ``step-<n>`` that looks valid. A resume must run on as many processes
as wrote the checkpoint (each rank's data position and RNG continue exactly); another world size is a
:class:`~shear.errors.CheckpointError` that names both.

Example:
    >>> save_sharded_checkpoint("ckpt", 4, model=sharded, optimizer=opt, rank_state={...},   # doctest: +SKIP
    ...                         rank_info={...}, info={"losses": [...]})
    >>> ck = load_sharded_checkpoint("ckpt/step-4", model=sharded, optimizer=opt)           # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from shear.errors import CheckpointError
from shear.io.outputs import atomic_dir, sha256_file
from shear.training.checkpoints import (
    RECORD_FIELDS,
    SHARDED_FORMAT,
    TrainCheckpoint,
    check_checkpoint_dir,
    check_files,
    list_checkpoints,
    load_record,
    read_part,
)

__all__ = [
    "SHARDED_FORMAT",
    "save_sharded_checkpoint",
    "load_sharded_checkpoint",
    "check_sharded_checkpoint",
    "read_record",
    "is_sharded_checkpoint",
]

VERSION = 1
_INFO = "trainer.json"
_DCP = "dcp"


def _rank() -> tuple[int, int]:
    return dist.get_rank(), dist.get_world_size()


def _files(root: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != _INFO:
            rel = p.relative_to(root).as_posix()
            out[rel] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    return out


def save_sharded_checkpoint(
    root: str | os.PathLike[str],
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    rank_state: dict[str, Any],
    rank_info: dict[str, Any],
    info: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write ``root/step-<step>`` from every rank (a collective); rank 0 keeps only the newest ``keep``."""
    from torch.distributed.checkpoint import save
    from torch.distributed.checkpoint.state_dict import get_state_dict

    rank, world = _rank()
    root = check_checkpoint_dir(root)
    final = root / f"step-{step}"
    msd, osd = get_state_dict(model, optimizer)
    if rank != 0:
        name: list[Any] = [None]
        dist.broadcast_object_list(name, src=0)
        tmp = Path(name[0])
        save({"model": msd, "optimizer": osd}, checkpoint_id=str(tmp / _DCP))
        torch.save(rank_state, tmp / f"rank{rank}.pt")
        (tmp / f"rank{rank}.json").write_text(json.dumps(rank_info))
        dist.barrier()  # every rank wrote
        dist.barrier()  # rank 0 renamed
        return final
    root.mkdir(parents=True, exist_ok=True)
    with atomic_dir(final) as tmp:
        dist.broadcast_object_list([str(tmp)], src=0)
        save({"model": msd, "optimizer": osd}, checkpoint_id=str(tmp / _DCP))
        torch.save(rank_state, tmp / f"rank{rank}.pt")
        (tmp / f"rank{rank}.json").write_text(json.dumps(rank_info))
        dist.barrier()
        record = {"format": SHARDED_FORMAT, "version": VERSION, "step": step, "world_size": world,
                  "files": _files(tmp), **info}
        (tmp / _INFO).write_text(json.dumps(record))
    for _, p in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
    dist.barrier()
    return final


def read_record(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The parsed ``trainer.json`` of a checkpoint directory, or None when it is missing or unreadable
    (the checkpoint's loader then says why). Parsed only, not checked: to tell the two formats apart."""
    try:
        record: dict[str, Any] = read_part(Path(path), _INFO, lambda v: isinstance(v, dict), "a JSON object")
    except CheckpointError:
        return None
    return record


def is_sharded_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` was written by an FSDP run (:func:`save_sharded_checkpoint`)."""
    record = read_record(path)
    return record is not None and record.get("format") == SHARDED_FORMAT


def check_sharded_checkpoint(path: str | os.PathLike[str], world_size: int) -> dict[str, Any]:
    """``trainer.json`` of the sharded checkpoint at ``path`` once it proved resumable by ``world_size`` ranks.

    Raises :class:`CheckpointError` naming the problem and the fix: not a sharded checkpoint, a record
    that fails the checks of ``trainer.json`` (:func:`~shear.training.checkpoints.load_record`), written by
    another number of processes, a file missing or failing its sha256.
    """
    path = Path(path)
    world = world_size
    parsed = read_record(path)
    if parsed is not None and parsed.get("format") != SHARDED_FORMAT:
        raise CheckpointError(
            f"checkpoint {path} is not a sharded (FSDP) checkpoint; it was written by a single-process or DDP "
            "run: resume it the way it was launched, or start over with resume=False or a new checkpoint_dir"
        )
    record = load_record(path, SHARDED_FORMAT, VERSION)
    saved = record["world_size"]
    if saved != world:
        raise CheckpointError(
            f"checkpoint {path} was written by {saved} processes and this run has {world}: each rank's data "
            f"position and random state belong to its rank, so the run resumes only on {saved} processes. "
            f"Relaunch with --nproc_per_node {saved} (torchrun) or --num_processes {saved} (accelerate launch), "
            "or start over with resume=False or a new checkpoint_dir"
        )
    check_files(path, record["files"])
    return record


def load_sharded_checkpoint(
    path: str | os.PathLike[str], *, model: nn.Module, optimizer: torch.optim.Optimizer
) -> TrainCheckpoint:
    """Load ``path`` into the sharded ``model`` and ``optimizer`` (a collective) and return this rank's states.

    The returned checkpoint's ``state`` holds this rank's ``scheduler``, ``batches``, ``hooks`` and
    ``rng``; ``info`` is ``trainer.json`` with this rank's python/numpy RNG states under ``rng``;
    ``model_state`` is empty (the weights are loaded already).
    """
    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = Path(path)
    rank, world = _rank()
    record = check_sharded_checkpoint(path, world)
    msd, osd = get_state_dict(model, optimizer)
    state: dict[str, Any] = {"model": msd, "optimizer": osd}
    load(state, checkpoint_id=str(path / _DCP))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    mine = torch.load(path / f"rank{rank}.pt", map_location="cpu", weights_only=True)
    info = dict(record)
    info["rng"] = read_part(path, f"rank{rank}.json", RECORD_FIELDS["rng"], f"rank {rank}'s python and numpy random states")
    return TrainCheckpoint(path=path, step=record["step"], model_state={}, state=mine, info=info)
