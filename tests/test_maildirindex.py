"""twistmail-index: the Maildir folder index a restarted server loads instead of listing cur/.

It is a cache: these tests check that it is used when it holds, and that a
stale, racy, torn or corrupt one is never trusted (the folder is listed and
the index rebuilt).
"""

from __future__ import annotations

import os
import time

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


def waitForIndex(path: str, timeout: float = 10) -> str:
    """The index text once the worker has written it (polled, with a deadline)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(os.path.join(path, INDEX), encoding="utf-8") as f:
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


@pytest.mark.parametrize("damage", [
    lambda text: text[:-10],  # torn: a crash while writing in place (atomicWrite prevents it)
    lambda text: text.replace(" :", " ", 1),  # a field missing
    lambda text: text.replace("\n1 ", "\nx ", 1),  # not a number
    lambda text: text.replace("\n2 ", "\n1 ", 1),  # UIDs not ascending
    lambda text: text.replace(" K3 ", " K4 ", 1),  # wrong count
    lambda text: text.replace("twistmail-index 1", "twistmail-index 9", 1),
    lambda text: "\udcff".join(text.split("\n", 1)).encode("utf-8", "surrogateescape"),
], ids=["torn", "field", "number", "order", "count", "version", "encoding"])
def test_corruptIndexIsRebuilt(dataDir, monkeypatch, damage):
    path, before, _, _ = indexedFolder(dataDir)
    indexPath = os.path.join(path, INDEX)
    with open(indexPath, encoding="utf-8") as f:
        damaged = damage(f.read())
    with open(indexPath, "wb") as f:
        f.write(damaged if isinstance(damaged, bytes) else damaged.encode())
    listed = listing(monkeypatch)
    assert view(openFolder(MaildirStore(dataDir))) == before
    assert "cur" in listed
    assert waitForFresh(indexPath, damaged)


def waitForFresh(indexPath: str, damaged, timeout: float = 10) -> bool:
    """The damaged index is replaced by a good one (written by a worker: polled)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(indexPath, "rb") as f:
            data = f.read()
        if data != (damaged if isinstance(damaged, bytes) else damaged.encode()):
            return True
        time.sleep(0.01)
    return False


def test_racyStampsAreNeitherWrittenNorTrusted(dataDir):
    store = MaildirStore(dataDir)
    deliver(store, message(1))
    openFolder(store)
    path = folderDir(dataDir)
    now = _maildirindex.now()
    stamps = _maildirindex.stamps(path, maildirfolder._SIDECARS)  # cur/ changed just now
    entry = maildirfolder._Entry(("1.M1P1Q1.host,S=3", "", 3, 1))
    assert not _maildirindex.save(path, stamps, now, 1, 2, [(1, entry)])
    assert not os.path.exists(os.path.join(path, INDEX))
    # Written anyway (an older version, a clock step): still not trusted on load.
    with open(os.path.join(path, INDEX), "w", encoding="utf-8") as f:
        f.write(f"{_maildirindex.MAGIC} V1 N2 K1 T{now} {stamps}\n1 1 3 1.M1P1Q1.host,S=3 :\n")
    assert _maildirindex.load(path, stamps) is None
    backdate(path)
    stamps = _maildirindex.stamps(path, maildirfolder._SIDECARS)
    assert _maildirindex.save(path, stamps, now, 1, 2, [(1, entry)])
    assert _maildirindex.load(path, stamps)[:3] == (1, 2, [1])


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
