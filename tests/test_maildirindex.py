"""twistmail-index: the Maildir folder index a restarted server loads instead of listing cur/.

It is a cache: these tests check that it is used when it holds, and that a
stale, racy, torn or corrupt one is never trusted (the folder is listed and
the index rebuilt).
"""

from __future__ import annotations

import marshal
import os
import time
import zlib

import pytest
from twisted.internet import defer

from twistmail.storage import _maildirindex, maildirfolder
from twistmail.storage.maildir import MaildirStore
from twistmail.testing.conformance import ALICE, call, deliver, message, openFolder, uids

INDEX = _maildirindex.INDEX


@pytest.fixture(autouse=True)
def smallFolders(monkeypatch):
    monkeypatch.setattr(_maildirindex, "MIN_MESSAGES", 1)


def folderDir(dataDir: str) -> str:
    local, domain = ALICE.split("@")
    return os.path.join(dataDir, "mail", domain, local)


def backdate(path: str, seconds: float = 60) -> None:
    """Make new/ and cur/ look untouched for a while: their mtimes are not racy."""
    then = time.time() - seconds
    for sub in ("new", "cur"):
        os.utime(os.path.join(path, sub), (then, then))


def waitForIndex(path: str, timeout: float = 10) -> bytes:
    """The index once the worker has written it (polled, with a deadline)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(os.path.join(path, INDEX), "rb") as f:
                return f.read()
        except FileNotFoundError:
            time.sleep(0.01)
    raise AssertionError("no index written")


def view(folder) -> list[tuple]:
    return [(m.uid, m.uniqueId, m.flags, m.size, m.internalDate) for m in folder.messages()]


def listing(monkeypatch) -> list[str]:
    listed: list[str] = []
    realListdir = os.listdir

    def listdir(path):
        listed.append(os.path.basename(path))
        return realListdir(path)

    monkeypatch.setattr(os, "listdir", listdir)
    return listed


def indexedFolder(dataDir: str, count: int = 3):
    """A folder with messages, flags, an index on disk; returns (path, what it showed)."""
    store = MaildirStore(dataDir)
    for n in range(count):
        deliver(store, message(n))
    folder = openFolder(store)
    call(folder, "setFlags", [2], ["\\Seen", "$Label"], "add")
    path = folderDir(dataDir)
    backdate(path)
    folder = openFolder(MaildirStore(dataDir))  # a restart: cur/ changed, so it is listed
    waitForIndex(path)
    return path, view(folder), folder.uidValidity, folder.uidNext


def test_restartLoadsTheIndexWithoutListingCur(dataDir, monkeypatch):
    path, before, validity, uidNext = indexedFolder(dataDir)
    listed = listing(monkeypatch)
    folder = openFolder(MaildirStore(dataDir))
    assert listed == []
    assert view(folder) == before
    assert (folder.uidValidity, folder.uidNext) == (validity, uidNext)
    assert folder.message(2).flags == {"\\Seen", "$Label"}
    # And the folder works on from there: a delivery is adopted, UIDs go on.
    deliver(folder._store, message(7))
    assert call(folder, "refresh").added == (uidNext,)


def test_indexIsStaleAfterAnotherProgramRenamedAFile(dataDir, monkeypatch):
    path, before, _, _ = indexedFolder(dataDir)
    cur = os.path.join(path, "cur")
    [name] = [n for n in os.listdir(cur) if n.startswith(before[0][1])]
    os.rename(os.path.join(cur, name), os.path.join(cur, name.partition(":2,")[0] + ":2,F"))
    backdate(path, 30)  # not racy: only the changed mtime tells
    listed = listing(monkeypatch)
    folder = openFolder(MaildirStore(dataDir))
    assert "cur" in listed
    assert folder.message(1).flags == {"\\Flagged"}


def test_indexIsStaleAfterAnotherProcessChangedTheUidlist(dataDir, monkeypatch):
    path, before, _, _ = indexedFolder(dataDir)
    with open(os.path.join(path, "twistmail-uidlist"), "a", encoding="utf-8") as f:
        f.write("")  # same size: the mtime alone must give it away
    os.utime(os.path.join(path, "twistmail-uidlist"))
    listed = listing(monkeypatch)
    assert view(openFolder(MaildirStore(dataDir))) == before
    assert "cur" in listed


def reblob(data: bytes, columns) -> bytes:
    """The index with another blob under a header that is right for it (CRC, count)."""
    head = data.partition(b"\n")[0].decode().split(" ")
    blob = columns if isinstance(columns, bytes) else marshal.dumps(columns)
    head[4], head[6] = f"K{3 if isinstance(columns, bytes) else len(columns[0])}", \
        f"C{zlib.crc32(blob)}"
    return " ".join(head).encode() + b"\n" + blob


@pytest.mark.parametrize("damage", [
    lambda data: data[:-10],  # torn: a crash while writing in place (atomicWrite prevents it)
    lambda data: data[:-1] + bytes([data[-1] ^ 1]),  # a flipped bit: the CRC tells
    lambda data: data.replace(b" K3 ", b" K4 ", 1),
    lambda data: data.replace(b"twistmail-index 2", b"twistmail-index 9", 1),
    lambda data: data.replace(b" V", b" Vx", 1),
    lambda data: b"\xff" + data,
    lambda data: reblob(data, b"not marshal"),
    lambda data: reblob(data, ([1, 2, 3],)),
    lambda data: reblob(data, ([3, 2, 1], ["a", "b", "c"], ["", "", ""], [1, 1, 1], [1, 1, 1])),
    lambda data: reblob(data, ([1, 2, 99], ["a", "b", "c"], ["", "", ""], [1, 1, 1], [1, 1, 1])),
], ids=["torn", "bit", "count", "version", "header", "garbage", "notmarshal", "shape", "order",
        "beyonduidnext"])
def test_corruptIndexIsRebuilt(dataDir, monkeypatch, damage):
    path, before, _, _ = indexedFolder(dataDir)
    indexPath = os.path.join(path, INDEX)
    with open(indexPath, "rb") as f:
        damaged = damage(f.read())
    with open(indexPath, "wb") as f:
        f.write(damaged)
    listed = listing(monkeypatch)
    assert view(openFolder(MaildirStore(dataDir))) == before
    assert "cur" in listed
    assert waitForFresh(indexPath, damaged)


def waitForFresh(indexPath: str, damaged: bytes, timeout: float = 10) -> bool:
    """The damaged index is replaced by a good one (written by a worker: polled)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(indexPath, "rb") as f:
            if f.read() != damaged:
                return True
        time.sleep(0.01)
    return False


