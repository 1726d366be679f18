"""The mbox backend: what it does on disk, beyond the storage contract.

The contract (tests/test_store_conformance.py) runs for every backend; here
are the file format, locking, the index, crash safety and the cost of each
operation.  Other programs' view of the files (mutt, Python's mailbox) is in
tests/test_interop_mbox.py.
"""

from __future__ import annotations

import errno
import os
import random
import subprocess
import sys
import time

import pytest
from serverproc import waitUntil
from support import onReactor
from zope.interface.verify import verifyObject

from twistmail import _fsutil
from twistmail.config import ConfigError
from twistmail.delivery.spool import MessageSource
from twistmail.errors import StorageError
from twistmail.interfaces import IMailStoreFactory
from twistmail.storage import _locking, _mboxformat, _mboxindex, _mboxio
from twistmail.storage.mbox import MboxStore, MboxStoreFactory
from twistmail.testing.conformance import (
    call,
    deliver,
    failure,
    message,
    openFolder,
    readMessage,
    tree,
    uids,
)

ALICE = "alice@example.test"


@pytest.fixture
def store(dataDir):
    return MboxStore(dataDir, lockTimeout=5)


def restart(dataDir) -> MboxStore:
    return MboxStore(dataDir, lockTimeout=5)


def accountDir(dataDir, address=ALICE) -> str:
    local, domain = address.split("@")
    return os.path.join(dataDir, "mbox", domain, local)


def mboxPath(dataDir, *parts: str) -> str:
    return os.path.join(accountDir(dataDir), *(parts or ("INBOX",)))


def content(dataDir, *parts: str) -> bytes:
    with open(mboxPath(dataDir, *parts), "rb") as f:
        return f.read()


def deliverMany(store, count: int) -> None:
    def run():
        from twisted.internet import defer

        return defer.gatherResults([store.deliver(ALICE, "INBOX", MessageSource.fromBytes(
            message(n))) for n in range(count)])
    onReactor(run)


# -- the factory ------------------------------------------------------------------------


def test_factoryValidatesOptions(dataDir):
    factory = MboxStoreFactory()
    assert verifyObject(IMailStoreFactory, factory)
    built = factory.makeStore({"dotlock": False, "lock_timeout": 7}, dataDir)
    assert (built.dotlock, built.lockTimeout) == (False, 7.0)
    assert os.listdir(dataDir) == []  # no side effects (check-config builds one too)
    for options, key in [({"dotlock": "yes"}, "dotlock"), ({"lock_timeout": 0}, "lock_timeout"),
                         ({"lock_timeout": True}, "lock_timeout"), ({"flock": 1}, "flock")]:
        with pytest.raises(ConfigError, match=rf"\[storage.mbox\] {key}: .*Fix: "):
            factory.makeStore(options, dataDir)


# -- format ------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_mboxrdQuotingRoundTripsInAnyChunking(seed):
    """>From quoting must not depend on where a spooled message's chunks happen to split."""
    rng = random.Random(seed)
    pieces = [b"From ", b">From ", b">>From x", b"Fro", b"m ", b"\r\n", b"\n", b"text",
              b">", b"From", b"\r", b" From "]
    data = b"".join(rng.choice(pieces) for _ in range(400))
    whole, count = _mboxformat._QUOTE.subn(rb">\1", data)
    q = _mboxformat.quoter()
    out, pos = [], 0
    while pos < len(data):
        step = rng.randint(1, 9)
        out.append(q.feed(data[pos:pos + step]))
        pos += step
    out.append(q.end())
    assert b"".join(out) == whole and q.count == count
    assert _mboxformat.unquote(whole) == data
    assert b"\nFrom " not in whole and not whole.startswith(b"From ")  # none is a separator


