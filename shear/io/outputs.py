"""Outputs that never lose a user's files: one guard for every path shear writes, atomic writes, digests.

Everything shear writes goes through this module: model folders (``shear.save``, ``shear prune -o``,
``stream-prune``), training checkpoints, the HTML report, drawings, GGUF files, the knowledge cache,
IR dumps and figures. Each write has two steps:

1. A check *before any work*: :func:`check_output_dir` (a folder that is replaced as a whole),
   :func:`check_output_file` (one file), :func:`check_writable_dir` (a folder shear adds files to,
   such as ``--dump-dir``). Always refused, whatever ``overwrite`` says: a path equal to, inside or
   around one of the ``inputs`` (the model folder, data files), the current directory or a parent of
   it, a symbolic link (dangling or not: give the real path), a folder where a file is expected and
   the reverse. Refused unless ``overwrite=True``: a non-empty folder or an existing file shear did
   not write. The check records a fingerprint of the path (inode, and for a folder the listing with
   sizes and times).
2. The write goes to a hidden sibling ``.<name>.tmp-XXXX/`` (marked as shear's with a small
   ``.shear-partial`` file naming the writing process) and is moved into place at the end,
   *re-checked*: the path must still be what was checked. A path that was absent is claimed with
   ``renameat2(RENAME_NOREPLACE)`` on Linux (elsewhere: check, then rename, with a short window
   between the two); an empty folder with a plain ``rename``, which the OS refuses once anything was
   put into it; an existing folder or file is swapped with ``renameat2(RENAME_EXCHANGE)`` and the
   swapped-out one is compared with the fingerprint again (swapped back when it differs). Where the
   OS has no exchange the old folder is first moved to a ``.<name>.old-XXXX`` sibling
   (:func:`interrupted_swap` finds it when a kill lands between the two renames). At every instant
   the path holds the whole old or the whole new output, and a path that changed since it was checked
   is never replaced: :class:`~shear.errors.OutputError`, the new output discarded.

A run killed mid-write leaves its hidden sibling; the next check of the same path (or of the folder
shear adds files to) removes the ones it can prove are shear's (the marker names a process that is
gone) and warns about the rest. An ``OSError`` while writing (a full disk, ``ENOSPC``) becomes an
:class:`~shear.errors.OutputError` naming the path and saying the previous content is untouched.
Files get the modes of an ordinary write (``0666`` and folders ``0777`` less the umask).

A folder shear adds files to (IR dumps, figures) holds ``shear-files.json``, the sha256 of each file
shear wrote there; :func:`write_owned` replaces a file only when that record says shear wrote it
(and it is unchanged), or when its caller passes ``overwrite=True``.

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
import fnmatch
import hashlib
import json
import os
import shutil
import socket
import stat
import tempfile
import threading
import uuid
import warnings
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

from shear.errors import OutputError

__all__ = [
    "check_output_dir", "check_output_file", "check_writable_dir", "check_parent", "atomic_dir", "atomic_file",
    "write_owned", "owned_file", "sha256_file", "interrupted_swap", "tree_size", "RECORD",
]

_OLD = ".old-"
"""Infix of the sibling that holds the previous directory while a non-Linux swap is in progress."""
_TMP = ".tmp-"
"""Infix of the hidden sibling a write goes to before it is moved into place."""
_MARK = ".shear-partial"
"""File inside every hidden sibling shear writes to: proof that it is shear's, and by which process."""
RECORD = "shear-files.json"
"""The record of the files shear wrote into a folder it adds files to (dumps, figures)."""
_RECORD_FORMAT = "shear-files"
_AT_FDCWD, _RENAME_NOREPLACE, _RENAME_EXCHANGE = -100, 1, 2

_lock = threading.Lock()
_checked: dict[str, _Fingerprint] = {}
"""Absolute path -> its fingerprint when last checked (consumed by the write that follows)."""
_active: set[str] = set()
"""Hidden siblings this process is writing right now (never cleaned as leftovers)."""


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


