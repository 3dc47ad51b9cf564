"""Atomic file writes: every file vlmo_fast writes that others read (checkpoints, arrow files, tar shards, logs,
manifests) goes through here, so a reader never sees a partial file and a failed write leaves the previous one."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import tempfile
from typing import Callable, Iterator, Optional, Tuple


def _proc_umask() -> Optional[int]:
    """The process's umask as Linux's /proc tells it (without setting it), or None where it cannot."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _import_umask() -> int:
    found = _proc_umask()
    if found is not None:
        return found
    # no /proc (not Linux, or a kernel before 4.7): read by setting it, once. Setting it races with other threads'
    # file creation (a file made meanwhile gets no umask), so never where /proc can tell it
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _import_umask()


def _umask() -> int:
    """The process's umask now (Linux: read from /proc, never set), else the one at import."""
    found = _proc_umask()
    return _UMASK if found is None else found


def _mode_for(path: str) -> int:
    """The mode a file written over ``path`` gets: the mode of the regular file there (a rewrite keeps a chmod, as
    writing into the file would), else a new file's under the current umask (as ``open`` would give it)."""
    try:
        st = os.lstat(path)
        if stat.S_ISREG(st.st_mode):
            return stat.S_IMODE(st.st_mode)
    except OSError:
        pass
    return 0o666 & ~_umask()


TMP_PREFIX = ".tmp-"  # temporary files beside their target; one left behind is a write a killed process began


def _fsync(path: str, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:  # e.g. a directory that cannot be opened on this platform: the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str, durable: bool = False) -> Iterator[str]:
    """Yield a temporary path beside ``path``; when the block ends normally, the file written there is given a
    normal file's mode and renamed over ``path``. On any error it is removed and ``path`` is untouched.

    ``durable``: the file's data reach the disk before the rename, and the rename before this returns (fsync of
    the file and its folder): after a power loss or a kernel crash the name holds the whole file or the previous
    one, never an empty or partial file. For checkpoints; other files skip the cost."""
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, "is a folder; expected the path of a file to write", path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    name = os.path.basename(path)
    # the temporary name keeps the target's extension, or gets one: torch.save names its archive after the file's
    # name up to its last ".", which must not be the prefix's leading one
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=TMP_PREFIX, suffix=name if "." in name else name + ".tmp")
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, _mode_for(path))  # mkstemp makes the file private (0600)
        if durable:
            _fsync(tmp)
        os.replace(tmp, path)
        if durable:
            _fsync(directory, directory=True)
    except BaseException as exc:
        full = isinstance(exc, Exception) and _disk_full(directory)  # checked while the partial file still exists
        if os.path.exists(tmp):
            os.unlink(tmp)
        enospc = isinstance(exc, OSError) and exc.errno == errno.ENOSPC
        if (full or enospc) and path not in str(exc):
            # a writer's own error for a full disk can be obscure (torch.save: "basic_ios::clear: iostream error")
            # or name no file (pyarrow: "Error writing bytes to file")
            raise OSError(errno.ENOSPC, f"writing {path}: no space left on device ({_first_line(exc)})") from exc
        raise


def _disk_full(directory: str) -> bool:
    """Less than 1 MiB left to write in ``directory`` (False where the platform cannot tell)."""
    try:
        stats = os.statvfs(directory)
    except (AttributeError, OSError):
        return False
    return stats.f_bavail * stats.f_frsize < 2**20


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def atomic_write(path: str, write: Callable[[str], object], durable: bool = False) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, then rename it over ``path`` (see ``atomic_path``)."""
    with atomic_path(path, durable) as tmp:
        write(tmp)


def check_writable_file(path: str, what: str) -> None:
    """Before any work: ``path`` can be written as a file (not a folder; its nearest existing folder writable; the
    folders between are created at the write). ``what`` names it in the ValueError (e.g. "--out")."""
    if not path:
        raise ValueError(f"{what}: expected a file path, got an empty string")
    if os.path.isdir(path):
        raise ValueError(f"{what}: {path} is a folder; expected a file path")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"{what}: cannot write {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{what}: cannot write {path}: no permission to write in {parent}")


def atomic_write_json(path: str, value: object, indent: Optional[int] = None) -> None:
    """``value`` as JSON at ``path``, written atomically (see ``atomic_path``)."""
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(value, f, indent=indent)

    atomic_write(path, write)


LOCK_BUSY = "held by another process"
NO_LOCKS = "no file locks on this system (no fcntl)"
NOT_A_FILE = "not a regular file (a symbolic link, a folder or a device): a lock never opens it, let alone writes it"


def try_lock(path: str, create: bool = True) -> Tuple[Optional[int], Optional[str]]:
    """An exclusive OS file lock (``flock``) on ``path``, taken without waiting: (its descriptor, None), holding the
    lock until it is closed or the process ends however it ends, or (None, why not): ``LOCK_BUSY`` when another
    process holds it, ``NO_LOCKS`` where the OS has none (Windows), ``NOT_A_FILE`` for a symbolic link (never
    followed: one planted there must not have its target truncated by the lock's holder) or another non-regular
    file, else the OS error (e.g. a file system without locks, a missing file when not ``create``)."""
    try:
        import fcntl
    except ImportError:
        return None, NO_LOCKS
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | (os.O_CREAT if create else 0), 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP or (exc.errno in (errno.EISDIR, errno.ENXIO) and os.path.lexists(path)):
            return None, NOT_A_FILE
        return None, exc.strerror or str(exc)
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO or a device (O_NONBLOCK: opening one does not wait)
        os.close(fd)
        return None, NOT_A_FILE
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        busy = exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
        return None, LOCK_BUSY if busy else (exc.strerror or str(exc))
    return fd, None