def test_fileLayoutAndMessageFormat(store, dataDir):
    unique = deliver(store, b"Subject: hi\r\n\r\nFrom the body\r\n>From quoted\r\n")
    deliver(store, message(1), folder="Work/Clients")
    data = content(dataDir)
    head, body = data.split(b"Subject: hi\r\n", 1)
    lines = head.split(b"\n")
    assert lines[0].startswith(b"From MAILER-DAEMON ")
    assert _mboxformat.parseDate(lines[0]) is not None
    assert lines[1] == b"X-UIDL: " + unique.encode()
    assert lines[2] == b"Status:   "  # not yet seen by anyone: mutt shows it as new
    assert lines[3].startswith(b"X-Status: ") and lines[4].startswith(b"X-Keywords: ")
    assert body == b"\r\n>From the body\r\n>>From quoted\r\n\n"  # mboxrd, then the separator
    assert os.path.isfile(mboxPath(dataDir, "Work.sbd", "Clients"))
    # Nothing but the folders' files, their indexes and modseq journals (once opened) and
    # the .sbd directory.
    openFolder(store)
    assert sorted(os.listdir(accountDir(dataDir))) == [".INBOX.index", ".INBOX.modseq",
                                                       ".uidvalidity", "INBOX", "Work.sbd"]


def test_flagsAreWrittenInPlace(store, dataDir):
    for n in range(3):
        deliver(store, message(n))
    folder = openFolder(store)
    before = os.stat(mboxPath(dataDir))
    call(folder, "setFlags", [2], ["\\Seen", "\\Flagged", "\\Answered", "todo", "$Forwarded"],
         "add")
    call(folder, "setFlags", [3], ["\\Deleted", "\\Draft"], "add")
    after = os.stat(mboxPath(dataDir))
    assert (after.st_ino, after.st_size) == (before.st_ino, before.st_size)
    messages = content(dataDir).split(b"\nFrom ")
    assert b"Status: RO\nX-Status: AF  \nX-Keywords: $Forwarded todo " in messages[1]
    assert b"Status: O \nX-Status: DT  \n" in messages[2]
    assert b"Status:   \n" in messages[0]  # untouched
    assert call(folder, "readMessages", [1, 2, 3]) == [message(0), message(1), message(2)]


def test_keywordsOutgrowingTheirRoomRewriteTheFileOnce(store, dataDir, monkeypatch):
    deliverMany(store, 4)
    folder = openFolder(store)
    renames = []
    realRename = os.rename
    monkeypatch.setattr(os, "rename", lambda a, b: renames.append(b) or realRename(a, b))
    keywords = [f"a-rather-long-keyword-{n}" for n in range(10)]
    call(folder, "setFlags", [1, 2, 3, 4], keywords, "add")
    assert renames.count(mboxPath(dataDir)) == 1
    assert all(m.flags == frozenset(keywords) for m in folder.messages())
    assert b"X-Keywords: " + b" ".join(sorted(k.encode() for k in keywords)) in content(dataDir)
    # And now there is room again: the next change is in place.
    renames.clear()
    call(folder, "setFlags", [1], ["\\Seen"], "add")
    assert renames.count(mboxPath(dataDir)) == 0
    again = openFolder(restart(dataDir))
    assert sorted(call(again, "readMessages", [1, 2, 3, 4])) == sorted(message(n) for n in range(4))
    assert again.message(1).flags == frozenset(keywords) | {"\\Seen"}


# -- appends cost O(message) ------------------------------------------------------------


def test_deliveryReadsTwoBytesOfABigMailbox(store, dataDir, monkeypatch):
    deliverMany(store, 200)
    openFolder(store)  # the index exists: a delivery must not need it either
    read = []
    realPread, realOpen = os.pread, os.open
    monkeypatch.setattr(os, "pread", lambda fd, n, at: read.append(n) or realPread(fd, n, at))
    opened = []
    monkeypatch.setattr(os, "open", lambda path, *a, **k: opened.append(path) or
                        realOpen(path, *a, **k))
    deliver(store, message(999))
    assert sum(read) <= 2, read  # only the end of the file, to place the separator
    assert not [p for p in opened if str(p).endswith(".index")]


