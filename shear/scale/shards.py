"""Read a safetensors checkpoint tensor by tensor, checked first, never modified.

A Hugging Face model directory holds ``model.safetensors`` or shards listed in
``model.safetensors.index.json``. :meth:`ShardedCheckpoint.open` reads only the headers (a few KiB
per shard) and checks, before any work starts, that every shard the index names is there, that its
header parses and that the file is as long as the header says (a truncated download is caught
here, not halfway through a prune). When the directory carries shear's manifest (``shear.json``,
written by :func:`shear.save` and by a streamed prune), sizes are compared with it and, with
``integrity=True``, sha256 too. Each problem is a :class:`~shear.errors.CheckpointError` naming
the file and the fix.

:meth:`ShardedCheckpoint.read` opens the shard with ``safe_open`` (read-only memory map), takes one
tensor and closes the file again: the tensor's pages are resident only while the tensor lives, so
reading a 13 GB model tensor by tensor keeps the resident set near the size of one tensor.

Example:
    >>> ckpt = ShardedCheckpoint.open("llama-7b/")                      # doctest: +SKIP
    >>> ckpt.info("model.layers.0.mlp.up_proj.weight").shape            # doctest: +SKIP
    (11008, 4096)
    >>> w = ckpt.read("model.layers.0.mlp.up_proj.weight")              # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from shear.errors import CheckpointError
from shear.io.outputs import sha256_file

__all__ = ["DTYPES", "TensorInfo", "ShardedCheckpoint", "INDEX", "SINGLE"]

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
"""safetensors dtype code -> torch dtype."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its shard, dtype, shape and byte range in the data section."""

    name: str
    file: str
    """Shard file name, relative to the checkpoint directory."""
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def _fix(root: Path) -> str:
    return f"copy or download the checkpoint in {root} again"


def _read_header(root: Path, file: str) -> tuple[dict[str, TensorInfo], int]:
    """The tensors of one shard and the file size its header implies; checks the file against it."""
    path = root / file
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint lists it but it is not there; {_fix(root)}")
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path} is truncated ({size} bytes, not even a header); {_fix(root)}")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100 << 20):
                raise CheckpointError(f"{path} is corrupt or truncated: header of {n} bytes in a {size}-byte file; {_fix(root)}")
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is corrupt: its safetensors header is not JSON ({e}); {_fix(root)}") from e
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read ({e}); check its permissions or {_fix(root)}") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is corrupt: its safetensors header is not a table; {_fix(root)}")
    out: dict[str, TensorInfo] = {}
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(int(s) for s in entry["shape"])
            start, stop = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path} is corrupt: header entry {name!r} is malformed ({e}); {_fix(root)}") from e
        out[name] = TensorInfo(name, file, dtype, shape, start, stop)
        end = max(end, stop)
    expected = 8 + n + end
    if size != expected:
        what = "truncated" if size < expected else "longer than its header says (corrupt)"
        raise CheckpointError(f"{path} is {what}: {size} bytes, its header says {expected}; {_fix(root)}")
    return out, expected


@dataclass(frozen=True)
class ShardedCheckpoint:
    """The safetensors tensors of a model directory, by name, read one at a time."""

    root: Path
    tensors: dict[str, TensorInfo]
    files: tuple[str, ...]
    """Shard names in the order the index lists them (one file for an unsharded model)."""
    sharded: bool
    """True when the weights come with ``model.safetensors.index.json``."""

    @classmethod
    def open(cls, root: str | os.PathLike[str], *, integrity: bool = False) -> ShardedCheckpoint:
        """Read the index and every shard's header; raise :class:`CheckpointError` on a missing,
        truncated or corrupt shard, or (``integrity``) one whose sha256 differs from ``shear.json``."""
        root = Path(root)
        if not root.is_dir():
            raise CheckpointError(f"{root} is not a directory; pass the model directory (config.json and safetensors)")
        index = root / INDEX
        weight_map: dict[str, str] | None = None
        if index.is_file():
            try:
                data = json.loads(index.read_text())
                weight_map = dict(data["weight_map"])
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
                raise CheckpointError(f"{index} is corrupt ({type(e).__name__}: {e}); {_fix(root)}") from e
            bad = sorted({f for f in weight_map.values() if not isinstance(f, str) or "/" in f or f.startswith(".")})
            if bad:
                raise CheckpointError(f"{index} names shards outside the directory: {bad[:3]}; refused")
            files = tuple(dict.fromkeys(weight_map.values()))
        elif (root / SINGLE).is_file():
            files = (SINGLE,)
        else:
            raise CheckpointError(
                f"{root} has no safetensors weights ({SINGLE} or {INDEX}); streaming reads only safetensors: "
                "convert the checkpoint (e.g. from_pretrained then save_pretrained(safe_serialization=True))"
            )
        manifest = _manifest_files(root)
        tensors: dict[str, TensorInfo] = {}
        for file in files:
            infos, size = _read_header(root, file)
            listed = manifest.get(file)
            if listed is not None:
                if size != listed.get("size"):
                    raise CheckpointError(f"{root / file} has {size} bytes, shear.json says {listed.get('size')}; {_fix(root)}")
                if integrity and sha256_file(root / file) != listed.get("sha256"):
                    raise CheckpointError(f"{root / file} fails its sha256 check against shear.json (corrupt); {_fix(root)}")
            for name, info in infos.items():
                if weight_map is not None and weight_map.get(name, file) != file:
                    continue  # the index puts it elsewhere
                tensors[name] = info
        if weight_map is not None:
            missing = sorted(n for n, f in weight_map.items() if n not in tensors)
            if missing:
                raise CheckpointError(
                    f"{index} lists {len(missing)} tensors that their shards do not hold (e.g. {missing[0]!r} in "
                    f"{weight_map[missing[0]]}); {_fix(root)}"
                )
        return cls(root, tensors, files, weight_map is not None)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.root} has no tensor {name!r}; the checkpoint does not match the config") from None

    def read(self, name: str) -> torch.Tensor:
        """One tensor, memory-mapped from its shard (read-only; clone before writing into it)."""
        info = self.info(name)
        path = self.root / info.file
        try:
            with safe_open(str(path), framework="pt") as f:
                t = f.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: cannot read tensor {name!r} ({e}); {_fix(self.root)}") from e
        if t.dtype != info.dtype or tuple(t.shape) != info.shape:
            raise CheckpointError(f"{path}: tensor {name!r} is {t.dtype} {tuple(t.shape)}, its header said otherwise")
        return t

    def order(self) -> list[str]:
        """Tensor names in on-disk order (shard, then offset): reading in this order streams each file once."""
        rank = {f: i for i, f in enumerate(self.files)}
        return sorted(self.tensors, key=lambda n: (rank[self.tensors[n].file], self.tensors[n].start))

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def _manifest_files(root: Path) -> dict[str, dict[str, object]]:
    """``files`` of a ``shear.json`` in ``root`` (empty when there is none or it is unreadable)."""
    mf = root / "shear.json"
    if not mf.is_file():
        return {}
    try:
        files = json.loads(mf.read_text()).get("files", {})
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise CheckpointError(f"{mf} is corrupt ({e}); {_fix(root)}") from e
    return files if isinstance(files, dict) else {}
