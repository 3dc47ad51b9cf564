"""Atomic file writes: every file vlmo_fast writes that others read (checkpoints, arrow files, tar shards, logs,
manifests) goes through here, so a reader never sees a partial file and a failed write leaves the previous one."""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Callable, Iterator

_UMASK = os.umask(0)  # read once at import: setting it later would race with other threads creating files
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path beside ``path``; when the block ends normally, the file written there is given a
    normal file's mode and renamed over ``path``. On any error it is removed and ``path`` is untouched."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes the file private (0600)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write(path: str, write: Callable[[str], object]) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, then rename it over ``path`` (see ``atomic_path``)."""
    with atomic_path(path) as tmp:
        write(tmp)