def test_refreshAfterAppendsParsesOnlyTheNewTail(store, dataDir, monkeypatch):
    deliverMany(store, 50)
    folder = openFolder(store)
    size = os.path.getsize(mboxPath(dataDir))
    parsed = []
    realParse = _mboxformat.parse
    monkeypatch.setattr(_mboxformat, "parse", lambda buf, start, stop, date: parsed.append(
        (start, stop)) or realParse(buf, start, stop, date))
    assert not call(folder, "refresh")  # unchanged: a stat, no parse
    assert parsed == []
    deliver(store, message(50))
    assert call(folder, "refresh").added == (51,)
    assert parsed == [(size, os.path.getsize(mboxPath(dataDir)))]


def test_deliveryIsDurableBeforeItFires(store, dataDir, monkeypatch):
    """SMTP says 250 when deliver fires: the appended message must be fsynced by then."""
    deliver(store, message(0))
    events = []
    realFsync = os.fsync

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return realFsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)

    def deliverAndMark():
        d = store.deliver(ALICE, "INBOX", MessageSource.fromBytes(message(1)))
        return d.addCallback(lambda unique: events.append(("fired", unique)))

    onReactor(deliverAndMark)
    path = os.path.realpath(mboxPath(dataDir))
    assert events.index(("fsync", path)) < [e[0] for e in events].index("fired")


def test_firstDeliveryMakesEveryNewDirectoryDurable(store, dataDir, monkeypatch):
    synced = []
    realFsyncDir = _fsutil.fsyncDir
    monkeypatch.setattr(_fsutil, "fsyncDir", lambda p: synced.append(os.path.realpath(p)) or
                        realFsyncDir(p))
    deliver(store, message(1))
    data = os.path.realpath(dataDir)
    root = os.path.join(data, "mbox", "example.test", "alice")
    for path in (root, os.path.dirname(root), os.path.join(data, "mbox"), data):
        assert path in synced, path


def test_failedWriteLeavesTheFileAsItWas(store, dataDir, monkeypatch):
    deliver(store, message(1))
    before = content(dataDir)
    realPwrite = os.pwrite
    calls = []

    def pwrite(fd, data, at):
        calls.append(at)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return realPwrite(fd, data, at)

    monkeypatch.setattr(os, "pwrite", pwrite)
    error = failure(store.deliver, ALICE, "INBOX", MessageSource.fromBytes(message(2)))
    assert isinstance(error, StorageError) and "No space" in str(error)
    assert content(dataDir) == before
    monkeypatch.undo()
    assert uids(openFolder(store)) == [1]


# -- expunge: a crash at any moment loses nothing --------------------------------------


@pytest.mark.parametrize("crashAt", ["copying", "fsync", "rename", "fsyncDir", "index"])
def test_expungeCrashLeavesOneCompleteFile(store, dataDir, monkeypatch, crashAt):
    for n in range(5):
        deliver(store, message(n))
    folder = openFolder(store)
    call(folder, "setFlags", [2], ["\\Seen"], "add")
    before = content(dataDir)

    class Crash(Exception):
        pass

    def crash(*args, **kwargs):
        raise Crash()

    target = {"copying": (_mboxio, "copyRange"), "fsync": (os, "fsync"),
              "rename": (os, "rename"), "fsyncDir": (_fsutil, "fsyncDir"),
              "index": (_mboxindex, "write")}[crashAt]
    monkeypatch.setattr(*target, crash)
    failure(folder.remove, [1, 3])
    monkeypatch.undo()

    # The "machine" restarts: whichever file is there is complete and readable.
    after = openFolder(restart(dataDir))
    expected = {2: message(1), 4: message(3), 5: message(4)}
    if content(dataDir) == before:
        expected.update({1: message(0), 3: message(2)})
    assert call(after, "readMessages", sorted(expected)) == [expected[u] for u in sorted(expected)]
    assert uids(after) == sorted(expected)
    assert after.message(2).flags == {"\\Seen"}
    assert after.uidValidity == folder.uidValidity
    call(after, "remove", [1, 3])  # and the expunge can be done again
    assert uids(after) == [2, 4, 5]
    assert [n for n in os.listdir(accountDir(dataDir)) if "rewrite" in n] == []


