"""Group commit: every acknowledged file is durable, with fewer syncs than files."""

from __future__ import annotations

import os

import pytest
from twisted.internet import defer

from twistmail import _fsutil, _groupcommit
from twistmail._groupcommit import GroupCommit, NewFile, commitBatch, writeNewFile
from twistmail.errors import StorageError


@pytest.fixture
def dirs(tmp_path):
    for sub in ("tmp", "new"):
        (tmp_path / sub).mkdir()
    return tmp_path


def stage(dirs, name: str, data: bytes = b"hello\r\n"):
    def write() -> list[NewFile]:
        tmp = str(dirs / "tmp" / name)
        writeNewFile(tmp, [data])
        return [NewFile(tmp, str(dirs / "new" / name))]
    return write


@pytest.fixture
def journal(monkeypatch):
    """Record every sync and rename, in order, as (what, path)."""
    events: list[tuple[str, str]] = []
    realFsync, realRename = os.fsync, os.rename
    realSyncFs, realFsyncDir = _fsutil.syncFilesystems, _fsutil.fsyncDir

    def fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        if not os.path.isdir(path):  # directories are recorded by fsyncDir
            events.append(("fsync", path))
        return realFsync(fd)

    def syncFilesystems(paths):
        paths = list(paths)
        events.append(("syncfs", tuple(paths)))
        return realSyncFs(paths)

    def fsyncDir(path):
        events.append(("fsyncDir", path))
        return realFsyncDir(path)

    def rename(src, dst):
        events.append(("rename", dst))
        return realRename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(_fsutil, "syncFilesystems", syncFilesystems)
    monkeypatch.setattr(_fsutil, "fsyncDir", fsyncDir)
    return events


def test_batchSyncsDataBeforeRenameAndDirectoryAfter(dirs, journal):
    results = commitBatch([stage(dirs, f"m{i}") for i in range(5)])
    assert results == [[str(dirs / "new" / f"m{i}")] for i in range(5)]
    kinds = [kind for kind, _ in journal]
    # One sync for all the data, five renames, one sync for the directory.
    assert kinds == ["syncfs"] + ["rename"] * 5 + ["fsyncDir"]
    assert set(journal[0][1]) == {str(dirs / "tmp" / f"m{i}") for i in range(5)}
    assert sorted(os.listdir(dirs / "new")) == [f"m{i}" for i in range(5)]
    assert os.listdir(dirs / "tmp") == []


def test_singleFileUsesFsync(dirs, journal):
    assert commitBatch([stage(dirs, "one")]) == [[str(dirs / "new" / "one")]]
    assert journal == [("fsync", str(dirs / "tmp" / "one")), ("rename", str(dirs / "new" / "one")),
                       ("fsyncDir", str(dirs / "new"))]


def test_oneFailingStageDoesNotFailTheOthers(dirs):
    def broken():
        raise StorageError("disk full")

    results = commitBatch([stage(dirs, "a"), broken, stage(dirs, "b")])
    assert results[0] == [str(dirs / "new" / "a")]
    assert isinstance(results[1], StorageError)
    assert results[2] == [str(dirs / "new" / "b")]


def test_failedDataSyncFailsTheBatchAndLeavesNothing(dirs, monkeypatch):
    def broken(paths):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(_fsutil, "syncFilesystems", broken)
    results = commitBatch([stage(dirs, "a"), stage(dirs, "b")])
    assert all(isinstance(r, StorageError) for r in results)
    assert os.listdir(dirs / "tmp") == [] and os.listdir(dirs / "new") == []


def test_failedDirectorySyncTakesTheFilesBack(dirs, monkeypatch):
    def broken(path):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(_fsutil, "fsyncDir", broken)
    results = commitBatch([stage(dirs, "a"), stage(dirs, "b")])
    assert all(isinstance(r, StorageError) for r in results)
    assert os.listdir(dirs / "tmp") == [] and os.listdir(dirs / "new") == []