# -- fingerprints ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Fingerprint:
    """What a path was when it was checked: its kind (``absent``, ``file``, ``dir``, ``link``,
    ``other``), device and inode, and for a folder every entry below it with its size and mtime.
    Two equal fingerprints mean nothing was added, removed, replaced or rewritten in between."""

    kind: str
    ident: tuple[int, int] = (0, 0)
    listing: tuple[tuple[str, bool, int, int], ...] = ()

    def describe(self) -> str:
        """A few words for a message: ``absent``, ``a file``, ``an empty folder``, ``a folder of 3 entries``."""
        if self.kind == "dir":
            n = len(self.listing)
            return f"a folder of {n} entr{'y' if n == 1 else 'ies'}" if n else "an empty folder"
        return {"absent": "absent", "file": "a file", "link": "a symbolic link"}.get(self.kind, "a special file")


def _fingerprint(path: str | os.PathLike[str]) -> _Fingerprint:
    """The :class:`_Fingerprint` of ``path`` now (symbolic links are not followed)."""
    p = os.fspath(path)
    try:
        st = os.lstat(p)
    except (FileNotFoundError, NotADirectoryError):  # not there, or a parent is a file
        return _Fingerprint("absent")
    ident = (st.st_dev, st.st_ino)
    if stat.S_ISLNK(st.st_mode):
        return _Fingerprint("link", ident, ((os.readlink(p), False, 0, 0),))
    if stat.S_ISREG(st.st_mode):
        return _Fingerprint("file", ident, (("", False, st.st_size, st.st_mtime_ns),))
    if not stat.S_ISDIR(st.st_mode):
        return _Fingerprint("other", ident)
    listing: list[tuple[str, bool, int, int]] = []
    for root, dirs, names in os.walk(p):
        for d in dirs:
            listing.append((os.path.relpath(os.path.join(root, d), p), True, 0, 0))
        for n in names:
            try:
                s = os.lstat(os.path.join(root, n))
            except FileNotFoundError:
                continue
            listing.append((os.path.relpath(os.path.join(root, n), p), False, s.st_size, s.st_mtime_ns))
    return _Fingerprint("dir", ident, tuple(sorted(listing)))


def _remember(path: Path) -> None:
    with _lock:
        _checked[str(path)] = _fingerprint(path)


def _expected(path: Path) -> _Fingerprint:
    """The fingerprint the last check of ``path`` recorded (consumed), else the path as it is now."""
    with _lock:
        record = _checked.pop(str(path), None)
    return record if record is not None else _fingerprint(path)


# -- checks ------------------------------------------------------------------------------------