def test_expungeWritesUidsIntoTheFileSoAnIndexIsNotNeeded(store, dataDir):
    for n in range(4):
        deliver(store, message(n))
    folder = openFolder(store)
    call(folder, "setFlags", [3], ["\\Flagged", "work"], "add")
    call(folder, "remove", [1])
    data = content(dataDir)
    assert b"X-IMAPbase: %d %010d work\n" % (folder.uidValidity, 5) in data
    assert [b"X-UID: %d\n" % u in data for u in (2, 3, 4)] == [True] * 3
    os.unlink(mboxPath(dataDir, ".INBOX.index"))
    again = openFolder(restart(dataDir))
    assert (again.uidValidity, again.uidNext, uids(again)) == (folder.uidValidity, 5, [2, 3, 4])
    assert again.message(3).flags == {"\\Flagged", "work"}
    assert [m.uniqueId for m in again.messages()] == [m.uniqueId for m in folder.messages()]


# -- other programs ------------------------------------------------------------------------


def rewriteLikeMutt(path: str) -> None:
    """mutt syncing a folder: Status/X-Status dropped where they were and written (unpadded)
    at the end of the header with Content-Length and Lines, then an empty line that is "\n"
    whatever the message's line endings; other fields kept (neomutt 20220429 does this)."""
    with open(path, "rb") as f:
        data = f.read()
    out = []
    for raw in data.split(b"\n\nFrom "):
        raw = raw if raw.startswith(b"From ") else b"From " + raw
        head, _, body = raw.partition(b"\r\n\r\n")
        lines = [line for line in head.split(b"\n") if not line.startswith((b"Status:",
                                                                           b"X-Status:"))]
        lines[-1] = lines[-1] + b"\r\nStatus: RO\nX-Status: F\nContent-Length: %d\nLines: 1" % (
            len(body))
        out.append(b"\n".join(lines) + b"\n\n" + body.rstrip(b"\n") + b"\n")
    with open(path, "r+b") as f:  # in place, as mutt does
        f.write(b"\n".join(out) + b"\n")
        f.truncate()


def test_anotherProgramsRewriteKeepsUidsAndReadsItsFlags(store, dataDir):
    for n in range(3):
        deliver(store, message(n))
    folder = openFolder(store)
    call(folder, "remove", [1])
    validity = folder.uidValidity
    rewriteLikeMutt(mboxPath(dataDir))
    changes = call(folder, "refresh")
    assert set(changes.flagsChanged) == {2, 3} and not changes.removed and not changes.added
    assert folder.uidValidity == validity
    assert {m.uid: m.flags for m in folder.messages()} == {2: {"\\Seen", "\\Flagged"},
                                                           3: {"\\Seen", "\\Flagged"}}
    # mutt's own fields are metadata too: the messages read as they always did.
    assert call(folder, "readMessages", [2, 3]) == [message(1), message(2)]
    # Its unpadded Status cannot be changed in place: the next change rewrites, once.
    call(folder, "setFlags", [2], ["\\Flagged"], "remove")
    assert b"Content-Length" not in content(dataDir)
    again = openFolder(restart(dataDir))
    assert {m.uid: m.flags for m in again.messages()} == {2: {"\\Seen"},
                                                          3: {"\\Seen", "\\Flagged"}}


def test_aCopyWithOurXUidlGetsAUidlOfItsOwn(store, dataDir):
    """mutt copying a message within the folder copies its X-UIDL too; POP3 UIDLs must differ."""
    deliver(store, message(1))
    deliver(store, message(2))
    folder = openFolder(store)
    data = content(dataDir)
    first = data[:data.index(b"\nFrom ") + 1]
    with open(mboxPath(dataDir), "ab") as f:
        f.write(first)  # the same From_ line, block and message, appended
    assert call(folder, "refresh").added == (3,)
    ids = [m.uniqueId for m in folder.messages()]
    assert len(set(ids)) == 3
    assert call(folder, "readMessages", [1, 3]) == [message(1)] * 2
    call(folder, "remove", [2])  # a rewrite, then a restart without the index
    os.unlink(mboxPath(dataDir, ".INBOX.index"))
    again = openFolder(restart(dataDir))
    assert [m.uniqueId for m in again.messages()] == [ids[0], ids[2]]
    assert uids(again) == [1, 3]