def test_racyStampsAreNeitherWrittenNorTrusted(dataDir):
    store = MaildirStore(dataDir)
    deliver(store, message(1))
    folder = openFolder(store)
    path = folderDir(dataDir)
    now = _maildirindex.now()
    stamps = _maildirindex.stamps(path, maildirfolder._SIDECARS)  # cur/ changed just now
    [m] = folder.messages()
    args = (folder.uidValidity, folder.uidNext,
            ([1], [m.uniqueId + f",S={m.size}"], ["S"], [m.size], [m.internalDate]))
    assert _maildirindex.encode(stamps, now, *args) is None
    backdate(path)
    stamps = _maildirindex.stamps(path, maildirfolder._SIDECARS)
    _maildirindex.save(path, _maildirindex.encode(stamps, now, *args))
    assert _maildirindex.load(path, stamps)[:5] == (folder.uidValidity, folder.uidNext, [1],
                                                     [m.uniqueId + f",S={m.size}"], ["S"])
    # Written with racy stamps anyway (an older version, a clock step): not trusted.
    curMtime = os.stat(os.path.join(path, "cur")).st_mtime_ns
    with open(os.path.join(path, INDEX), "rb") as f:
        data = f.read()
    with open(os.path.join(path, INDEX), "wb") as f:
        f.write(data.replace(b" T%d " % now, b" T%d " % (curMtime + 1000), 1))
    assert _maildirindex.load(path, stamps) is None


def test_smallFoldersHaveNoIndex(dataDir, monkeypatch):
    monkeypatch.setattr(_maildirindex, "MIN_MESSAGES", 10)
    store = MaildirStore(dataDir)
    deliver(store, message(1))
    path = folderDir(dataDir)
    openFolder(store)
    backdate(path)
    folder = openFolder(MaildirStore(dataDir))
    # The scan's worker decided; a save would have been started before openFolder fired.
    call(folder, "refresh")
    assert not os.path.exists(os.path.join(path, INDEX))
    assert uids(folder) == [1]


def test_modseqsSurviveARestartFromTheIndex(dataDir):
    store = MaildirStore(dataDir)
    for n in range(3):
        deliver(store, message(n))
    folder = openFolder(store)
    call(folder, "setFlags", [3], ["\\Flagged"], "add")
    highest, of3 = folder.highestModSeq, folder.message(3).modseq
    path = folderDir(dataDir)
    backdate(path)
    openFolder(MaildirStore(dataDir))
    waitForIndex(path)
    again = openFolder(MaildirStore(dataDir))
    assert again.highestModSeq == highest
    assert again.message(3).modseq == of3
    assert again.changedSince(highest - 1) == [3]


def test_deferToThreadIsUsedForTheSave(dataDir):
    """The index is written by the store's worker function, never on the reactor thread."""
    calls = []

    def run(f, *args):
        calls.append(f)
        return defer.maybeDeferred(f, *args)

    store = MaildirStore(dataDir)
    for n in range(2):
        deliver(store, message(n))
    openFolder(store)
    backdate(folderDir(dataDir))
    openFolder(MaildirStore(dataDir, deferToThread=run))
    assert _maildirindex.save in calls


def test_unchangedFolderIsNotIndexedAgain(dataDir, monkeypatch):
    """The periodic full scan of an unchanged folder does not rewrite its index."""
    path, before, _, _ = indexedFolder(dataDir)
    store = MaildirStore(dataDir)
    folder = openFolder(store)
    saves = []
    monkeypatch.setattr(_maildirindex, "save", lambda *args: saves.append(args))
    monkeypatch.setattr(maildirfolder, "FULL_SCAN_INTERVAL", -1.0)
    assert not call(folder, "refresh")
    assert saves == []
    assert view(folder) == before