def _is_within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def _existing_ancestor(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _absolute(path: str | os.PathLike[str]) -> Path:
    return Path(os.path.abspath(Path(path).expanduser()))


def _refuse_link(out: Path, what: str) -> None:
    if out.is_symlink():
        target = os.readlink(out)
        dangling = "" if out.exists() else " that points nowhere (dangling)"
        raise OutputError(
            f"{what} {out} is a symbolic link{dangling} (to {target}); give a real path: a new name, or the "
            "folder the link points to"
        )


def _refuse_inputs(out: Path, inputs: Iterable[str | os.PathLike[str] | None], what: str) -> None:
    """An output may not be an input, lie inside one, or contain one (it would be replaced)."""
    real = Path(os.path.realpath(out))
    for given in inputs:
        if given is None or not str(given):
            continue
        src = Path(os.path.realpath(Path(given).expanduser()))
        if src == real:
            raise OutputError(f"{what} {out} is the input; choose another output path (it would be replaced)")
        if _is_within(real, src):
            raise OutputError(
                f"{what} {out} is inside the input {src}; write outside it (shear never changes its inputs), "
                f"e.g. {src.parent / (src.name + '-pruned')}"
            )
        if _is_within(src, real):
            raise OutputError(f"{what} {out} contains the input {src}; choose another output path (it would be replaced)")


def check_parent(path: str | os.PathLike[str], what: str, *, inside: bool = False) -> Path:
    """Refuse (:class:`~shear.errors.OutputError`) a ``path`` that cannot be written: the nearest
    existing folder above it (at or above it with ``inside=True``: a folder shear writes files into)
    is a file, or cannot be written (its mode bits too, which root's ``os.access`` ignores). Returns
    that folder. ``what`` names the path in the message (``output file``, ``checkpoint_dir``).

    Example:
        >>> import tempfile, pathlib
        >>> f = pathlib.Path(tempfile.mkdtemp()) / "f"
        >>> _ = f.write_text("mine")
        >>> check_parent(f / "report.html", "output file")
        Traceback (most recent call last):
        ...
        shear.errors.OutputError: output file .../f/report.html is inside .../f, which is a file, not a folder; ...
    """
    out = _absolute(path)
    place = _existing_ancestor(out if inside else out.parent)
    if not place.is_dir():
        if place == out:
            raise OutputError(f"{what} {out} is a file, not a folder; give a new folder")
        raise OutputError(f"{what} {out} is inside {place}, which is a file, not a folder; choose a path outside {place}")
    if not os.access(place, os.W_OK | os.X_OK) or not place.stat().st_mode & 0o222:
        raise OutputError(f"cannot write {what} {out}: no write permission in {place}; choose a path you can write")
    return place


def check_output_dir(
    path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike[str] | None] = (),
    needed_bytes: int = 0,
) -> Path:
    """Check that ``path`` may receive an output directory; return it (absolute).

    Refused with :class:`~shear.errors.OutputError`, whatever ``overwrite`` says: a path that is a
    file or a symbolic link, that is, lies inside or contains one of ``inputs`` or the current
    directory, a read-only existing directory, a parent that cannot be written, and fewer than
    ``needed_bytes`` free bytes. An existing non-empty directory is refused unless
    ``overwrite=True``. Nothing is created; shear's own leftovers from a killed write to the same
    path are removed. The path's fingerprint is recorded: :func:`atomic_dir` replaces only what was
    checked.

    Example:
        >>> import tempfile, pathlib
        >>> src = pathlib.Path(tempfile.mkdtemp())
        >>> check_output_dir(src, inputs=[src], overwrite=True)
        Traceback (most recent call last):
        ...
        shear.errors.OutputError: output path ... is the input; choose another output path ...
    """
    out = _absolute(path)
    _refuse_link(out, "output path")
    _refuse_inputs(out, inputs, "output path")
    real = Path(os.path.realpath(out))
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
    parent = check_parent(real, "output path")
    if needed_bytes > 0:
        free = shutil.disk_usage(parent).free
        if free < needed_bytes:
            raise OutputError(
                f"not enough space for {out}: {needed_bytes / 2**20:.1f} MiB needed, {free / 2**20:.1f} MiB free "
                f"on the disk of {parent}; free some space or choose another disk"
            )
    _clean_leftovers(out.parent, f".{out.name}{_TMP}*", out)
    _remember(out)
    return out


def check_output_file(
    path: str | os.PathLike[str], *, overwrite: bool = False, inputs: Iterable[str | os.PathLike[str] | None] = ()
) -> Path:
    """Check that a single output file (a drawing, a report, a GGUF file) may be written at ``path``; return it.

    An existing file is refused unless ``overwrite=True``; a directory, a symbolic link, a special
    file (a FIFO, a socket, a device), a path equal to or inside one of ``inputs`` (``--report
    <model>/config.json``), or a parent that cannot be written (:func:`check_parent`), always.
    Records the fingerprint :func:`atomic_file` compares at the final rename.

    Example:
        >>> import tempfile, pathlib
        >>> check_output_file(pathlib.Path(tempfile.mkdtemp()))
        Traceback (most recent call last):
        ...
        shear.errors.OutputError: output file ... is a directory; give a file name, e.g. .../groups.svg
    """
    out = _absolute(path)
    if out.is_dir() and not out.is_symlink():
        raise OutputError(f"output file {out} is a directory; give a file name, e.g. {out / 'groups.svg'}")
    _refuse_link(out, "output file")
    _refuse_inputs(out, inputs, "output file")
    if out.exists() and not out.is_file():
        raise OutputError(
            f"output file {out} is a special file (a FIFO, a socket or a device), not a regular file; give a new file name"
        )
    if out.exists() and not overwrite:
        raise OutputError(f"output file {out} exists; pass overwrite=True (--overwrite) to replace it, or choose a new name")
    check_parent(out, "output file")
    _clean_leftovers(out.parent, f".{out.name}{_TMP}*", out)
    _remember(out)
    return out


def _ours(p: Path, record: dict[str, str]) -> bool:
    """Whether ``p`` is a regular file that shear's ``record`` lists with its sha256 now (unreadable: no)."""
    try:
        return p.name in record and p.is_file() and not p.is_symlink() and record[p.name] == sha256_file(p)
    except OSError:
        return False


