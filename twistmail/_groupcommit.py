# -*- test-case-name: tests.test_groupcommit -*-
"""Group commit: make many concurrent new files durable with a few syncs.

Every new message must be on disk before its ``250`` (file data, then the
directory entry).  One fsync per file and one per directory, each in its own
thread, is what costs a mail server its throughput under load: every fsync is
a journal commit and a device cache flush, and twenty threads doing them at
once mostly fight over the journal and the GIL.

Instead, files are committed in batches, one batch at a time, as a database
commits its log: while a batch is being made durable, new submissions
queue, and they form the next batch.  A batch is::

    write every file under its temporary name    (no sync)
    sync the data: fsync for one file, one syncfs(2) per filesystem for more
    rename every file to its final name          (the Maildir tmp/ -> new/ step)
    sync the directories the same way

so a file becomes visible under its final name only once its data is
durable, and a job is reported done only once its directory entry is too.
The relay queue also commits replacements (a new version of a queue file)
and removals (files its stage already unlinked, whose directories still
need a sync) through the same batches.
At low load every batch holds one file and nothing waits; under load the
syncs per message fall with the concurrency.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from twisted.internet import defer
from twisted.python.failure import Failure

from twistmail import _fsutil
from twistmail.errors import StorageError

#: Jobs per batch: bounds the open file descriptors of one batch.
MAX_BATCH = 128


@dataclass
class NewFile:
    """A complete file under a temporary name: not yet durable, not yet visible."""

    tmp: str
    final: str
    #: C{final} may exist and is replaced.  If the batch fails after the rename
    #: the new version stays: taking it back would delete the old one too.
    replaces: bool = False


@dataclass
class Removed:
    """A file the stage unlinked: only its directory needs a sync."""

    final: str


def writeNewFile(tmp: str, chunks, mtime: float | None = None) -> int:
    """Write C{chunks} to C{tmp} (which must not exist) and return its size.

    Nothing is left behind on failure.
    """
    size = 0
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        raise StorageError(f"cannot create {tmp}: {e.strerror}") from e
    try:
        try:
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
                size += len(chunk)
        finally:
            os.close(fd)
        if mtime is not None:
            os.utime(tmp, (mtime, mtime))
    except OSError as e:
        _unlink(tmp)
        raise StorageError(f"cannot write {tmp}: {e.strerror}") from e
    return size


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _sync(paths: list[str]) -> None:
    if len(paths) == 1:
        fd = os.open(paths[0], os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    elif paths:
        _fsutil.syncFilesystems(paths)


def _syncDirs(dirs: list[str]) -> None:
    if len(dirs) == 1:
        _fsutil.fsyncDir(dirs[0])
    elif dirs:
        _fsutil.syncFilesystems(dirs)


def commitBatch(stages: list[Callable[[], list[NewFile | Removed]]]) -> list:
    """Run in a worker thread: stage, sync, rename, sync directories.

    @return: one entry per stage: the list of final paths, or the exception
        that failed it (a failed job leaves neither its temporary nor its final
        files behind).
    """
    results: list = []
    for stage in stages:
        try:
            results.append(stage())
        except Exception as e:  # the job's own failure; the others go on
            results.append(e)

    def fail(i: int, error: Exception, renamed: bool) -> None:
        for f in results[i]:
            if isinstance(f, NewFile):
                _unlink(f.tmp)
                if renamed and not f.replaces:
                    _unlink(f.final)
        results[i] = error

    live = [i for i, r in enumerate(results) if isinstance(r, list)]
    try:
        _sync([f.tmp for i in live for f in results[i] if isinstance(f, NewFile)])
    except OSError as e:
        for i in live:
            fail(i, StorageError(f"cannot sync new files: {e.strerror}"), renamed=False)
        return results
    for i in list(live):
        done: list[NewFile] = []
        try:
            for f in results[i]:
                if isinstance(f, NewFile):
                    os.rename(f.tmp, f.final)
                    done.append(f)
        except OSError as e:
            for f in done:
                if not f.replaces:
                    _unlink(f.final)
            fail(i, StorageError(f"cannot rename {f.tmp}: {e.strerror}"), renamed=False)
            live.remove(i)
    try:
        _syncDirs(list(dict.fromkeys(os.path.dirname(f.final) for i in live for f in results[i])))
    except OSError as e:
        # Complete but maybe not durable: take them back so the clients retry
        # instead of trusting an acknowledgement we cannot stand behind.
        for i in live:
            fail(i, StorageError(f"cannot sync directory: {e.strerror}"), renamed=True)
        return results
    for i in live:
        results[i] = [f.final for f in results[i]]
    return results


class GroupCommit:
    """Runs L{commitBatch} in the thread pool, one batch in flight at a time.

    All state lives on the reactor thread.
    """

    def __init__(self, run: Callable, maxBatch: int = MAX_BATCH) -> None:
        self._run = run
        self._maxBatch = maxBatch
        self._pending: list[tuple[Callable, defer.Deferred]] = []
        self._busy = False

    def submit(self, stage: Callable[[], list[NewFile | Removed]]) -> defer.Deferred:
        """Commit the files C{stage} writes (called in a worker thread).

        @return: Deferred firing with their final paths once they are durable
            and visible, or failing with what went wrong.
        """
        d = defer.Deferred()
        self._pending.append((stage, d))
        if not self._busy:
            self._next()
        return d

    def _next(self) -> None:
        batch = self._pending[:self._maxBatch]
        del self._pending[:self._maxBatch]
        self._busy = True
        self._run(commitBatch, [stage for stage, _ in batch]).addBoth(self._done, batch)

    def _done(self, results, batch: list) -> None:
        self._busy = False
        if isinstance(results, Failure):
            results = [results] * len(batch)
        for (_, d), result in zip(batch, results, strict=True):
            if isinstance(result, (Exception, Failure)):
                d.errback(result)
            else:
                d.callback(result)
        if self._pending and not self._busy:
            self._next()
