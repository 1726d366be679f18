"""Durable file primitives: every state file goes through here.

A write is durable only when the file *and* the directory entry pointing at it
are fsynced; rename() gives atomicity (readers see the old or the new file,
never half of one).
"""

from __future__ import annotations

import os


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
    tmp = f"{path}.tmp.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
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