def _foreign(folder: Path) -> list[str]:
    """Entries of ``folder`` that shear's record there does not vouch for (absent, changed since or
    unreadable). Hidden ``.<name>.tmp-*`` leftovers of interrupted writes are not counted: shear
    never writes a name that starts with a dot, so they are never replaced."""
    record = _read_record(folder)
    return [
        p.name for p in sorted(folder.iterdir())
        if p.name != RECORD and not fnmatch.fnmatch(p.name, f".*{_TMP}*") and not _ours(p, record)
    ]


def check_writable_dir(
    path: str | os.PathLike[str], *, overwrite: bool = False, inputs: Iterable[str | os.PathLike[str] | None] = ()
) -> Path:
    """Check that shear may add files to the directory ``path`` (created when missing), such as the IR
    dumps of a compile; return it.

    A new or empty folder, or one holding only files shear wrote there earlier (its
    ``shear-files.json`` record lists them, unchanged), is fine: shear's own files are replaced.
    A folder holding anything else is refused unless ``overwrite=True`` (then files of the same
    names are replaced; the others stay: give the same ``overwrite`` to :func:`write_owned`). Always
    refused: a file, a symbolic link, a path equal to, inside or around one of ``inputs``, an
    unwritable place. Hidden leftovers of killed writes inside it that are provably shear's are removed.

    Example:
        >>> import tempfile, pathlib
        >>> f = pathlib.Path(tempfile.mkdtemp()) / "x"
        >>> _ = f.write_text("mine")
        >>> check_writable_dir(f)
        Traceback (most recent call last):
        ...
        shear.errors.OutputError: ... is an existing file; give a directory
    """
    out = _absolute(path)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} is an existing file; give a directory")
    _refuse_link(out, "folder")
    _refuse_inputs(out, inputs, "folder")
    check_parent(out, "folder", inside=True)
    _clean_leftovers(out, f".*{_TMP}*", out)
    if out.is_dir() and not overwrite:
        foreign = _foreign(out)
        if foreign:
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise OutputError(
                f"folder {out} holds {len(foreign)} file(s) shear did not write there ({shown}); its files of "
                "the same names would be replaced: choose a new or empty folder, or pass overwrite=True (--overwrite)"
            )
    return out


