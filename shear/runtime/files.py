"""Output directories that never lose a user's files, written atomically, and file digests.

Everything shear writes as a directory (``shear.save``, ``shear prune -o``, training checkpoints,
cached reference models) goes through two steps:

1. :func:`check_output_dir`, *before* any work: the path must not be a file, the input, the
   current directory or one of their parents; an existing non-empty directory is refused unless
   ``overwrite=True``; the parent must be writable and, when a size is given, have the space.
2. :func:`atomic_dir`: the content is written into a hidden sibling and swapped into place with a
   single atomic exchange (``renameat2(RENAME_EXCHANGE)`` on Linux), so at every instant the path
   holds either the complete old directory or the complete new one, never neither; the old one is
   then removed, nothing hidden is left behind.

Example:
    >>> from pathlib import Path
    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp())
    >>> out = check_output_dir(root / "model")
    >>> with atomic_dir(out) as tmp:
    ...     _ = (tmp / "weights.txt").write_text("ok")
    >>> (root / "model" / "weights.txt").read_text()
    'ok'
    >>> check_output_dir(root / "model")
    Traceback (most recent call last):
    ...
    shear.errors.OutputError: ... holds 1 file (weights.txt); pass overwrite=True (--overwrite) to replace it, or choose a new path
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import shutil
import stat
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from shear.errors import OutputError

__all__ = [
    "check_output_dir", "check_output_file", "check_writable_dir", "atomic_dir", "sha256_file", "interrupted_swap",
    "tree_size",
]

_OLD = ".old-"
"""Infix of the sibling that holds the previous directory while a non-Linux swap is in progress."""


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "x"
        >>> _ = p.write_bytes(b"")
        >>> sha256_file(p)[:12]
        'e3b0c44298fc'
    """
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def tree_size(path: Path) -> int:
    """Bytes of the regular files under ``path`` (0 when it does not exist)."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def _is_within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def _existing_ancestor(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_output_dir(
    path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike[str]] = (),
    needed_bytes: int = 0,
) -> Path:
    """Check that ``path`` may receive an output directory; return it (absolute).

    Refused with :class:`~shear.errors.OutputError`, whatever ``overwrite`` says: a path that is a
    file, that is (or contains) one of ``inputs`` or the current directory, a read-only existing
    directory, a parent that cannot be written, and fewer than ``needed_bytes`` free bytes. An
    existing non-empty directory is refused unless ``overwrite=True``. Nothing is created.

    Example:
        >>> import tempfile, pathlib
        >>> src = pathlib.Path(tempfile.mkdtemp())
        >>> check_output_dir(src, inputs=[src], overwrite=True)
        Traceback (most recent call last):
        ...
        shear.errors.OutputError: output path ... is the input; choose another output path ...
    """
    out = Path(os.path.abspath(Path(path).expanduser()))
    real = Path(os.path.realpath(out))
    for given in inputs:
        src = Path(os.path.realpath(Path(given).expanduser()))
        if _is_within(src, real):
            what = "is the input" if src == real else f"contains the input {src}"
            raise OutputError(f"output path {out} {what}; choose another output path (it would be replaced)")
    cwd = Path(os.path.realpath(Path.cwd()))
    if _is_within(cwd, real):
        raise OutputError(
            f"output path {out} is the current directory or one of its parents; choose a new folder, e.g. {out / 'pruned'}"
        )
    if real.exists() and not real.is_dir():
        raise OutputError(f"output path {out} is an existing file; a model is saved as a directory, choose a new path")
    if real.is_dir():
        entries = sorted(p.name for p in real.iterdir())
        if entries and not overwrite:
            shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            n = len(entries)
            raise OutputError(
                f"output path {out} holds {n} file{'s' if n > 1 else ''} ({shown}); pass overwrite=True "
                "(--overwrite) to replace it, or choose a new path"
            )
        if not os.access(real, os.W_OK | os.X_OK) or not real.stat().st_mode & 0o222:  # mode bits: root too
            raise OutputError(f"output path {out} is read-only; make it writable (chmod u+w) or choose another path")
    parent = _existing_ancestor(real.parent)
    if not parent.is_dir():
        raise OutputError(f"cannot create {out}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {out}: no write permission in {parent}; choose a path you can write")
    if needed_bytes > 0:
        free = shutil.disk_usage(parent).free
        if free < needed_bytes:
            raise OutputError(
                f"not enough space for {out}: {needed_bytes / 2**20:.1f} MiB needed, {free / 2**20:.1f} MiB free "
                f"on the disk of {parent}; free some space or choose another disk"
            )
    return out


def check_output_file(path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Check that a single output file (a drawing, a report) may be written at ``path``; return it.

    An existing file is refused unless ``overwrite=True``; a directory, or a parent that cannot be
    written, always.

    Example:
        >>> import tempfile, pathlib
        >>> check_output_file(pathlib.Path(tempfile.mkdtemp()))
        Traceback (most recent call last):
        ...
        shear.errors.OutputError: output file ... is a directory; give a file name, e.g. .../groups.svg
    """
    out = Path(os.path.abspath(Path(path).expanduser()))
    if out.is_dir():
        raise OutputError(f"output file {out} is a directory; give a file name, e.g. {out / 'groups.svg'}")
    if out.exists() and not overwrite:
        raise OutputError(f"output file {out} exists; pass overwrite=True (--overwrite) to replace it, or choose a new name")
    parent = _existing_ancestor(out.parent)
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {out}: no write permission in {parent}; choose a path you can write")
    return out