def test_failedRenameFailsOnlyThatJob(dirs):
    def toMissingDir():
        tmp = str(dirs / "tmp" / "lost")
        writeNewFile(tmp, [b"x"])
        return [NewFile(tmp, str(dirs / "nonexistent" / "lost"))]

    results = commitBatch([toMissingDir, stage(dirs, "ok")])
    assert isinstance(results[0], StorageError)
    assert results[1] == [str(dirs / "new" / "ok")]
    assert os.listdir(dirs / "tmp") == []


def test_writeNewFileLeavesNothingOnFailure(dirs):
    def chunks():
        yield b"partial"
        raise OSError(28, "No space left on device")

    with pytest.raises(StorageError):
        writeNewFile(str(dirs / "tmp" / "x"), chunks())
    assert os.listdir(dirs / "tmp") == []


class ManualRun:
    """A stand-in for deferToThread that runs a batch only when told to."""

    def __init__(self) -> None:
        self.calls: list[tuple[defer.Deferred, object, tuple]] = []

    def __call__(self, f, *args):
        d = defer.Deferred()
        self.calls.append((d, f, args))
        return d

    def finishOne(self) -> None:
        d, f, args = self.calls.pop(0)
        d.callback(f(*args))


def test_submissionsDuringACommitFormTheNextBatch(dirs):
    run = ManualRun()
    commit = GroupCommit(run)
    fired = []
    first = commit.submit(stage(dirs, "first"))
    first.addCallback(fired.append)
    later = [commit.submit(stage(dirs, f"later{i}")) for i in range(10)]
    for d in later:
        d.addCallback(fired.append)
    assert len(run.calls) == 1, "one batch in flight at a time"
    run.finishOne()
    assert fired == [[str(dirs / "new" / "first")]]
    assert len(run.calls) == 1 and len(run.calls[0][2][0]) == 10, "the ten waiting jobs form one batch"
    run.finishOne()
    assert len(fired) == 11 and not run.calls


def test_batchesAreBounded(dirs):
    run = ManualRun()
    commit = GroupCommit(run, maxBatch=4)
    for i in range(10):
        commit.submit(stage(dirs, f"m{i}"))
    sizes = []
    while run.calls:
        sizes.append(len(run.calls[0][2][0]))
        run.finishOne()
    assert sizes == [1, 4, 4, 1]


def test_aFailingBatchFailsItsJobsAndTheNextStillRuns(dirs):
    run = ManualRun()
    commit = GroupCommit(run)
    outcomes = []
    commit.submit(stage(dirs, "a")).addBoth(outcomes.append)
    commit.submit(stage(dirs, "b")).addBoth(outcomes.append)
    d, _, _ = run.calls.pop(0)
    d.errback(RuntimeError("worker died"))
    assert outcomes[0].check(RuntimeError)
    run.finishOne()
    assert outcomes[1] == [str(dirs / "new" / "b")]


def test_maxBatchDefaultBoundsOpenFiles():
    assert 1 < _groupcommit.MAX_BATCH <= 1024


def test_failedDirectorySyncKeepsAReplacement(dirs, monkeypatch):
    """Taking back a replaced file would delete the old version as well: it stays."""
    final = dirs / "new" / "state.json"
    final.write_bytes(b"old")

    def replace():
        tmp = str(dirs / "tmp" / "state.json")
        writeNewFile(tmp, [b"new"])
        return [NewFile(tmp, str(final), replaces=True)]

    def failingDirSync(path):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(_fsutil, "fsyncDir", failingDirSync)
    [result] = commitBatch([replace])
    assert isinstance(result, StorageError)
    assert final.read_bytes() == b"new" and os.listdir(dirs / "tmp") == []


def test_removalsSyncTheirDirectory(dirs, journal):
    gone = dirs / "new" / "gone"
    gone.write_bytes(b"x")

    def remove():
        os.unlink(gone)
        return [_groupcommit.Removed(str(gone))]

    assert commitBatch([remove]) == [[str(gone)]]
    assert journal == [("fsyncDir", str(dirs / "new"))]
