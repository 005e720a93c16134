"""Where converted reference models are cached, and how a cache entry is written atomically.

The cache root is, in order: the ``cache_dir`` argument, the ``SHEAR_CACHE`` environment
variable, ``~/.cache/shear``. An entry is a directory written under a temporary name in the same
root and renamed into place, so a crash or a concurrent writer never leaves a half-written entry.

Example:
    >>> from pathlib import Path
    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp())
    >>> with atomic_directory(root / "entry") as tmp:
    ...     _ = (tmp / "weights.txt").write_text("ok")
    >>> (root / "entry" / "weights.txt").read_text()
    'ok'
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager
from pathlib import Path

from shear.io.outputs import atomic_dir

__all__ = ["CACHE_ENV", "resolve_cache_dir", "atomic_directory"]

CACHE_ENV = "SHEAR_CACHE"
"""Environment variable naming the cache root."""


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cache root: ``cache_dir`` if given, else ``$SHEAR_CACHE``, else ``~/.cache/shear``.

    Example:
        >>> resolve_cache_dir("/tmp/x").as_posix()
        '/tmp/x'
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "shear"


def atomic_directory(final: Path) -> AbstractContextManager[Path]:
    """Yield a fresh temporary directory next to ``final``; on success rename it to ``final``.

    If another process created ``final`` meanwhile, its entry wins and ours is discarded (both
    hold the same conversion). On an exception the temporary directory is removed. This is
    :func:`shear.io.outputs.atomic_dir` with ``replace=False``.
    """
    return atomic_dir(final, replace=False)