def test_aReaderWhoseOffsetsWentStaleRereadsTheIndex(dataDir):
    """Two servers' worth of state on one file (another process expunged meanwhile)."""
    first, second = restart(dataDir), restart(dataDir)
    for n in range(4):
        deliver(first, message(n))
    a, b = openFolder(first), openFolder(second)
    call(a, "remove", [1, 2])
    assert call(b, "readMessages", [4]) == [message(3)]  # found again after a refresh
    assert isinstance(failure(b.readMessages, [1]), StorageError)
    assert uids(b) == [3, 4]


def test_corruptOrTornIndexIsRebuilt(store, dataDir):
    for n in range(3):
        deliver(store, message(n))
    folder = openFolder(store)
    call(folder, "setFlags", [1], ["\\Seen"], "add")
    path = mboxPath(dataDir, ".INBOX.index")
    with open(path, "a") as f:
        f.write("f\t2\tS")  # torn by a crash
    again = openFolder(restart(dataDir))
    assert {m.uid: m.flags for m in again.messages()} == {1: {"\\Seen"}, 2: set(), 3: set()}
    with open(path, "w") as f:
        f.write("garbage\n")
    again = openFolder(restart(dataDir))
    assert call(again, "readMessages", uids(again)) == [message(n) for n in range(3)]
    assert again.message(1).flags == {"\\Seen"}  # the file is the truth for flags


# -- locking -----------------------------------------------------------------------------


def holdFcntlLockInAnotherProcess(path: str) -> subprocess.Popen:
    child = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys; f = open(sys.argv[1], 'r+'); "
         "fcntl.lockf(f, fcntl.LOCK_EX); print('locked', flush=True); sys.stdin.read()", path],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert child.stdout.readline() == b"locked\n"
    return child


def lockAttempted(monkeypatch):
    """An event set when a mailbox lock is first found taken (so the waiting has begun)."""
    import threading

    waiting = threading.Event()
    realTry = _locking._tryFcntl

    def tryFcntl(fd, exclusive):
        got = realTry(fd, exclusive)
        if not got:
            waiting.set()
        return got

    monkeypatch.setattr(_locking, "_tryFcntl", tryFcntl)
    return waiting


def test_deliveryWaitsForAnotherProgramsFcntlLock(store, dataDir, monkeypatch):
    deliver(store, message(1))
    waiting = lockAttempted(monkeypatch)
    child = holdFcntlLockInAnotherProcess(mboxPath(dataDir))
    events = []
    onReactor(lambda: store.deliver(ALICE, "INBOX", MessageSource.fromBytes(
        message(2))).addBoth(events.append) and None)
    assert waiting.wait(10)
    events.append("released")
    child.stdin.close()
    child.wait()
    waitUntil(lambda: len(events) == 2, 10, "the delivery")
    assert events[0] == "released" and isinstance(events[1], str)
    assert uids(openFolder(store)) == [1, 2]


def test_lockTimeoutIsATemporaryFailure(dataDir):
    store = MboxStore(dataDir, lockTimeout=0.3)
    deliver(store, message(1))
    child = holdFcntlLockInAnotherProcess(mboxPath(dataDir))
    try:
        started = time.monotonic()
        error = failure(store.deliver, ALICE, "INBOX", MessageSource.fromBytes(message(2)))
        assert isinstance(error, _locking.LockTimeout) and isinstance(error, StorageError)
        assert time.monotonic() - started >= 0.3
    finally:
        child.stdin.close()
        child.wait()
    assert uids(openFolder(store)) == [1]


