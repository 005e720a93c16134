"""Write a safetensors file one tensor at a time, with every shape known before the first byte.

``safetensors.torch.save_file`` needs the whole state dict in memory. A streamed prune knows every
output tensor's name, dtype and shape from the plan before it reads any weight, so it writes the
header first and appends each tensor as soon as it is sliced; memory stays at one tensor. The file
is the standard format (8-byte little-endian header length, JSON header padded to 8 bytes, the
data in header order), readable by ``safe_open``, ``load_file`` and ``from_pretrained``.

Example:
    >>> import tempfile, pathlib, torch
    >>> from safetensors.torch import load_file
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "x.safetensors"
    >>> with SafetensorsWriter(p, [("a", torch.float32, (2,)), ("b", torch.bfloat16, (1, 2))]) as w:
    ...     w.write("a", torch.ones(2)); w.write("b", torch.zeros(1, 2, dtype=torch.bfloat16))
    >>> load_file(str(p))["a"].tolist()
    [1.0, 1.0]
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import torch

from shear.errors import CheckpointError
from shear.scale.shards import DTYPES

__all__ = ["SafetensorsWriter"]

_CODES = {v: k for k, v in DTYPES.items()}


class SafetensorsWriter:
    """Context manager: the header goes out on entry, :meth:`write` appends tensors in declared order."""

    def __init__(
        self, path: Path, entries: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.path = path
        self.entries = list(entries)
        self.metadata = dict(metadata or {"format": "pt"})
        self._next = 0
        self._file: BinaryIO | None = None

    def _header(self) -> bytes:
        header: dict[str, object] = {"__metadata__": self.metadata}
        offset = 0
        for name, dtype, shape in self.entries:
            if dtype not in _CODES:
                raise CheckpointError(f"{self.path}: tensor {name} has dtype {dtype}, which safetensors cannot hold")
            n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        return struct.pack("<Q", len(raw)) + raw

    def __enter__(self) -> SafetensorsWriter:
        self._file = self.path.open("wb")
        self._file.write(self._header())
        return self

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor``, which must be the next declared entry with its dtype and shape."""
        if self._file is None:
            raise CheckpointError(f"{self.path}: write() outside the writer's with-block")
        if self._next >= len(self.entries):
            raise CheckpointError(f"{self.path}: tensor {name} is one more than the {len(self.entries)} declared")
        want, dtype, shape = self.entries[self._next]
        if name != want or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise CheckpointError(
                f"{self.path}: expected {want} {dtype} {tuple(shape)} next, got {name} {tensor.dtype} {tuple(tensor.shape)}"
            )
        t = tensor.detach().cpu().contiguous()
        if t.numel():
            self._file.write(t.reshape(-1).view(torch.uint8).numpy().data)
        self._next += 1

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._file is not None
        self._file.close()
        self._file = None
        if exc_type is None and self._next != len(self.entries):
            missing = [n for n, _, _ in self.entries[self._next:]]
            raise CheckpointError(f"{self.path}: {len(missing)} declared tensors were not written (e.g. {missing[0]})")
