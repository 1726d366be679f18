# -*- test-case-name: tests.test_store_conformance -*-
"""StoreConformanceTests: the storage contract of L{twistmail.interfaces}, as tests.

Every behaviour here is one the POP3 and IMAP servers rely on, checked only
through L{IMailStore}, L{IMailAccount} and L{IMailbox}, so the same tests run
against Maildir, mbox and any third-party backend.  What a backend does on
disk (file names, fsync order, locking) is its own tests' business.

Subclass in a module pytest collects, with a name starting with ``Test``::

    class TestMyStore(StoreConformanceTests):
        def makeStore(self, dataDir):
            return MyStore(dataDir)

and optionally override L{restart}, L{externalDelivery} and L{accountDir}.
Every storage call returns a Deferred: the tests run them on a reactor in a
background thread (L{twistmail.testing.onReactor}).
"""

from __future__ import annotations

import os
import threading

import pytest
from twisted.internet import defer, reactor
from zope.interface.verify import verifyObject

from twistmail.delivery.spool import MessageSource
from twistmail.errors import (
    FolderExists,
    InvalidFolderName,
    NoSuchFolder,
    NoSuchMessage,
    StorageError,
)
from twistmail.interfaces import IMailAccount, IMailbox, IMailStore, IModSeqMailbox
from twistmail.testing._reactor import onReactor

ALICE = "alice@example.test"
BOB = "bob@example.test"
#: Operations started at once by the concurrency tests (the thread pool runs up to ten).
CONCURRENCY = 24

HOSTILE_NAMES = ["..", "../x", "a/../b", "/abs", "", "a//b", ".", "a/.", "x\x00y", "x\ry", "x\ny",
                 "x\x7fy", "x" * 2000, "../../../../etc", "INBOX/../../x"]
HOSTILE_ADDRESSES = ["../x@example.test", "a/b@example.test", "alice@../etc", "nobody",
                     "..@example.test", "x@..", "x@example.test/../../etc", "a\x00b@example.test"]


# -- helpers (also useful in a backend's own tests) ---------------------------------------


def message(n: int) -> bytes:
    return b"From: bob@example.test\r\nSubject: message %d\r\n\r\nbody %d\r\n" % (n, n)


def deliver(store, data: bytes, folder: str = "INBOX", account: str = ALICE,
            prefix: bytes = b"") -> str:
    source = MessageSource(prefix=prefix)
    source.write(data)
    return onReactor(store.deliver, account, folder, source)


def openFolder(store, name: str = "INBOX", account: str = ALICE):
    return onReactor(store.account(account).openFolder, name)


def call(obj, method: str, *args):
    return onReactor(getattr(obj, method), *args)


def failure(f, *args) -> Exception:
    """Call f on the reactor; it must return a Deferred that fails.  Return the exception.

    Raising synchronously instead would break the contract the protocol
    adapters rely on (they add errbacks, they do not catch).
    """
    def run():
        try:
            d = f(*args)
        except Exception as e:
            return "raised synchronously", e
        if not isinstance(d, defer.Deferred):
            return "returned a non-Deferred", d
        return d.addCallbacks(lambda result: ("succeeded", result), lambda f: ("failed", f.value))

    outcome, value = onReactor(run)
    assert outcome == "failed", f"{getattr(f, '__name__', f)}{args!r:.80}: {outcome}: {value!r:.200}"
    return value


def readMessage(folder, uid: int) -> bytes:
    f = onReactor(folder.openMessage, uid)
    try:
        return f.read()
    finally:
        f.close()


def uids(folder) -> list[int]:
    return [m.uid for m in folder.messages()]


def byUid(folder) -> dict:
    return {m.uid: m for m in folder.messages()}


def tree(root: str) -> set[str]:
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            out.add(os.path.relpath(os.path.join(dirpath, name), root))
    return out


def waitForChange(folder, action, predicate=lambda changes: bool(changes.added),
                  timeout: float = 10):
    """Run C{action()} on the reactor with a listener on C{folder}; return the first
    changes it hears that satisfy C{predicate}, with the thread it heard them on."""
    def run():
        d = defer.Deferred()

        def listener(changes):
            if predicate(changes) and not d.called:
                d.callback((changes, threading.current_thread().name))

        folder.addListener(listener)
        action()
        return d.addTimeout(timeout, reactor).addBoth(
            lambda result: (folder.removeListener(listener), result)[1])

    return onReactor(run)