# -- leftovers ---------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _dead_writer(tmp: Path) -> bool | None:
    """True when ``tmp`` is shear's and its writer is gone, False while it runs, None when not provably shear's."""
    try:
        mark = json.loads((tmp / _MARK).read_text())
        pid, host = int(mark["pid"]), str(mark["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if host != socket.gethostname():
        return None
    if pid == os.getpid():
        with _lock:
            return str(tmp) not in _active
    return not _alive(pid)


def _clean_leftovers(folder: Path, pattern: str, out: Path) -> None:
    """Remove the hidden ``pattern`` (``.<name>.tmp-*``) entries of ``folder`` that killed writes of
    ``out`` left and that are provably shear's (their marker names a process that is gone); warn
    about the ones shear cannot prove are its own, left as they are (writes in progress too)."""
    if not folder.is_dir():
        return
    left = []
    for p in sorted(folder.glob(pattern)):
        dead = _dead_writer(p) if p.is_dir() and not p.is_symlink() else None
        if dead:
            _remove_tree(p)
        elif dead is None:
            left.append(p)
    if left:
        warnings.warn(
            f"{out}: {len(left)} hidden leftover(s) of an interrupted write that shear cannot prove are its own "
            f"({', '.join(p.name for p in left[:3])}); remove them if you do not need them",
            stacklevel=3,
        )


# -- moving into place -------------------------------------------------------------------------


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2(src, dst, flags)``; False where the OS or the filesystem has no such call."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux ``renameat2``); False where the OS cannot."""
    return _renameat2(a, b, _RENAME_EXCHANGE)


def _claim(src: Path, dst: Path) -> None:
    """Move ``src`` to the absent ``dst``, never replacing what appeared there: ``RENAME_NOREPLACE``
    on Linux; elsewhere a check, then ``os.replace`` (a short window between the two)."""
    try:
        if _renameat2(src, dst, _RENAME_NOREPLACE):
            return
    except FileExistsError:
        raise _changed(dst, _Fingerprint("absent"), _fingerprint(dst)) from None
    if os.path.lexists(dst):
        raise _changed(dst, _Fingerprint("absent"), _fingerprint(dst))
    os.replace(src, dst)


def _changed(path: Path, then: _Fingerprint, now: _Fingerprint) -> OutputError:
    return OutputError(
        f"{path} changed while shear was writing it ({then.describe()} when checked, {now.describe()} now); "
        "nothing there was replaced and the new output was discarded: run again with a new path (or check "
        "what else writes there)"
    )


def _place(new: Path, path: Path, expected: _Fingerprint, replace: bool) -> None:
    """Move the finished ``new`` to ``path`` if ``path`` is still ``expected`` (see the module doc)."""
    now = _fingerprint(path)
    if now.kind == "absent":  # absent when checked, or removed since: claimed, never replacing what appears
        _claim(new, path)
        return
    if now != expected:
        if not replace and now.kind in ("dir", "file"):
            return  # a concurrent writer of the same entry (a cache) won; ours is discarded
        raise _changed(path, expected, now)
    if now.kind == "dir" and not now.listing and new.is_dir():
        try:
            os.rename(new, path)  # replaces an empty folder only: refused once anything is in it
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise _changed(path, expected, _fingerprint(path)) from e
            raise
        return
    if not replace:
        return
    if now.kind not in ("dir", "file") or (now.kind == "dir") != new.is_dir():
        raise OutputError(f"{path} is {now.describe()}; it cannot be replaced by a {'folder' if new.is_dir() else 'file'}")
    if _exchange(new, path):
        if _fingerprint(new) != expected:  # something else got there between the check and the swap
            _exchange(new, path)
            raise _changed(path, expected, _fingerprint(path))
        return  # ``new`` now holds the old content; the caller removes it
    old = path.parent / f".{path.name}{_OLD}{uuid.uuid4().hex[:8]}"
    os.replace(path, old)  # no atomic exchange here: interrupted_swap() finds this sibling
    if _fingerprint(old) != expected:  # moved something else aside: put it back
        if not os.path.lexists(path):
            os.replace(old, path)
        raise _changed(path, expected, _fingerprint(old))
    os.replace(new, path)
    _remove_tree(old)


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
    for f in [path] if path.is_file() else path.rglob("*"):
        if f.is_file() and not f.is_symlink():
            with f.open("rb+") as fh:
                os.fsync(fh.fileno())


def _umask() -> int:
    with _lock:
        mask = os.umask(0)
        os.umask(mask)
    return mask


def _ordinary_modes(path: Path) -> None:
    """Give every file ``0666`` and every folder ``0777`` less the umask, as a plain write would
    (some writers, e.g. safetensors, create files ``0600``)."""
    mask = _umask()
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if p.is_symlink():
            continue
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def _write_error(path: Path, e: OSError, existed: bool) -> OutputError:
    full = " (the disk is full: free some space or choose another disk)" if e.errno in (errno.ENOSPC, errno.EDQUOT) else ""
    kept = f"the previous content of {path} is untouched" if existed else f"nothing was written at {path}"
    return OutputError(f"cannot write {path}: {e.strerror or e} ({e.filename or path}){full}; {kept}")


@contextmanager
def _atomic(path: Path, folder: bool, replace: bool = True) -> Iterator[Path]:
    """Yield a fresh folder (``folder=True``) or a file path in a hidden sibling ``.<name>.tmp-XXXX/``
    of ``path``, marked as this process's; on success it becomes ``path`` (:func:`_place`), on error
    it is removed and ``path`` is untouched; an ``OSError`` becomes an :class:`~shear.errors.OutputError`."""
    expected = _expected(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        wrapper = Path(tempfile.mkdtemp(prefix=f".{path.name}{_TMP}", dir=path.parent))
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e} ({e.filename or path.parent}); choose a path you can write") from e
    with _lock:
        _active.add(str(wrapper))
    new = wrapper / ("new" if folder else path.name)
    try:
        (wrapper / _MARK).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "target": path.name}))
        if folder:
            new.mkdir(mode=0o700)
        yield new
        if not folder and not new.is_file():
            raise OutputError(f"{path}: the writer produced no file; nothing was written")
        _fsync_tree(new)
        _ordinary_modes(new)
        _place(new, path, expected, replace)
    except OSError as e:
        raise _write_error(path, e, expected.kind != "absent") from e
    finally:
        with _lock:
            _active.discard(str(wrapper))
        if wrapper.exists():
            _remove_tree(wrapper)


