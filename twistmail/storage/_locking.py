# -*- test-case-name: tests.test_mbox -*-
"""Locking an mbox file the way mutt, procmail and Debian's tools do.

Debian Policy §11.6: programs that touch a mailbox must lock it with
``fcntl()`` *and* a ``<mbox>.lock`` dot-lock file (NFS-safe), taking fcntl
first; to avoid deadlocks with programs that take them in the other order,
both are taken without blocking and retried until a deadline.

* fcntl: open-file-description locks (``F_OFD_SETLK``, Linux >= 3.15) where
  available.  They conflict with the classic POSIX record locks of mutt,
  procmail and Python's ``mailbox`` like POSIX locks do, and unlike POSIX
  locks they also exclude other threads of this process and are not dropped
  when some other descriptor of the file is closed.  Elsewhere, POSIX locks.
* dot-lock: liblockfile's recipe.  Write our pid into a unique temporary
  file, ``link()`` it to ``<mbox>.lock`` and check the link count (``link``
  can report failure over NFS when it succeeded).  A dot-lock is stale, and
  is removed, when it is older than C{STALE_AGE} and the process it names
  (if any) no longer exists, as liblockfile and procmail decide.

Every function here blocks: call them in a worker thread.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import os
import struct
import time

from twistmail.errors import StorageError

#: Seconds after which a dot-lock whose owner is gone may be broken (liblockfile: 5 minutes).
STALE_AGE = 300.0
_counter = itertools.count()


class LockTimeout(StorageError):
    """Another program held the mailbox lock for longer than we may wait."""


def _flock(kind: int) -> bytes:
    # struct flock: short l_type, short l_whence, off_t l_start, off_t l_len, pid_t l_pid
    # (native alignment; l_pid must be 0 for OFD locks).  Whole file.
    return struct.pack("hhqqi4x", kind, os.SEEK_SET, 0, 0, 0)


_OFD = getattr(fcntl, "F_OFD_SETLK", None)


def _tryFcntl(fd: int, exclusive: bool) -> bool:
    kind = fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK
    try:
        if _OFD is not None:
            fcntl.fcntl(fd, _OFD, _flock(kind))
        else:
            fcntl.lockf(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _unlockFcntl(fd: int) -> None:
    if _OFD is not None:
        fcntl.fcntl(fd, _OFD, _flock(fcntl.F_UNLCK))
    else:
        fcntl.lockf(fd, fcntl.LOCK_UN)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, belongs to someone else
    return True


def isStale(lockPath: str, now: float | None = None) -> bool:
    """Whether the dot-lock at C{lockPath} may be broken (see the module docstring)."""
    try:
        st = os.stat(lockPath)
        with open(lockPath, "rb") as f:
            content = f.read(32)
    except FileNotFoundError:
        return False
    if (time.time() if now is None else now) - st.st_mtime < STALE_AGE:
        return False
    try:
        pid = int(content.split()[0])
    except (IndexError, ValueError):
        return True  # no pid (mutt and Python write none): age alone decides
    return pid <= 0 or not _alive(pid)


class _DotLock:
    def __init__(self, path: str) -> None:
        self.path = path + ".lock"
        directory, name = os.path.split(path)
        self._tmp = os.path.join(directory, f".{name}.lk{os.getpid()}.{next(_counter)}")
        self._inode: int | None = None

    def tryAcquire(self) -> bool:
        fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, b"%d\n" % os.getpid())
        finally:
            os.close(fd)
        try:
            try:
                os.link(self._tmp, self.path)
            except FileExistsError:
                if isStale(self.path):
                    _unlinkQuietly(self.path)
                return False
            except OSError:
                pass  # NFS may say no when it did: the link count tells
            st = os.stat(self._tmp)
            if st.st_nlink != 2:
                return False
            self._inode = st.st_ino
            return True
        finally:
            _unlinkQuietly(self._tmp)

    def release(self) -> None:
        try:
            if os.stat(self.path).st_ino == self._inode:  # still ours: not broken as stale
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        self._inode = None


def _unlinkQuietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class MailboxLock:
    """The fcntl lock (shared or exclusive) and, for writers, the dot-lock of one mbox file.

    Use as a context manager around the work; C{fd} is the locked descriptor.
    The file was renamed over while we waited (another program's rewrite)?
    Then the lock is retaken on the file the path names now, so nothing is
    ever appended to a file no reader will look at again.
    """

    def __init__(self, path: str, exclusive: bool, dotlock: bool = True,
                 timeout: float = 30.0) -> None:
        self.path = path
        self.exclusive = exclusive
        self._dot = _DotLock(path) if exclusive and dotlock else None
        self._timeout = timeout
        self.fd = -1

    def __enter__(self) -> MailboxLock:
        deadline = time.monotonic() + self._timeout
        delay = 0.005
        while True:
            self._open()
            if self._tryLocks():
                if self._sameFile():
                    return self
                self._release()
            else:
                os.close(self.fd)
                self.fd = -1
            if time.monotonic() > deadline:
                raise LockTimeout(f"{self.path} stayed locked by another program for "
                                  f"{self._timeout:g}s; try again later")
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    def _open(self) -> None:
        self.fd = os.open(self.path, os.O_RDWR if self.exclusive else os.O_RDONLY)

    def _tryLocks(self) -> bool:
        if not _tryFcntl(self.fd, self.exclusive):
            return False
        if self._dot is not None and not self._dot.tryAcquire():
            _unlockFcntl(self.fd)
            return False
        return True

    def _sameFile(self) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(self.fd).st_ino
        except FileNotFoundError:
            return False

    def _release(self) -> None:
        if self._dot is not None:
            self._dot.release()
        _unlockFcntl(self.fd)
        os.close(self.fd)
        self.fd = -1

    def __exit__(self, *exc) -> None:
        self._release()