class StoreConformanceTests:
    """The storage contract; see the module docstring for how to use it."""

    # -- hooks --------------------------------------------------------------------------

    def makeStore(self, dataDir: str):
        """Build the store under test on C{dataDir} (an empty directory)."""
        raise NotImplementedError

    def restart(self, dataDir: str):
        """A store on the same data as before, as a server restart sees it."""
        return self.makeStore(dataDir)

    #: Whether other programs may write into the store (then implement L{externalDelivery}).
    hasExternalWriters = False

    def externalDelivery(self, dataDir: str, account: str, folder: str, data: bytes) -> None:
        """Add a message to a folder the way another program (an MDA) would."""
        raise NotImplementedError

    def _needExternalWriters(self) -> None:
        if not self.hasExternalWriters:
            pytest.skip("this backend has no external writers")

    def accountDir(self, dataDir: str, address: str) -> str | None:
        """Where the account's files live, if the backend keeps it in one directory."""
        return None

    # -- fixtures -------------------------------------------------------------------------

    @pytest.fixture
    def dataDir(self, tmp_path) -> str:
        d = tmp_path / "data"
        d.mkdir()
        return str(d)

    @pytest.fixture
    def store(self, dataDir):
        return self.makeStore(dataDir)

    # -- interfaces -----------------------------------------------------------------------

    def test_providesInterfaces(self, store):
        assert verifyObject(IMailStore, store)
        assert verifyObject(IMailAccount, store.account(ALICE))
        assert verifyObject(IMailbox, openFolder(store))

    # -- delivery -------------------------------------------------------------------------

    def test_deliverKeepsExactBytes(self, store):
        body = b"Subject: hi\r\n\r\nbinary \x00\xff and a long line " + b"x" * 5000 + b"\r\n"
        prefix = b"Received: from client by mx.example.test\r\n"
        unique = deliver(store, body, prefix=prefix)
        folder = openFolder(store)
        [stored] = folder.messages()
        assert stored.uniqueId == unique
        assert readMessage(folder, stored.uid) == prefix + body
        assert stored.size == len(prefix + body)

    def test_deliverKeepsMboxLookalikesAndOddEndings(self, store, dataDir):
        """Lines an mbox would confuse with a separator, bare CR/LF, no final newline."""
        bodies = [b"Subject: a\r\n\r\nFrom me\r\n>From you\r\n>>From them\r\n\r\nFrom \r\n",
                  b"Subject: b\n\nFrom bare LF\nend\n", b"Subject: c\r\n\r\nno newline at the end",
                  b"Subject: d\r\n\r\n\r\n\r\n", b"From x\r\n\r\nstarts with From\r\n",
                  b"Status: RO\r\nX-UID: 7\r\nSubject: e\r\n\r\nheaders an mbox uses\r\n"]
        for body in bodies:
            deliver(store, body)
        folder = openFolder(store)
        assert [readMessage(folder, u) for u in uids(folder)] == bodies
        assert call(folder, "readMessages", uids(folder)) == bodies
        assert [m.size for m in folder.messages()] == [len(b) for b in bodies]
        assert [m.flags for m in folder.messages()] == [frozenset()] * len(bodies)
        again = openFolder(self.restart(dataDir))
        assert call(again, "readMessages", uids(again)) == bodies
        assert [m.flags for m in again.messages()] == [frozenset()] * len(bodies)

    def test_deliverSpooledMessage(self, store, tmp_path):
        """A message past maxMemory sits in a spool file; the stored copy is still exact."""
        source = MessageSource(prefix=b"Received: by test\r\n", spoolDir=str(tmp_path / "spool"),
                               maxMemory=4096)
        chunks = [bytes([n % 256]) * 1000 + b"\r\n" for n in range(300)]
        for chunk in chunks:
            source.write(chunk)
        unique = onReactor(store.deliver, ALICE, "INBOX", source)
        folder = openFolder(store)
        assert folder.messages()[0].uniqueId == unique
        data = readMessage(folder, 1)
        assert data == b"Received: by test\r\n" + b"".join(chunks)
        assert folder.messages()[0].size == len(data)

    def test_deliverToFolderCreatesIt(self, store):
        deliver(store, message(1), folder="Lists/Twisted")
        folder = openFolder(store, "Lists/Twisted")
        assert [readMessage(folder, u) for u in uids(folder)] == [message(1)]

    def test_twoDeliveriesGetDistinctUniqueIds(self, store):
        first = deliver(store, message(1))
        second = deliver(store, message(1))
        assert first != second
        assert [m.uniqueId for m in openFolder(store).messages()] == [first, second]

    def test_concurrentDeliveriesAllArrive(self, store):
        def deliverMany():
            return defer.gatherResults([
                store.deliver(ALICE, "INBOX", MessageSource.fromBytes(message(n)))
                for n in range(20)])

        uniques = onReactor(deliverMany)
        folder = openFolder(store)
        assert sorted(m.uniqueId for m in folder.messages()) == sorted(uniques)
        assert sorted(call(folder, "readMessages", uids(folder))) == sorted(
            message(n) for n in range(20))

    def test_deliverToInvalidAccountFails(self, store, dataDir):
        before = tree(os.path.dirname(dataDir))
        for account in HOSTILE_ADDRESSES:
            error = failure(store.deliver, account, "INBOX", MessageSource.fromBytes(message(1)))
            assert isinstance(error, StorageError), account
        assert tree(os.path.dirname(dataDir)) == before

    def test_accountNamesAreCaseFolded(self, store):
        deliver(store, message(1), account="Alice@Example.TEST")
        assert uids(openFolder(store, account="alice@example.test")) == [1]

    # -- UIDs -----------------------------------------------------------------------------

    def test_uidsFollowDeliveryOrder(self, store):
        bodies = [message(n) for n in range(1, 6)]
        uniques = [deliver(store, b) for b in bodies]
        folder = openFolder(store)
        assert uids(folder) == [1, 2, 3, 4, 5]
        assert [readMessage(folder, u) for u in uids(folder)] == bodies
        assert [m.uniqueId for m in folder.messages()] == uniques
        assert [m.size for m in folder.messages()] == [len(b) for b in bodies]
        assert folder.uidNext == 6

    def test_uidValidityAndUidsStableAcrossRestartAndDeliveries(self, store, dataDir):
        for n in range(3):
            deliver(store, message(n))
        folder = openFolder(store)
        validity = folder.uidValidity
        assert validity > 0
        before = {m.uid: (m.uniqueId, readMessage(folder, m.uid)) for m in folder.messages()}

        deliver(store, message(3))
        call(folder, "refresh")
        assert folder.uidValidity == validity

        again = openFolder(self.restart(dataDir))
        assert again.uidValidity == validity
        assert uids(again) == [1, 2, 3, 4]
        assert again.uidNext == 5
        for uid, (uniqueId, data) in before.items():
            assert byUid(again)[uid].uniqueId == uniqueId
            assert readMessage(again, uid) == data

    def test_uniqueIdSurvivesRestart(self, store, dataDir):
        unique = deliver(store, message(1))
        assert openFolder(store).messages()[0].uniqueId == unique
        assert openFolder(self.restart(dataDir)).messages()[0].uniqueId == unique

    def test_removedUidIsNeverReused(self, store, dataDir):
        for n in range(3):
            deliver(store, message(n))
        folder = openFolder(store)
        assert call(folder, "remove", [3]) == [3]
        deliver(store, message(4))
        call(folder, "refresh")
        assert uids(folder) == [1, 2, 4]

        # ... nor after a restart.
        folder2 = openFolder(self.restart(dataDir))
        call(folder2, "remove", [4])
        store3 = self.restart(dataDir)
        deliver(store3, message(5))
        assert uids(openFolder(store3)) == [1, 2, 5]

    def test_recreatedFolderGetsNewUidValidity(self, store):
        """RFC 3501 §2.3.1.1: a deleted and re-created mailbox must not repeat UIDVALIDITY."""
        account = store.account(ALICE)
        onReactor(account.createFolder, "Work")
        deliver(store, message(1), folder="Work")
        old = openFolder(store, "Work")
        oldValidity = old.uidValidity
        assert uids(old) == [1]
        del old

        onReactor(account.deleteFolder, "Work")
        onReactor(account.createFolder, "Work")
        deliver(store, message(2), folder="Work")
        new = openFolder(store, "Work")
        assert uids(new) == [1]
        assert new.uidValidity != oldValidity

    def test_openMessageUnknownUid(self, store):
        folder = openFolder(store)
        assert isinstance(failure(folder.openMessage, 42), NoSuchMessage)
        assert isinstance(failure(folder.readMessages, [42]), NoSuchMessage)

    def test_uidsAndMessageLookup(self, store):
        for n in range(3):
            deliver(store, message(n))
        folder = openFolder(store)
        assert tuple(folder.uids()) == (1, 2, 3)
        assert folder.message(2).uid == 2 and folder.message(2).size == len(message(1))
        assert folder.message(99) is None
        call(folder, "setFlags", [2], ["\\Seen", "todo"], "add")
        assert folder.message(2).flags == {"\\Seen", "todo"}
        assert "todo" in folder.keywords()

    def test_bigMessageStreamsExactly(self, store):
        body = b"Subject: big\r\n\r\n" + b"".join(b"line %d From here\r\nFrom there\r\n" % n
                                                   for n in range(100_000))
        deliver(store, body)
        deliver(store, b"Subject: big too\r\n\r\n" + b"y" * 3_000_000 + b"\r\n")
        folder = openFolder(store)
        assert readMessage(folder, 1) == body
        assert len(readMessage(folder, 2)) == folder.message(2).size

    # -- flags -----------------------------------------------------------------------------

    def test_systemFlagsPersist(self, store, dataDir):
        deliver(store, message(1))
        folder = openFolder(store)
        every = ["\\Seen", "\\Answered", "\\Flagged", "\\Deleted", "\\Draft"]
        result = call(folder, "setFlags", [1], every, "set")
        assert [m.flags for m in result] == [frozenset(every)]
        call(folder, "setFlags", [1], ["\\Deleted", "\\Draft"], "remove")
        assert folder.message(1).flags == {"\\Seen", "\\Answered", "\\Flagged"}
        call(folder, "setFlags", [1], ["\\Seen"], "set")
        call(folder, "setFlags", [1], ["\\Draft"], "add")
        assert folder.messages()[0].flags == frozenset({"\\Seen", "\\Draft"})
        assert readMessage(folder, 1) == message(1)

        again = openFolder(self.restart(dataDir))
        assert again.messages()[0].flags == frozenset({"\\Seen", "\\Draft"})
        assert readMessage(again, 1) == message(1)

    def test_flagColumnAgreesWithTheSnapshot(self, store, dataDir):
        folder = openFolder(store)
        assert folder.flagColumn() == []
        for n in range(1, 4):
            deliver(store, message(n))
        call(folder, "refresh")
        call(folder, "setFlags", [1, 3], ["\\Seen", "\\Flagged"], "add")
        seen = frozenset({"\\Seen", "\\Flagged"})
        assert folder.flagColumn() == [seen, frozenset(), seen]
        assert folder.flagColumn() == [m.flags for m in folder.messages()]
        assert openFolder(self.restart(dataDir)).flagColumn() == [seen, frozenset(), seen]

    def test_keywordsAndForwardedPersist(self, store, dataDir):
        deliver(store, message(1))
        deliver(store, message(2))
        folder = openFolder(store)
        call(folder, "setFlags", [1], ["$Forwarded", "Work", "\\Seen"], "add")
        call(folder, "setFlags", [2], ["Personal", "Work"], "add")
        expected = {1: frozenset({"$Forwarded", "Work", "\\Seen"}),
                    2: frozenset({"Personal", "Work"})}
        assert {m.uid: m.flags for m in folder.messages()} == expected
        assert {"Work", "Personal"} <= set(folder.keywords())
        again = openFolder(self.restart(dataDir))
        assert {m.uid: m.flags for m in again.messages()} == expected

        call(again, "setFlags", [1], ["$Forwarded", "Work"], "remove")
        assert byUid(again)[1].flags == frozenset({"\\Seen"})
        assert byUid(again)[2].flags == frozenset({"Personal", "Work"})
        assert [readMessage(again, u) for u in (1, 2)] == [message(1), message(2)]

    def test_manyKeywordsOnManyMessages(self, store, dataDir):
        """Up to the folder's limit, and the content never changes with the flags."""
        for n in range(5):
            deliver(store, message(n))
        folder = openFolder(store)
        limit = folder.maxKeywords if folder.maxKeywords is not None else 40
        keywords = [f"keyword-number-{n}" for n in range(limit)]
        call(folder, "setFlags", [2, 4], keywords, "add")
        call(folder, "setFlags", [3], ["\\Seen"], "add")
        assert byUid(folder)[2].flags == frozenset(keywords)
        assert call(folder, "readMessages", uids(folder)) == [message(n) for n in range(5)]
        again = openFolder(self.restart(dataDir))
        assert byUid(again)[4].flags == frozenset(keywords)
        assert byUid(again)[3].flags == {"\\Seen"}
        assert call(again, "readMessages", uids(again)) == [message(n) for n in range(5)]

    def test_tooManyKeywordsFailsWithoutChanges(self, store):
        deliver(store, message(1))
        folder = openFolder(store)
        if folder.maxKeywords is None:
            pytest.skip("no keyword limit")
        call(folder, "setFlags", [1], [f"k{n}" for n in range(folder.maxKeywords)], "set")
        error = failure(folder.setFlags, [1], ["one-too-many"], "add")
        assert isinstance(error, StorageError)
        assert len(folder.messages()[0].flags) == folder.maxKeywords

    def test_setFlagsOnlyTouchesGivenUids(self, store):
        for n in range(3):
            deliver(store, message(n))
        folder = openFolder(store)
        result = call(folder, "setFlags", [2, 99], ["\\Seen"], "add")
        assert [(m.uid, m.flags) for m in result] == [(2, frozenset({"\\Seen"}))]
        assert {m.uid: m.flags for m in folder.messages()} == {
            1: frozenset(), 2: frozenset({"\\Seen"}), 3: frozenset()}

    def test_flagListenersSeeChanges(self, store):
        deliver(store, message(1))
        folder = openFolder(store)
        seen = []
        folder.addListener(seen.append)
        try:
            call(folder, "setFlags", [1], ["\\Seen"], "add")
        finally:
            folder.removeListener(seen.append)
        assert [c.flagsChanged for c in seen] == [(1,)]

    # -- append, copy, remove ----------------------------------------------------------------

    def test_appendWithFlagsAndDate(self, store, dataDir):
        onReactor(store.account(ALICE).createFolder, "Sent")
        folder = openFolder(store, "Sent")
        deliver(store, message(1), folder="Sent")
        call(folder, "refresh")
        raw = b"From: alice@example.test\r\nSubject: sent\r\n\r\nhello\r\n"
        uid = call(folder, "append", raw, ["\\Seen", "Important"], 1600000000.0)
        assert uid == 2
        assert uid in uids(folder)
        stored = byUid(folder)[uid]
        assert stored.flags == frozenset({"\\Seen", "Important"})
        assert stored.internalDate == 1600000000
        assert stored.size == len(raw)
        assert readMessage(folder, uid) == raw
        assert folder.uidNext == 3

        again = openFolder(self.restart(dataDir), "Sent")
        assert readMessage(again, uid) == raw
        assert byUid(again)[uid].flags == frozenset({"\\Seen", "Important"})
        assert byUid(again)[uid].internalDate == 1600000000

    def test_appendFromSpooledSource(self, store, tmp_path):
        folder = openFolder(store)
        source = MessageSource(spoolDir=str(tmp_path), maxMemory=16)
        body = b"Subject: big\r\n\r\n" + b"x" * 1000 + b"\r\nFrom the spool\r\n"
        source.write(body)
        uid = call(folder, "append", source, ["\\Seen"], 1700000000.0)
        assert readMessage(folder, uid) == body
        assert folder.message(uid).internalDate == 1700000000
        assert folder.message(uid).flags == {"\\Seen"}

    def test_appendToMissingFolderFails(self, store):
        account = store.account(ALICE)
        onReactor(account.createFolder, "Gone")
        folder = openFolder(store, "Gone")
        onReactor(account.deleteFolder, "Gone")
        assert isinstance(failure(folder.append, message(1)), StorageError)
        assert onReactor(account.listFolders) == ["INBOX"]

    def test_copyKeepsFlagsAndDates(self, store, dataDir):
        account = store.account(ALICE)
        onReactor(account.createFolder, "Archive")
        deliver(store, message(1))
        deliver(store, message(2))
        inbox = openFolder(store)
        call(inbox, "setFlags", [2], ["\\Flagged", "project"], "add")
        archive = openFolder(store, "Archive")
        deliver(store, message(3), folder="Archive")
        call(archive, "refresh")
        mapping = call(inbox, "copyMessages", [2, 1], archive)
        assert mapping == [(2, 2), (1, 3)]
        assert archive.message(2).flags == {"\\Flagged", "project"}
        assert archive.message(3).internalDate == inbox.message(1).internalDate
        assert readMessage(archive, 3) == message(1)
        assert readMessage(archive, 2) == message(2)
        assert uids(inbox) == [1, 2]
        again = openFolder(self.restart(dataDir), "Archive")
        assert uids(again) == [1, 2, 3]
        assert again.message(2).flags == {"\\Flagged", "project"}

    def test_copyIntoTheSameFolder(self, store):
        deliver(store, message(1))
        inbox = openFolder(store)
        assert call(inbox, "copyMessages", [1], inbox) == [(1, 2)]
        assert call(inbox, "readMessages", [1, 2]) == [message(1), message(1)]

    def test_copyOfUnknownUidFailsAndCopiesNothing(self, store):
        deliver(store, message(1))
        inbox = openFolder(store)
        onReactor(store.account(ALICE).createFolder, "Other")
        other = openFolder(store, "Other")
        assert isinstance(failure(inbox.copyMessages, [1, 42], other), NoSuchMessage)
        assert uids(other) == []

    def test_removeDeletesMessagesAndUids(self, store, dataDir):
        for n in range(3):
            deliver(store, message(n))
        folder = openFolder(store)
        seen = []
        folder.addListener(seen.append)
        try:
            assert sorted(call(folder, "remove", [1, 3, 77])) == [1, 3]
        finally:
            folder.removeListener(seen.append)
        assert uids(folder) == [2]
        assert seen[-1].removed == (1, 3)
        assert readMessage(folder, 2) == message(1)
        again = openFolder(self.restart(dataDir))
        assert uids(again) == [2]
        assert readMessage(again, 2) == message(1)

    # -- other writers, listeners -------------------------------------------------------------

    def test_externalWriterPickedUpByRefresh(self, store, dataDir):
        self._needExternalWriters()
        deliver(store, message(1))
        folder = openFolder(store)
        external = b"Subject: from procmail\r\n\r\nhi\r\n"
        self.externalDelivery(dataDir, ALICE, "INBOX", external)
        changes = call(folder, "refresh")
        assert changes.added == (2,)
        assert uids(folder) == [1, 2]
        assert byUid(folder)[2].size == len(external)
        assert readMessage(folder, 2) == external
        assert readMessage(folder, 1) == message(1)
        assert call(folder, "refresh").added == ()  # nothing new the second time
        again = openFolder(self.restart(dataDir))
        assert uids(again) == [1, 2]
        assert byUid(again)[2].uniqueId == byUid(folder)[2].uniqueId

    def test_listenerHearsAnotherProgramsDeliveryWithoutRefreshCalls(self, store, dataDir):
        """IDLE push for mail another MDA wrote: the folder watches while listened to."""
        self._needExternalWriters()
        deliver(store, message(1))
        folder = openFolder(store)
        changes, _ = waitForChange(
            folder, lambda: reactor.callInThread(self.externalDelivery, dataDir, ALICE, "INBOX",
                                                 message(2)))
        assert changes.added == (2,)
        assert call(folder, "readMessages", [1, 2]) == [message(1), message(2)]

    def test_listenerCalledOnReactorAfterDelivery(self, store):
        folder = openFolder(store)
        changes, thread = waitForChange(
            folder, lambda: store.deliver(ALICE, "INBOX", MessageSource.fromBytes(message(1))))
        assert thread == "reactor"
        assert changes.added == (1,)
        assert uids(folder) == [1]

    def test_removedListenerNotCalled(self, store):
        folder = openFolder(store)
        removed = []

        def deliverWithListeners():
            folder.addListener(removed.append)
            folder.removeListener(removed.append)
            folder.removeListener(lambda changes: None)  # unknown: ignored
            return store.deliver(ALICE, "inbox", MessageSource.fromBytes(message(1)))

        waitForChange(folder, deliverWithListeners)
        assert removed == []

    # -- folders ------------------------------------------------------------------------------

    def test_createFolderCreatesParents(self, store):
        account = store.account(ALICE)
        onReactor(account.createFolder, "Work/Clients")
        assert onReactor(account.listFolders) == ["INBOX", "Work", "Work/Clients"]
        for name in ("Work", "Work/Clients"):
            deliver(store, message(1), folder=name)
            assert uids(openFolder(store, name)) == [1]

    def test_listFoldersSortedInboxFirst(self, store):
        account = store.account(ALICE)
        assert onReactor(account.listFolders) == ["INBOX"]
        for name in ("Zed", "Archive", "Work/Clients", "Drafts"):
            onReactor(account.createFolder, name)
        assert onReactor(account.listFolders) == ["INBOX", "Archive", "Drafts", "Work",
                                                  "Work/Clients", "Zed"]

    @pytest.mark.parametrize("name", ["v1.2", "100%", "a%2Eb", "%", ".hidden", "a.b/c.d",
                                      "Entwürfe", "with space", "INBOX/Sub.folder", "x.sbd",
                                      "x.lock", "x.index", "twistmail-uidlist", "cur", "new",
                                      "a\\b", "Work\\Old/x.y", "\\", "a%5Cb", 'say "hi"'])
    def test_folderNamesRoundTrip(self, store, dataDir, name):
        """Any name without control characters or empty, '.' or '..' components works
        (IMAP clients create folders with '\\' and '%' in them); a backend escapes what
        its storage cannot hold."""
        account = store.account(ALICE)
        onReactor(account.createFolder, name)
        names = onReactor(account.listFolders)
        assert name in names
        deliver(store, message(1), folder=name)
        folder = openFolder(store, name)
        assert folder.name == name
        assert [readMessage(folder, u) for u in uids(folder)] == [message(1)]
        assert uids(openFolder(store)) == []  # INBOX is not mixed up with it
        root = self.accountDir(dataDir, ALICE)
        if root is not None:
            outside = {p for p in tree(dataDir)
                       if not os.path.join(dataDir, p).startswith(root + os.sep)}
            parents = {os.path.relpath(p, dataDir) for p in _parents(root, dataDir)}
            assert outside <= parents, outside - parents
        assert onReactor(self.restart(dataDir).account(ALICE).listFolders) == names

    def test_inboxIsCaseInsensitive(self, store):
        deliver(store, message(1), folder="inbox")
        folder = openFolder(store, "InBoX")
        assert folder.name == "INBOX"
        assert uids(folder) == [1]

    def test_renameFolderMovesChildren(self, store):
        account = store.account(ALICE)
        onReactor(account.createFolder, "Work/Clients")
        deliver(store, message(1), folder="Work")
        deliver(store, message(2), folder="Work/Clients")
        onReactor(account.renameFolder, "Work", "Jobs")
        assert onReactor(account.listFolders) == ["INBOX", "Jobs", "Jobs/Clients"]
        jobs = openFolder(store, "Jobs")
        clients = openFolder(store, "Jobs/Clients")
        assert [readMessage(jobs, u) for u in uids(jobs)] == [message(1)]
        assert [readMessage(clients, u) for u in uids(clients)] == [message(2)]
        assert isinstance(failure(account.openFolder, "Work"), NoSuchFolder)

    def test_renameFolderCreatesNewParents(self, store):
        account = store.account(ALICE)
        onReactor(account.createFolder, "Work")
        onReactor(account.renameFolder, "Work", "Archive/2024/Work")
        assert onReactor(account.listFolders) == ["INBOX", "Archive", "Archive/2024",
                                                  "Archive/2024/Work"]

    def test_renameInboxMovesMessagesAndLeavesInboxEmpty(self, store):
        deliver(store, message(1))
        openFolder(store)
        deliver(store, message(2))
        inbox = openFolder(store)
        oldNext = inbox.uidNext
        account = store.account(ALICE)
        onReactor(account.renameFolder, "INBOX", "Old Mail")

        assert onReactor(account.listFolders) == ["INBOX", "Old Mail"]
        old = openFolder(store, "Old Mail")
        assert sorted(readMessage(old, u) for u in uids(old)) == sorted([message(1), message(2)])
        assert openFolder(store).messages() == []

        # INBOX keeps working, and does not hand out the moved messages' UIDs again.
        deliver(store, message(3))
        call(inbox, "refresh")
        assert uids(inbox) == [oldNext]

    def test_renameInboxOfNewAccount(self, store):
        """INBOX always exists, even before anything was delivered to it."""
        account = store.account(ALICE)
        onReactor(account.renameFolder, "inbox", "Old")
        assert onReactor(account.listFolders) == ["INBOX", "Old"]
        assert openFolder(store, "Old").messages() == []

    def test_createInboxFails(self, store):
        account = store.account(ALICE)
        assert isinstance(failure(account.createFolder, "INBOX"), FolderExists)  # before first use
        deliver(store, message(1))
        assert isinstance(failure(account.createFolder, "inbox"), FolderExists)
        onReactor(account.createFolder, "Work")
        assert isinstance(failure(account.renameFolder, "Work", "Inbox"), FolderExists)
        assert onReactor(account.listFolders) == ["INBOX", "Work"]
        assert uids(openFolder(store)) == [1]

    def test_inboxSubfolder(self, store):
        account = store.account(ALICE)
        onReactor(account.createFolder, "INBOX/Sub")
        assert onReactor(account.listFolders) == ["INBOX", "INBOX/Sub"]
        deliver(store, message(1), folder="INBOX/Sub")
        deliver(store, message(2))
        assert [readMessage(openFolder(store, "INBOX/Sub"), 1),
                readMessage(openFolder(store), 1)] == [message(1), message(2)]

    def test_deleteFolder(self, store):
        account = store.account(ALICE)
        onReactor(account.createFolder, "Trash")
        deliver(store, message(1), folder="Trash")
        onReactor(account.deleteFolder, "Trash")
        assert onReactor(account.listFolders) == ["INBOX"]
        assert isinstance(failure(account.openFolder, "Trash"), NoSuchFolder)

    def test_deleteInboxFails(self, store):
        deliver(store, message(1))
        account = store.account(ALICE)
        for name in ("INBOX", "inbox"):
            assert isinstance(failure(account.deleteFolder, name), StorageError)
        assert uids(openFolder(store)) == [1]

    def test_folderErrors(self, store):
        account = store.account(ALICE)
        onReactor(account.createFolder, "Work")
        onReactor(account.createFolder, "Play")
        assert isinstance(failure(account.createFolder, "Work"), FolderExists)
        assert isinstance(failure(account.renameFolder, "Work", "Play"), FolderExists)
        assert isinstance(failure(account.renameFolder, "Nope", "Other"), NoSuchFolder)
        assert isinstance(failure(account.deleteFolder, "Nope"), NoSuchFolder)
        assert isinstance(failure(account.openFolder, "Nope"), NoSuchFolder)
        assert onReactor(account.listFolders) == ["INBOX", "Play", "Work"]

    @pytest.mark.parametrize("name", HOSTILE_NAMES)
    def test_hostileFolderNamesRejected(self, store, dataDir, name):
        account = store.account(ALICE)
        openFolder(store)
        onReactor(account.createFolder, "Existing")
        outside = os.path.dirname(dataDir)
        before = tree(outside)
        attempts = [
            (account.createFolder, name),
            (account.openFolder, name),
            (account.deleteFolder, name),
            (account.renameFolder, name, "Elsewhere"),
            (account.renameFolder, "Existing", name),
            (account.setSubscribed, name, True),
            (store.deliver, ALICE, name, MessageSource.fromBytes(message(1))),
        ]
        for f, *args in attempts:
            error = failure(f, *args)
            assert isinstance(error, InvalidFolderName), (f.__name__, error)
        assert tree(outside) == before
        assert onReactor(account.listFolders) == ["INBOX", "Existing"]

    @pytest.mark.parametrize("name", ["x" * 200 + "/" + "y" * 200, "ü" * 200, "." * 100,
                                      "/".join(["abcdefghijklmnopq"] * 16)])
    def test_longNamesWorkOrAreRefusedCleanly(self, store, dataDir, name):
        """Within the generic limits, a backend may still find a name too long: then it says so
        with InvalidFolderName for every operation and changes nothing."""
        account = store.account(ALICE)
        openFolder(store)
        onReactor(account.createFolder, "Existing")
        before = tree(os.path.dirname(dataDir))
        created = _outcome(account.createFolder, name)
        if created is None:
            deliver(store, message(1), folder=name)
            assert uids(openFolder(store, name)) == [1]
            assert name in onReactor(account.listFolders)
            return
        assert isinstance(created, InvalidFolderName), created
        for f, *args in [(account.openFolder, name), (account.deleteFolder, name),
                         (account.renameFolder, "Existing", name),
                         (store.deliver, ALICE, name, MessageSource.fromBytes(b"x"))]:
            error = failure(f, *args)
            assert isinstance(error, InvalidFolderName), (f.__name__, error)
        assert tree(os.path.dirname(dataDir)) == before

    def test_subscriptionsPersist(self, store, dataDir):
        account = store.account(ALICE)
        assert onReactor(account.subscriptions) == []
        onReactor(account.setSubscribed, "Work", True)
        onReactor(account.setSubscribed, "inbox", True)
        onReactor(account.setSubscribed, "Archive/2024", True)
        onReactor(account.setSubscribed, "Archive/2024", False)
        onReactor(account.setSubscribed, "Never", False)
        assert onReactor(account.subscriptions) == ["INBOX", "Work"]
        assert onReactor(self.restart(dataDir).account(ALICE).subscriptions) == ["INBOX", "Work"]

    def test_concurrentSubscriptionChangesAllPersist(self, store, dataDir):
        """A client's connections subscribe at once (first login): none fails, none is lost."""
        account = store.account(ALICE)
        names = [f"Folder{i}" for i in range(CONCURRENCY)]
        onReactor(lambda: defer.gatherResults(
            [account.setSubscribed(n, True) for n in names], consumeErrors=True))
        assert onReactor(account.subscriptions) == sorted(names)
        assert onReactor(self.restart(dataDir).account(ALICE).subscriptions) == sorted(names)

    def test_concurrentFolderWritesAllSucceed(self, store):
        """Creating, appending to, flagging and expunging in folders at once, as several
        sessions of one account do: every operation succeeds and nothing is lost."""
        account = store.account(ALICE)
        for i in range(4):
            onReactor(account.createFolder, f"Box{i}")
        boxes = [openFolder(store, f"Box{i}") for i in range(4)]

        def work():
            ops = []
            for i, box in enumerate(boxes):
                ops += [box.append(message(n), {f"kw{n}"}) for n in range(CONCURRENCY // 4)]
                ops.append(account.createFolder(f"New{i}"))
                ops.append(account.setSubscribed(f"Box{i}", True))
            return defer.gatherResults(ops, consumeErrors=True)

        onReactor(work)
        for box in boxes:
            assert len(uids(box)) == CONCURRENCY // 4
            assert sorted(k for m in box.messages() for k in m.flags) == sorted(
                f"kw{n}" for n in range(CONCURRENCY // 4))

        def flagAndRemove():
            ops = []
            for box in boxes:
                ops.append(box.setFlags(uids(box)[::2], {"\\Deleted"}, "add"))
                ops.append(box.remove(uids(box)[1::2]))
            return defer.gatherResults(ops, consumeErrors=True)

        onReactor(flagAndRemove)
        for box in boxes:
            assert [m.flags >= {"\\Deleted"} for m in box.messages()] == [True] * (
                CONCURRENCY // 8)
        assert set(onReactor(account.listFolders)) >= {f"New{i}" for i in range(4)}
        assert onReactor(account.subscriptions) == [f"Box{i}" for i in range(4)]

    def test_removalListenersHearWhatWasRemoved(self, store):
        """FolderChanges.expunged is optional; when given, it is the removed messages as
        they were (sessions not yet told of the expunge answer FETCH from it)."""
        for n in range(3):
            deliver(store, message(n))
        folder = openFolder(store)
        call(folder, "setFlags", [2], {"\\Flagged", "work"}, "add")
        before = byUid(folder)
        changes, _ = waitForChange(folder, lambda: folder.remove([2]),
                                   lambda changes: bool(changes.removed))
        assert changes.removed == (2,)
        assert changes.expunged in ((), (before[2],))

    def test_readsDuringConcurrentExpungesSucceed(self, store):
        """Sessions read while others expunge (an mbox is rewritten each time): every
        message still in the folder reads whole, every time."""
        for n in range(CONCURRENCY):
            deliver(store, message(n))
        folder = openFolder(store)
        every = uids(folder)
        keep = every[-4:]

        def work():
            ops = []
            for uid in every[:-4]:
                ops.append(folder.remove([uid]))
                ops += [folder.readMessages(keep) for _ in range(3)]
            return defer.gatherResults(ops, consumeErrors=True)

        results = onReactor(work)
        expected = [message(n) for n in range(CONCURRENCY - 4, CONCURRENCY)]
        assert [r for i, r in enumerate(results) if i % 4] == [expected] * (3 * len(every[:-4]))
        assert uids(folder) == keep

    def test_accountsAreSeparate(self, store):
        deliver(store, message(1), account=ALICE)
        deliver(store, message(2), account="Bob@Example.Test")
        alice, bob = openFolder(store), openFolder(store, account=BOB)
        assert [readMessage(alice, 1), readMessage(bob, 1)] == [message(1), message(2)]
        assert len(alice.messages()) == len(bob.messages()) == 1

    def test_removeAccount(self, store, dataDir):
        deliver(store, message(1))
        deliver(store, message(1), account=BOB)
        onReactor(store.removeAccount, ALICE)
        root = self.accountDir(dataDir, ALICE)
        if root is not None:
            assert not os.path.exists(root)
        fresh = self.restart(dataDir)
        assert openFolder(fresh).messages() == []
        assert uids(openFolder(fresh, account=BOB)) == [1]

    # -- RFC 7162 mod-sequences (optional: IModSeqMailbox) --------------------------------------

    def _modseqFolder(self, store):
        folder = openFolder(store)
        if not IModSeqMailbox.providedBy(folder):
            pytest.skip("this backend keeps no mod-sequences (IMAP answers NOMODSEQ)")
        assert verifyObject(IModSeqMailbox, folder)
        return folder

    def test_everyChangeGetsAHigherModSeq(self, store):
        for n in range(3):
            deliver(store, message(n))
        folder = self._modseqFolder(store)
        start = folder.highestModSeq
        assert start >= 1 and all(1 <= m.modseq <= start for m in folder.messages())
        [flagged] = call(folder, "setFlags", [2], ["\\Flagged"], "add")
        assert flagged.modseq == folder.message(2).modseq == folder.highestModSeq > start
        assert sorted(folder.changedSince(start)) == [2]
        afterFlags = folder.highestModSeq
        uid = call(folder, "append", message(9), ["\\Seen"])
        assert folder.message(uid).modseq == folder.highestModSeq > afterFlags
        afterAppend = folder.highestModSeq
        call(folder, "setFlags", [1, 3], ["\\Deleted"], "add")
        call(folder, "remove", [1, 3])
        assert folder.highestModSeq > afterAppend
        assert folder.vanishedSince(afterAppend) == [1, 3]
        assert folder.vanishedSince(afterFlags) == [1, 3]
        assert sorted(folder.changedSince(start)) == [2, uid]
        assert folder.changedSince(folder.highestModSeq) == []
        # An unchanged flag set is not a change (RFC 7162 §3.1.3 STORE of the same flags).
        before = folder.highestModSeq
        call(folder, "setFlags", [2], ["\\Flagged"], "add")
        assert folder.highestModSeq == before

    def test_deliveryGetsAHigherModSeq(self, store):
        deliver(store, message(1))
        folder = self._modseqFolder(store)
        before = folder.highestModSeq
        deliver(store, message(2))
        onReactor(folder.refresh)
        assert folder.message(2).modseq == folder.highestModSeq > before
        assert folder.changedSince(before) == [2]

    def test_modSeqsSurviveRestart(self, store, dataDir):
        for n in range(4):
            deliver(store, message(n))
        folder = self._modseqFolder(store)
        call(folder, "setFlags", [2], ["\\Seen"], "add")
        call(folder, "remove", [3])
        seen = {m.uid: m.modseq for m in folder.messages()}
        highest = folder.highestModSeq
        again = openFolder(self.restart(dataDir))
        assert again.highestModSeq == highest
        assert {m.uid: m.modseq for m in again.messages()} == seen
        assert again.vanishedSince(highest - 1) == [3]
        [changed] = call(again, "setFlags", [1], ["\\Seen"], "add")
        assert changed.modseq == again.highestModSeq > highest

    def test_modSeqsMonotonicAcrossProcesses(self, store, dataDir):
        """Two stores on one data directory, as two server processes: neither hands out
        a modseq the other did, and each sees the other's changes as new ones."""
        for n in range(3):
            deliver(store, message(n))
        first = self._modseqFolder(store)
        second = openFolder(self.restart(dataDir))
        call(first, "setFlags", [1], ["\\Seen"], "add")
        onReactor(second.refresh)
        mark = second.highestModSeq
        assert mark >= first.highestModSeq
        call(second, "setFlags", [2], ["\\Seen"], "add")
        onReactor(first.refresh)
        assert first.message(2).modseq > mark
        assert 2 in first.changedSince(mark) and 1 not in first.changedSince(mark)
        call(first, "setFlags", [3], ["\\Seen"], "add")
        onReactor(second.refresh)
        assert second.message(3).modseq > first.message(2).modseq
        assert first.highestModSeq == second.highestModSeq
        # The second changes a message the first just changed, before it refreshed: its
        # own change still gets a new modseq, and the first sees it as one.
        call(first, "setFlags", [1], ["\\Flagged"], "add")
        [mine] = call(second, "setFlags", [1], ["\\Answered"], "add")
        assert mine.modseq > first.message(1).modseq
        onReactor(first.refresh)
        assert first.message(1).modseq == first.highestModSeq == mine.modseq
        assert {"\\Seen", "\\Flagged", "\\Answered"} <= first.message(1).flags

    def test_setFlagsUnchangedSince(self, store):
        for n in range(3):
            deliver(store, message(n))
        folder = self._modseqFolder(store)
        mark = folder.highestModSeq
        call(folder, "setFlags", [2], ["\\Answered"], "add")  # another session's change
        updated, modified = call(folder, "setFlagsUnchangedSince", [1, 2, 3], ["\\Seen"], "add",
                                 mark)
        assert modified == [2]
        assert [m.uid for m in updated] == [1, 3]
        assert "\\Seen" not in folder.message(2).flags
        assert all("\\Seen" in folder.message(u).flags for u in (1, 3))


def _outcome(f, *args) -> Exception | None:
    """Call f on the reactor: None if its Deferred succeeds, else the exception."""
    def run():
        return defer.maybeDeferred(f, *args).addCallbacks(lambda r: None, lambda e: e.value)
    return onReactor(run)


def _parents(path: str, top: str) -> list[str]:
    out = []
    while path != top and path.startswith(top):
        out.append(path)
        path = os.path.dirname(path)
    return out
