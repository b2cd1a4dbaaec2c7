"""Atomic file writes: a reader (or a crash) never sees a half-written checkpoint or result.

Each write goes to a temporary file in the same directory, is flushed to disk, and is then renamed
over the target (rename is atomic on POSIX within one file system). A write that fails (a full disk,
a quota, a read-only file system) removes its temporary file, leaves the target as it was, and raises
:class:`~maskconnect.errors.StorageError`: one line naming the file, no traceback at the command line.

:func:`check_output_file` and :func:`check_output_dir` check that a result file or folder can be written
before the work that produces it; :func:`check_path` that a path's names fit the file system.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from .errors import RunDirError, StorageError


def _atomic(path: str | os.PathLike, write: Callable[[Any], None], mode: str) -> Path:
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; results are shared like any file
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(path.parent)
    except BaseException as e:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        cause = _os_error(e)
        if cause is not None:
            try:
                kept = "it keeps its previous content" if path.exists() else "it was not created"
            except OSError:  # the path itself is the problem (a name too long, a symlink loop)
                kept = "it was not created"
            raise StorageError(f"cannot write {path}: {cause.strerror or cause}; nothing was half-written "
                               f"({kept})") from None
        raise
    return path


def _os_error(e: BaseException | None) -> OSError | None:
    """The OSError behind a failed write: ``e`` itself, or what torch.save's writer raised inside
    (it re-raises a disk full as ``RuntimeError: ... unexpected pos``, the OSError as its context)."""
    for _ in range(5):
        if e is None:
            return None
        if isinstance(e, OSError) and e.errno is not None:
            return e
        e = e.__cause__ or e.__context__
    return None


def _name_max(path: Path) -> int:
    """The longest file name (bytes) the file system of ``path``'s nearest existing folder allows."""
    for folder in [path, *path.parents]:
        try:
            if folder.is_dir():
                return os.pathconf(folder, "PC_NAME_MAX")
        except (OSError, ValueError):
            continue
    return 255


def name_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot name a file on this system, whatever is done with it (every call would fail
    with "File name too long"): one of its names is longer than the file system allows (255 bytes on
    Linux file systems). None if it can."""
    path = Path(os.fspath(path))
    longest, size = max(((p, len(os.fsencode(p))) for p in path.parts), key=lambda n: n[1], default=("", 0))
    limit = _name_max(path.parent if path.is_absolute() else Path.cwd() / path.parent)
    if size <= limit:
        return None
    shown = longest if len(longest) <= 40 else f"{longest[:20]}...{longest[-12:]}"
    return f"the name {shown!r} has {size} bytes; a name in a path may have at most {limit} (the file system's limit)"


def check_path(path: str | os.PathLike, what: str = "--out") -> Path:
    """``path`` as a Path, or a :class:`RunDirError` naming ``what`` and the path when it cannot name a
    file (a NUL character, a name too long: :func:`name_problem`)."""
    text = os.fspath(path)
    if "\0" in text:
        raise RunDirError(f"{what} {text!r}: a path cannot hold a NUL character")
    problem = name_problem(text)
    if problem:
        raise RunDirError(f"{what} {text}: {problem}")
    return Path(text)


def symlink_problem(path: Path) -> str | None:
    """Why ``path``, a symbolic link, cannot be followed (a loop, a target that does not exist), or None."""
    if not path.is_symlink():
        return None
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "is a symbolic link that loops (it leads back to itself)"
        return f"is a symbolic link to {os.readlink(path)}, which does not exist (a dangling link)"
    return None


def check_output_file(path: str | os.PathLike, what: str = "--out") -> Path:
    """Check, before any work, that the file ``path`` can be written: not empty, not a directory, its
    folder creatable and writable (probed with a temporary file). Raises :class:`RunDirError` naming it."""
    text = os.fspath(path) if isinstance(path, os.PathLike) else path
    if not isinstance(text, str) or not text.strip():
        raise RunDirError(f"{what} {text!r}: an output file path is needed, not an empty one")
    path = check_path(text, what)
    if path.is_dir():
        raise RunDirError(f"{what} {path} is a directory; give a file path")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise RunDirError(f"{what} {path}: {parent} is a file, not a directory")
            break
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=path.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise RunDirError(f"{what} {path}: cannot write in {path.parent} ({e.strerror or e})") from None
    return path


def check_output_dir(path: str | os.PathLike, what: str = "--out") -> Path:
    """Check, before any work, that files can be written in the folder ``path``: not empty, not a file
    or a broken symbolic link, creatable and writable (probed with a temporary file; a folder created
    here stays). Raises :class:`RunDirError` naming it."""
    text = os.fspath(path) if isinstance(path, os.PathLike) else path
    if not isinstance(text, str) or not text.strip():
        raise RunDirError(f"{what} {text!r}: an output folder is needed, not an empty path")
    path = check_path(text, what)
    link = symlink_problem(path)
    if link:
        raise RunDirError(f"{what} {path} {link}; give a folder")
    for folder in [path, *path.parents]:
        if folder.exists():
            if not folder.is_dir():
                where = "is a file" if folder == path else f"lies under {folder}, which is a file"
                raise RunDirError(f"{what} {path} {where}, not a folder")
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".maskconnect-", suffix=".probe", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise RunDirError(f"{what} {path}: cannot write in it ({e.strerror or e})") from None
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return _atomic(path, lambda f: f.write(text), "w")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return _atomic(path, lambda f: f.write(data), "wb")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> Path:
    import torch

    return _atomic(path, lambda f: torch.save(obj, f), "wb")


def _json_default(o: Any):
    # numpy / torch scalars and paths end up in configs and metrics
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