def check_writable_dir(path: str | os.PathLike[str]) -> Path:
    """Check that files may be added to the directory ``path`` (created when missing), such as the IR
    dumps of a compile; what is there already stays. Refuses a file and an unwritable place.

    Example:
        >>> import tempfile, pathlib
        >>> f = pathlib.Path(tempfile.mkdtemp()) / "x"
        >>> _ = f.write_text("mine")
        >>> check_writable_dir(f)
        Traceback (most recent call last):
        ...
        shear.errors.OutputError: ... is an existing file; give a directory
    """
    out = Path(os.path.abspath(Path(path).expanduser()))
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} is an existing file; give a directory")
    place = _existing_ancestor(out)
    if not place.is_dir() or not os.access(place, os.W_OK | os.X_OK) or not place.stat().st_mode & 0o222:
        raise OutputError(f"cannot write into {out}: no write permission in {place}; choose a path you can write")
    return out


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux ``renameat2``); False where the OS cannot."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _remove_tree(path: Path) -> None:
    """Remove a directory we own, making read-only parts writable on the way."""

    def retry(func: object, p: str, _exc: object) -> None:
        os.chmod(os.path.dirname(p), stat.S_IRWXU)
        if os.path.isdir(p) and not os.path.islink(p):
            os.chmod(p, stat.S_IRWXU)
            shutil.rmtree(p, onerror=retry)
        else:
            os.unlink(p)

    if path.is_dir() and not path.is_symlink():
        os.chmod(path, stat.S_IRWXU)
        shutil.rmtree(path, onerror=retry)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _fsync_tree(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with f.open("rb+") as fh:
                os.fsync(fh.fileno())


@contextmanager
def atomic_dir(path: Path, *, replace: bool = True, private: bool = False) -> Iterator[Path]:
    """Yield a fresh hidden sibling of ``path``; on success it becomes ``path``, on error it is removed.

    When ``path`` exists at the end, ``replace=True`` swaps it out atomically and removes it (check
    first with :func:`check_output_dir`); ``replace=False`` keeps it and discards ours (a concurrent
    writer of the same content, e.g. a cache entry, won). ``private`` keeps ``mkdtemp``'s 0700 mode.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    if not private:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # an output is an ordinary directory
    try:
        yield tmp
        _fsync_tree(tmp)
        try:
            os.rename(tmp, path)  # path absent (or an empty directory)
            return
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise
        if not replace:
            if not path.is_dir():
                raise OutputError(f"{path} exists and is not a directory; remove it or choose another path")
            return  # finally removes ours
        if _exchange(tmp, path):
            return  # tmp now holds the old directory; finally removes it
        old = path.parent / f".{path.name}{_OLD}{uuid.uuid4().hex[:8]}"
        os.replace(path, old)  # no atomic exchange here: interrupted_swap() finds this sibling
        os.replace(tmp, path)
        _remove_tree(old)
    finally:
        if tmp.exists():
            _remove_tree(tmp)


def interrupted_swap(path: Path) -> list[Path]:
    """Siblings a save killed between its two renames left (only where no atomic exchange exists)."""
    if not path.parent.is_dir():
        return []
    return sorted(p for p in path.parent.glob(f".{path.name}{_OLD}*") if p.is_dir())
