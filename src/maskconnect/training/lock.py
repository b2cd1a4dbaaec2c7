"""One writer per run directory: an advisory ``fcntl.flock`` on ``<run dir>/.lock``, held for the whole run.

Why ``flock`` (and not the ``filelock`` package): it is the kernel's own lock, released when the holder
dies however it dies (SIGKILL, OOM killer, a node's job killed by SLURM), so a lock left behind never
blocks, and there is nothing to expire or clean up. ``filelock.FileLock`` is the same ``flock`` call on
Unix, plus a dependency; its ``SoftFileLock`` fallback (a file that exists) does not release on death.

The lock file lives inside the run directory (created first if needed) so that it moves with it, and it
holds the holder's pid, host, start time and command line, so a second command can name it. It is
removed when the holder releases it; after a SIGKILL a stale ``.lock`` stays behind, unlocked and
harmless (the next command takes it and rewrites it). A second command never waits: it exits 2 naming
the holder (:class:`RunLocked`).

What this guarantees on shared file systems (docs/run_format.md, "One writer per run directory"):
processes on one node always exclude each other. Across nodes it depends on the mount: Linux NFS
emulates flock with NFS byte-range locks (coherent across clients unless mounted ``nolock`` or
``local_lock=flock``/``all``); Lustre is coherent with ``-o flock``, node-local with ``-o localflock`` and
refuses with ``-o noflock`` (then this module warns and runs unlocked); BeeGFS is node-local unless
``tuneUseGlobalFileLocks`` is set.
"""

from __future__ import annotations

import errno
import json
import os
import platform
import shlex
import sys
import time
import warnings
from pathlib import Path

from ..errors import RunDirError
from ..io import symlink_problem

LOCK_NAME = ".lock"
# flock is refused by the file system (Lustre -o noflock: ENOSYS; some FUSE mounts: EOPNOTSUPP)
_UNSUPPORTED = {errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOLCK, errno.EINVAL}


class RunLocked(RunDirError):
    """The run directory is locked by another command."""

    def __init__(self, directory: Path, holder: dict | None):
        self.directory, self.holder = directory, holder
        super().__init__(f"{directory} is in use by another command ({describe_holder(holder)}); "
                         "wait for it to finish, or choose another --out")


class RunLockWarning(RuntimeWarning):
    """The file system does not support flock: the run goes on without the one-writer guarantee."""


def describe_holder(holder: dict | None) -> str:
    if not holder:
        return "holder unknown: it is starting, or predates this version"
    return (f"pid {holder.get('pid')} on host {holder.get('host')}, since {holder.get('since')}: "
            f"{holder.get('command')}")


def _holder_info() -> dict:
    argv = getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv]
    command = shlex.join(argv)
    return {"pid": os.getpid(), "host": platform.node() or "unknown",
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": command if len(command) <= 1000 else command[:997] + "..."}


def _read_holder(fd: int) -> dict | None:
    # the holder writes its record right after taking the lock: give it a moment
    for attempt in range(5):
        try:
            data = os.pread(fd, 65536, 0)
            holder = json.loads(data.decode("utf-8")) if data.strip() else None
        except (OSError, ValueError):
            holder = None
        if isinstance(holder, dict):
            return holder
        time.sleep(0.05 * (attempt + 1))
    return None


def prepare_directory(directory: Path, what: str = "--out") -> bool:
    """Create ``directory`` (and its parents) if needed; returns True if it was created.

    Raises :class:`RunDirError` naming the path when it cannot be a directory: a component is a
    file, it is not writable, the file system is read-only, it is a broken symbolic link.
    """
    link = symlink_problem(directory)
    if link:  # else it would be taken for a file: mkdir finds something there, and it is not a directory
        raise RunDirError(f"{what} {directory} {link}; give a run directory, or fix the link")
    if directory.exists():
        if not directory.is_dir():
            raise RunDirError(f"{what} {directory} is a file, not a run directory")
        return False
    for parent in directory.parents:
        if parent.exists():
            if not parent.is_dir():
                raise RunDirError(f"{what} {directory}: {parent} is a file, not a directory")
            break
    try:
        directory.mkdir(parents=True)
    except FileExistsError:
        if not directory.is_dir():
            raise RunDirError(f"{what} {directory} is a file, not a run directory") from None
        return False
    except OSError as e:
        raise RunDirError(f"{what} {directory}: cannot create the directory ({e.strerror})") from None
    return True


class RunLock:
    """``with RunLock(directory): ...`` holds the directory's lock (see the module docstring)."""

    def __init__(self, directory: Path | str, *, what: str = "--out"):
        self.directory = Path(directory)
        self.what = what
        self.fd: int | None = None
        self.created = False
        self.supported = True

    @property
    def path(self) -> Path:
        return self.directory / LOCK_NAME

    def acquire(self) -> "RunLock":
        import fcntl

        self.created = prepare_directory(self.directory, self.what)
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as e:
                self._forget_directory()
                raise RunDirError(f"{self.what} {self.directory} is not writable: cannot create "
                                  f"{self.path.name} there ({e.strerror})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise RunLocked(self.directory, holder) from None
            except OSError as e:
                if e.errno not in _UNSUPPORTED:
                    os.close(fd)
                    raise
                self.supported = False
                warnings.warn(f"{self.directory}: this file system refuses flock ({e.strerror}): the run goes "
                              "on, but a second command on the same --out is not stopped (docs/run_format.md)",
                              RunLockWarning, stacklevel=2)
            # the holder before us may have removed the file between our open and our flock
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same or not self.supported:
                break
            os.close(fd)
        self.fd = fd
        try:
            record = (json.dumps(_holder_info()) + "\n").encode("utf-8")
            os.ftruncate(fd, 0)
            os.pwrite(fd, record, 0)
        except OSError:
            pass  # a full disk: the lock holds all the same, only the holder's name is missing
        return self

    def moved_to(self, directory: Path) -> None:
        """The locked directory was renamed to ``directory`` (the lock file moved with it)."""
        self.directory = Path(directory)
        self.created = False

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            if os.path.samestat(os.fstat(self.fd), os.stat(self.path)):
                os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)  # releases the flock
        self.fd = None
        self._forget_directory()

    def _forget_directory(self) -> None:
        # a directory this lock created and nothing else used (e.g. the run failed before any file)
        if self.created:
            try:
                self.directory.rmdir()
            except OSError:
                pass
            self.created = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
