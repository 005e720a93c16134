"""Reading a ``torch.export`` program archive without running code from it.

A ``program.pt2`` is a zip of records; most hold tensor data, but an archive can also carry pickled
custom objects, legacy pickled weights or compiled kernels, and loading those runs code. shear's
checkpoints hold tensors only, so :func:`check_program_archive` refuses any record outside
:data:`ARCHIVE_DATA` before torch opens the archive, and :func:`no_pickle` makes every
``torch.load`` inside the block ``weights_only=True``.

Example:
    >>> import io, zipfile, pathlib, tempfile
    >>> f = pathlib.Path(tempfile.mkdtemp()) / "program.pt2"
    >>> with zipfile.ZipFile(f, "w") as z:
    ...     z.writestr("program/custom_obj_0", b"...")
    >>> try:
    ...     check_program_archive(f)
    ... except CheckpointError as e:
    ...     print("refused")
    refused
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from shear.errors import CheckpointError

__all__ = ["ARCHIVE_DATA", "check_program_archive", "no_pickle"]


ARCHIVE_DATA = ("archive_format", "archive_version", "byteorder", ".data/", "models/", "data/weights/",
                 "data/constants/", "data/sample_inputs/", "extra/")
"""Records of a ``torch.export`` archive that hold data; anything else (compiled kernels, pickled
custom objects, legacy ``.pt`` weights) is refused before the archive is opened by torch."""


def check_program_archive(file: Path) -> None:
    """Refuse a ``program.pt2`` that would unpickle something: ``use_pickle`` payloads, pickled custom
    or opaque objects, legacy pickled weights, compiled code."""
    try:
        with zipfile.ZipFile(file) as z:
            for name in z.namelist():
                rel = name.split("/", 1)[1] if "/" in name else name
                leaf = rel.rsplit("/", 1)[-1]
                if not rel.startswith(ARCHIVE_DATA) or leaf.startswith(("custom_obj_", "opaque_obj_")) or (
                    rel.startswith(("data/weights/", "data/constants/")) and leaf.endswith(".pt")
                ):
                    raise CheckpointError(
                        f"{file}: the archive holds {name!r}, which would be loaded as code or a pickle; shear loads "
                        "only tensor data. Re-save the model with shear.save from a trusted source"
                    )
                if leaf.endswith("_config.json") and rel.startswith(("data/weights/", "data/constants/")):
                    entries = json.loads(z.read(name)).get("config", {})
                    pickled = sorted(k for k, v in entries.items() if isinstance(v, dict) and v.get("use_pickle"))
                    if pickled:
                        raise CheckpointError(
                            f"{file}: {name} stores {pickled[:3]} as pickles (use_pickle), which would run code on "
                            "load; shear loads only tensor data. Re-save the model with shear.save from a trusted source"
                        )
    except (zipfile.BadZipFile, json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise CheckpointError(f"{file} is not a readable program archive ({e}); re-save the model") from e


@contextmanager
def no_pickle(file: Path) -> Iterator[None]:
    """Within the block, ``torch.load`` reads only tensors (``weights_only=True``), whatever a caller asks."""
    real = torch.load

    def guarded(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("weights_only") is False:
            raise CheckpointError(f"{file}: the archive asks to unpickle an object, which could run code; refused")
        kwargs["weights_only"] = True
        return real(*args, **kwargs)

    torch.load = guarded  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.load = real