def atomic_dir(path: str | os.PathLike[str], *, replace: bool = True) -> AbstractContextManager[Path]:
    """Yield a fresh folder in a hidden sibling of ``path``; on success it becomes ``path``, on error
    it is removed and ``path`` is untouched.

    ``path`` is replaced only while it is what the last :func:`check_output_dir` of it saw (else
    what it was when this write began): a path that appeared or changed meanwhile is never replaced
    (:class:`~shear.errors.OutputError`). ``replace=False`` keeps an existing ``path`` and discards
    ours (a concurrent writer of the same content, e.g. a cache entry, won). Files and folders get
    the ordinary modes under the umask. An ``OSError`` (disk full, ...) becomes an
    :class:`~shear.errors.OutputError` naming ``path``.
    """
    return _atomic(_absolute(path), folder=True, replace=replace)


def atomic_file(path: str | os.PathLike[str]) -> AbstractContextManager[Path]:
    """Yield a path (same name, in a hidden sibling folder of ``path``) to write one file to; on
    success it becomes ``path``, with :func:`atomic_dir`'s rules (replace only what was checked by
    :func:`check_output_file`, else what was there when the write began; the mode of a plain write).

    Example:
        >>> import tempfile, pathlib
        >>> out = check_output_file(pathlib.Path(tempfile.mkdtemp()) / "report.html")
        >>> with atomic_file(out) as tmp:
        ...     _ = tmp.write_text("<html></html>")
        >>> out.read_text()
        '<html></html>'
    """
    return _atomic(_absolute(path), folder=False)


# -- folders shear adds files to ---------------------------------------------------------------


def _read_record(folder: Path) -> dict[str, str]:
    try:
        doc = json.loads((folder / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    files = doc.get("files") if isinstance(doc, dict) and doc.get("format") == _RECORD_FORMAT else None
    if not isinstance(files, dict):
        return {}
    return {k: v for k, v in files.items() if isinstance(k, str) and isinstance(v, str)}


@contextmanager
def owned_file(folder: str | os.PathLike[str], name: str, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write ``folder/name`` to; at the end it replaces ``folder/name`` only
    when shear wrote that file before (``shear-files.json`` lists it, unchanged) or ``overwrite=True``
    (the caller's, as given to :func:`check_writable_dir`); the record is updated.

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> with owned_file(d, "plot.svg") as tmp:
        ...     _ = tmp.write_text("<svg/>")
        >>> sorted(p.name for p in d.iterdir())
        ['plot.svg', 'shear-files.json']
    """
    dir_ = _absolute(folder)
    if "/" in name or name in ("", ".", "..", RECORD) or name.startswith("."):
        raise OutputError(f"{dir_}: cannot write a file named {name!r} there; use a plain file name")
    if dir_.is_symlink() or (dir_.exists() and not dir_.is_dir()):
        raise OutputError(f"{dir_} is not a folder (a file or a symbolic link); give a folder to write {name} into")
    target = dir_ / name
    if os.path.lexists(target) and not overwrite and not _ours(target, _read_record(dir_)):
        raise OutputError(
            f"{target} exists and shear did not write it; nothing was replaced: choose a new or empty folder, "
            "or pass overwrite=True (--overwrite)"
        )
    with _lock:
        _checked.pop(str(target), None)  # replace what is there now, checked just above
    with atomic_file(target) as tmp:
        yield tmp
    record = _read_record(dir_)
    record[name] = sha256_file(target)
    doc = json.dumps({"format": _RECORD_FORMAT, "files": dict(sorted(record.items()))}, indent=1)
    with _lock:
        _checked.pop(str(dir_ / RECORD), None)
    with atomic_file(dir_ / RECORD) as tmp:
        tmp.write_text(doc + "\n", encoding="utf-8")


def write_owned(folder: str | os.PathLike[str], name: str, data: str | bytes, *, overwrite: bool = False) -> Path:
    """Write ``data`` to ``folder/name`` under :func:`owned_file`'s rule; returns the path."""
    with owned_file(folder, name, overwrite=overwrite) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
    return _absolute(folder) / name


def interrupted_swap(path: Path) -> list[Path]:
    """Siblings a save killed between its two renames left (only where no atomic exchange exists)."""
    if not path.parent.is_dir():
        return []
    return sorted(p for p in path.parent.glob(f".{path.name}{_OLD}*") if p.is_dir())