def test_dotlockIsTakenAndHonoured(dataDir, monkeypatch):
    store = MboxStore(dataDir, lockTimeout=0.3)
    deliver(store, message(1))
    lock = mboxPath(dataDir) + ".lock"
    seen = []
    realWrite = _mboxio.writeMessages
    monkeypatch.setattr("twistmail.storage.mbox.writeMessages",
                        lambda fd, outs: seen.append(os.path.exists(lock)) or realWrite(fd, outs))
    deliver(store, message(2))
    assert seen == [True] and not os.path.exists(lock)

    with open(lock, "w") as f:  # another program's, alive
        f.write(f"{os.getppid()}\n")
    assert isinstance(failure(store.deliver, ALICE, "INBOX", MessageSource.fromBytes(
        message(3))), _locking.LockTimeout)
    assert os.path.exists(lock)
    noDotlock = MboxStore(dataDir, dotlock=False, lockTimeout=0.3)
    deliver(noDotlock, message(3))  # dotlock = false: fcntl alone
    assert uids(openFolder(noDotlock)) == [1, 2, 3]


@pytest.mark.parametrize("content_, age, stale", [
    (b"999999999\n", 600, True),  # its process is gone, and it is old
    (b"999999999\n", 10, False),  # gone, but too recent to be sure (liblockfile: 5 minutes)
    (b"<own pid>", 600, False),  # its process is alive
    (b"", 600, True),  # no pid (mutt, Python's mailbox): age alone
    (b"", 10, False),
])
def test_staleDotlocks(tmp_path, content_, age, stale):
    # Filled in here, not in the id: pytest-xdist workers must collect the same ids.
    content_ = b"%d\n" % os.getpid() if content_ == b"<own pid>" else content_
    lock = tmp_path / "INBOX.lock"
    lock.write_bytes(content_)
    then = time.time() - age
    os.utime(lock, (then, then))
    assert _locking.isStale(str(lock)) is stale


def test_staleDotlockIsBroken(store, dataDir):
    deliver(store, message(1))
    lock = mboxPath(dataDir) + ".lock"
    with open(lock, "w") as f:
        f.write("999999999\n")
    then = time.time() - 3600
    os.utime(lock, (then, then))
    deliver(store, message(2))
    assert not os.path.exists(lock)
    assert uids(openFolder(store)) == [1, 2]


def test_readersWaitForAWriter(store, dataDir, monkeypatch):
    """A refresh takes a shared fcntl lock: it never parses a half-appended message."""
    deliver(store, message(1))
    folder = openFolder(store)
    waiting = lockAttempted(monkeypatch)
    child = holdFcntlLockInAnotherProcess(mboxPath(dataDir))
    with open(mboxPath(dataDir), "ab") as f:
        f.write(b"From someone Mon Jan  1 00:00:00 2024\nSubject: half")
        f.flush()
        results = []
        onReactor(lambda: folder.refresh().addBoth(results.append) and None)
        assert waiting.wait(10)
        f.write(b" written\n\nbody\n\n")
    child.stdin.close()
    child.wait()
    waitUntil(lambda: results, 10, "the refresh")
    assert results[0].added == (2,)
    assert readMessage(folder, 2) == b"Subject: half written\n\nbody\n"
    assert folder.message(2).internalDate == 1704067200


# -- names ----------------------------------------------------------------------------


@pytest.mark.parametrize("address", [
    "../x@example.test", "a/b@example.test", "..@example.test", "x@..", "x@a/b",
    "x@example.test/../../etc", "/abs@example.test", "a\x00b@example.test",
])
def test_accountPathRejectsEscapes(store, address):
    with pytest.raises(StorageError):
        store.accountPath(address)


@pytest.mark.parametrize("name, path", [
    ("Work", "Work"), ("Work/Clients", "Work.sbd/Clients"), ("INBOX/Sub", "INBOX.sbd/Sub"),
    ("a.b", "a%2Eb"), ("x.sbd", "x%2Esbd"), ("%", "%25"), (".hidden", "%2Ehidden"),
])
def test_folderFiles(store, dataDir, name, path):
    onReactor(store.account(ALICE).createFolder, name)
    assert os.path.isfile(os.path.join(accountDir(dataDir), path))
    for entry in tree(accountDir(dataDir)):
        base = os.path.basename(entry)
        assert "." not in base or base.endswith(".sbd") or base.startswith("."), entry
