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
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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


@contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory next to ``final``; on success rename it to ``final``.

    If another process created ``final`` meanwhile, its entry wins and ours is discarded (both
    hold the same conversion). On an exception the temporary directory is removed.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        yield tmp
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
