"""Durable file primitives: every state file goes through here.

A write is durable only when the file *and* the directory entry pointing at it
are fsynced; rename() gives atomicity (readers see the old or the new file,
never half of one).
"""

from __future__ import annotations

import itertools
import os

_counter = itertools.count()  # next() is atomic: safe from any thread


def tempName(path: str) -> str:
    """A name beside C{path} that no other write, in any thread or process, uses.

    Unique per write, not per process: two worker threads replacing one file
    (two sessions of one account subscribing at once) must not share a temp file.
    """
    return f"{path}.tmp.{os.getpid()}.{next(_counter)}"


def fsyncDir(path: str) -> None:
    """fsync a directory so a rename or unlink in it survives a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomicWrite(path: str, data: bytes, mode: int = 0o600) -> None:
    """Replace C{path} with C{data}: temp file + fsync + rename + fsync(dir)."""
    directory = os.path.dirname(path) or "."
    tmp = tempName(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.rename(tmp, path)
    fsyncDir(directory)


def _loadSyncfs():
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        syncfs = libc.syncfs
    except (OSError, AttributeError):
        return None
    syncfs.argtypes = [ctypes.c_int]

    def call(fd: int) -> None:
        if syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    return call


#: syncfs(2) (Linux), or None.  Python's os has no syncfs; os.sync() reports no errors.
_syncfs = _loadSyncfs()


def syncFilesystems(paths) -> None:
    """Make everything written so far to the filesystems holding C{paths} durable.

    One syncfs(2) per filesystem replaces one fsync per file: the group-commit
    primitive.  Since Linux 5.8 syncfs reports writeback errors, so a failure
    here means "not durable".  Without syncfs, each path is fsynced.
    """
    seen: set[int] = set()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            if _syncfs is None:
                os.fsync(fd)
                continue
            device = os.fstat(fd).st_dev
            if device not in seen:
                seen.add(device)
                _syncfs(fd)
        finally:
            os.close(fd)
