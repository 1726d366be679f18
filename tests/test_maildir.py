"""The Maildir backend: what it does on disk, beyond the storage contract.

The contract itself (tests/test_store_conformance.py) runs for every backend.
These tests look at the files a Maildir reader (mutt, Dovecot, a backup
script) would see.  Every storage call returns a Deferred, so tests call it
on the reactor thread with ``onReactor``.
"""

from __future__ import annotations

import os
import re
import time as time_module

import pytest
from support import onReactor
from twisted.internet import defer, reactor
from zope.interface.verify import verifyObject

from twistmail import _fsutil
from twistmail.delivery.spool import MessageSource
from twistmail.errors import (
    InvalidFolderName,
    NoSuchFolder,
    StorageError,
)
from twistmail.interfaces import IMailStore, IMailStoreFactory
from twistmail.storage import _uidlist, maildirfolder
from twistmail.storage.maildir import MaildirStore, MaildirStoreFactory
from twistmail.testing.conformance import (
    byUid,
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
UNIQUE = re.compile(r"^[^,:/]+$")


# -- helpers -------------------------------------------------------------------


@pytest.fixture
def store(dataDir):
    return MaildirStore(dataDir)


def restart(dataDir) -> MaildirStore:
    """A fresh store on the same directory: what a server restart sees."""
    return MaildirStore(dataDir)


def accountDir(dataDir, address=ALICE) -> str:
    local, domain = address.split("@")
    return os.path.join(dataDir, "mail", domain, local)


def ls(path) -> list[str]:
    return sorted(os.listdir(path))


class FakeTime:
    """Stands in for the ``time`` module inside twistmail.storage.maildir."""

    def __init__(self, *values: float) -> None:
        self.values = list(values)

    def time(self) -> float:
        return self.values.pop(0) if len(self.values) > 1 else self.values[0]

    monotonic = staticmethod(time_module.monotonic)


# -- interfaces ----------------------------------------------------------------


def test_factoryBuildsStoreAndRejectsOptions(dataDir):
    from twistmail.config import ConfigError

    factory = MaildirStoreFactory()
    assert verifyObject(IMailStoreFactory, factory)
    assert factory.name == "maildir"
    built = factory.makeStore({}, dataDir)
    assert verifyObject(IMailStore, built)
    with pytest.raises(ConfigError, match="storage.maildir"):
        factory.makeStore({"compress": True}, dataDir)


# -- delivery ------------------------------------------------------------------


def test_deliverWritesExactBytesToNew(store, dataDir):
    body = b"Subject: hi\r\n\r\nbinary \x00\xff and a long line " + b"x" * 5000 + b"\r\n"
    prefix = b"Received: from client by mx.example.test\r\n"
    unique = deliver(store, body, prefix=prefix)

    root = accountDir(dataDir)
    names = ls(os.path.join(root, "new"))
    assert len(names) == 1
    expected = prefix + body
    assert names[0] == f"{unique},S={len(expected)}"
    assert UNIQUE.match(unique)
    with open(os.path.join(root, "new", names[0]), "rb") as f:
        assert f.read() == expected
    assert ls(os.path.join(root, "tmp")) == []
    assert ls(os.path.join(root, "cur")) == []


def test_deliverCreatesMaildirOnFirstUse(store, dataDir):
    root = accountDir(dataDir)
    assert not os.path.exists(root)
    deliver(store, message(1))
    for sub in ("cur", "new", "tmp"):
        assert os.path.isdir(os.path.join(root, sub))
    assert len(ls(os.path.join(root, "new"))) == 1


def test_deliverIsDurableBeforeItFires(store, dataDir, monkeypatch):
    """SMTP says 250 when deliver fires: the file and the new/ entry must be fsynced by then."""
    deliver(store, message(0))  # the Maildir exists; this is the steady state
    root = os.path.realpath(accountDir(dataDir))
    events = []
    realFsync, realFsyncDir, realRename = os.fsync, _fsutil.fsyncDir, os.rename

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return realFsync(fd)

    def fsyncDir(path):
        events.append(("fsyncDir", os.path.realpath(path)))
        return realFsyncDir(path)

    def rename(src, dst):
        events.append(("rename", os.path.realpath(src), os.path.realpath(dst)))
        return realRename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(_fsutil, "fsyncDir", fsyncDir)

    def deliverAndMark():
        d = store.deliver(ALICE, "INBOX", MessageSource.fromBytes(message(1)))
        return d.addCallback(lambda unique: events.append(("fired", unique)) or unique)

    unique = onReactor(deliverAndMark)
    tmpPath = os.path.join(root, "tmp", unique)
    newPath = os.path.join(root, "new", f"{unique},S={len(message(1))}")
    newDir = os.path.join(root, "new")

    fileSynced = events.index(("fsync", tmpPath))
    renamed = events.index(("rename", tmpPath, newPath))
    dirSynced = events.index(("fsyncDir", newDir))
    fired = events.index(("fired", unique))
    assert fileSynced < renamed < dirSynced < fired


def test_firstDeliveryMakesEveryNewDirectoryDurable(store, dataDir, monkeypatch):
    """On a brand-new account the whole path to the message is new: every entry needs an fsync."""
    synced = []
    realFsyncDir = _fsutil.fsyncDir

    def fsyncDir(path):
        synced.append(os.path.realpath(path))
        return realFsyncDir(path)

    monkeypatch.setattr(_fsutil, "fsyncDir", fsyncDir)

    def deliverAndMark():
        d = store.deliver(ALICE, "INBOX", MessageSource.fromBytes(message(1)))
        return d.addCallback(lambda unique: list(synced))

    syncedBeforeFiring = onReactor(deliverAndMark)
    data = os.path.realpath(dataDir)
    root = os.path.join(data, "mail", "example.test", "alice")
    # Each directory whose entry list changed: new/ (the message), alice/ (new/),
    # example.test/ (alice/), mail/ (example.test/), the data dir (mail/).
    for path in (os.path.join(root, "new"), root, os.path.dirname(root),
                 os.path.join(data, "mail"), data):
        assert path in syncedBeforeFiring, path


def test_deliverFailsWhenNewIsNotADirectory(store, dataDir):
    openFolder(store)  # creates the Maildir
    root = accountDir(dataDir)
    os.rmdir(os.path.join(root, "new"))
    with open(os.path.join(root, "new"), "wb") as f:
        f.write(b"not a directory")

    error = failure(store.deliver, ALICE, "INBOX", MessageSource.fromBytes(message(1)))
    assert isinstance(error, StorageError)
    assert ls(os.path.join(root, "tmp")) == []
    assert ls(os.path.join(root, "cur")) == []
    with open(os.path.join(root, "new"), "rb") as f:
        assert f.read() == b"not a directory"


def test_deliverFailsWhenTmpIsNotADirectory(store, dataDir):
    root = accountDir(dataDir)
    os.makedirs(os.path.join(root, "new"))
    os.makedirs(os.path.join(root, "cur"))
    with open(os.path.join(root, "tmp"), "wb") as f:
        f.write(b"")

    error = failure(store.deliver, ALICE, "INBOX", MessageSource.fromBytes(message(1)))
    assert isinstance(error, StorageError)
    assert ls(os.path.join(root, "new")) == []
    assert ls(os.path.join(root, "cur")) == []


def test_deliverTakesMessageBackWhenDirectorySyncFails(store, dataDir, monkeypatch):
    """No 250 it cannot stand behind: a failed fsync of new/ fails delivery and removes the file."""
    openFolder(store)
    root = accountDir(dataDir)

    def brokenFsyncDir(path):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(_fsutil, "fsyncDir", brokenFsyncDir)
    error = failure(store.deliver, ALICE, "INBOX", MessageSource.fromBytes(message(1)))
    assert isinstance(error, StorageError)
    assert ls(os.path.join(root, "new")) == []
    assert ls(os.path.join(root, "tmp")) == []


@pytest.mark.parametrize("address", [
    "../x@example.test", "a/b@example.test", "..@example.test", "x@..", "x@a/b",
    "x@example.test/../../etc", "/abs@example.test", "a\x00b@example.test",
])
def test_accountPathRejectsEscapes(store, address):
    with pytest.raises(StorageError):
        store.accountPath(address)
    with pytest.raises(StorageError):
        store.account(address)


def test_accountPathIsCaseFolded(store, dataDir):
    assert store.accountPath("Alice@Example.TEST") == accountDir(dataDir)


# -- opening a folder: new/ -> cur/, UIDs --------------------------------------


def test_openFolderMovesNewToCurAndNumbersInDeliveryOrder(store, dataDir):
    bodies = [message(n) for n in range(1, 6)]
    uniques = [deliver(store, b) for b in bodies]
    folder = openFolder(store)

    root = accountDir(dataDir)
    assert ls(os.path.join(root, "new")) == []
    cur = ls(os.path.join(root, "cur"))
    assert sorted(cur) == sorted(f"{u},S={len(b)}:2," for u, b in zip(uniques, bodies, strict=True))
    assert uids(folder) == [1, 2, 3, 4, 5]
    assert [readMessage(folder, u) for u in uids(folder)] == bodies
    assert [m.uniqueId for m in folder.messages()] == uniques
    assert [m.size for m in folder.messages()] == [len(b) for b in bodies]
    assert folder.uidNext == 6


def test_uidsFollowDeliveryOrderWithinOneSecond(store, dataDir, monkeypatch):
    """Unique names carry the microseconds unpadded: M99998 came before M100001."""
    clock = FakeTime(1700000000.099998, 1700000000.100001, 1700000000.9, 1700000001.0)
    monkeypatch.setattr(maildirfolder, "time", clock)
    first = deliver(store, message(1))
    second = deliver(store, message(2))
    third = deliver(store, message(3))
    folder = openFolder(store)
    assert [m.uniqueId for m in folder.messages()] == [first, second, third]
    assert [readMessage(folder, u) for u in uids(folder)] == [message(1), message(2), message(3)]


def test_deliveryOrderOfNamesOfEveryKind():
    """Names that all start with ten digits sort as strings (seconds parsed by C-level
    maps); otherwise by the seconds as numbers, names without a time last; deliveries
    within one second by their microseconds as numbers either way."""
    alike = ["1700000001.M5P1Q1.h,S=10", "1700000000.M100001P1Q2.h,S=40",
             "1700000000.M99998P1Q1.h"]
    assert maildirfolder._inDeliveryOrder(alike) == (
        ["1700000000.M99998P1Q1.h", "1700000000.M100001P1Q2.h,S=40", "1700000001.M5P1Q1.h,S=10"],
        [1700000000, 1700000000, 1700000001], [None, 40, 10])
    mixed = [*alike, "999999999.M1P1Q1.h,S=20", "other,S=30", "abc"]
    assert maildirfolder._inDeliveryOrder(mixed) == (
        ["999999999.M1P1Q1.h,S=20", "1700000000.M99998P1Q1.h", "1700000000.M100001P1Q2.h,S=40",
         "1700000001.M5P1Q1.h,S=10", "abc", "other,S=30"],
        [999999999, 1700000000, 1700000000, 1700000001, None, None], [20, None, 40, 10, None, 30])


def test_hiddenFilesInCurAreNotMessages(store, dataDir):
    """Names starting with a dot (an NFS silly-rename, an editor's swap file) are skipped,
    whatever sorts beside them; names without a delivery time or size get them from stat()."""
    unique = deliver(store, message(1))
    openFolder(store)
    cur = os.path.join(accountDir(dataDir), "cur")
    for name in (".nfs0001", ".x:2,S", "-early,S=1:2,", "0later:2,"):
        with open(os.path.join(cur, name), "wb") as f:
            f.write(b"Subject: x\r\n\r\n")
        os.utime(os.path.join(cur, name), (1700000000, 1700000000))
    folder = openFolder(restart(dataDir))
    assert sorted((m.uniqueId, m.size, m.internalDate) for m in folder.messages()
                  if m.uniqueId != unique) == [("-early", 1, 1700000000), ("0later", 14, 1700000000)]
    assert len(folder.messages()) == 3


def test_uidNotReusedWhenHighestRemovedByAnotherProgram(store, dataDir):
    for n in range(3):
        deliver(store, message(n))
    folder = openFolder(store)
    cur = os.path.join(accountDir(dataDir), "cur")
    victim = [n for n in os.listdir(cur) if n.startswith(byUid(folder)[3].uniqueId)][0]
    os.unlink(os.path.join(cur, victim))
    changes = call(folder, "refresh")
    assert changes.removed == (3,)
    deliver(store, message(9))
    folder2 = openFolder(restart(dataDir))
    assert uids(folder2) == [1, 2, 4]


def test_recreatedFolderGetsNewUidValidity(store, dataDir, monkeypatch):
    """RFC 3501 §2.3.1.1: a deleted and re-created mailbox must not repeat UIDVALIDITY."""
    clock = FakeTime(1700000000.5)  # all within one second
    monkeypatch.setattr(maildirfolder, "time", clock)
    monkeypatch.setattr(_uidlist, "time", clock)
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


# -- flags -----------------------------------------------------------------------


def curNames(dataDir, folder="INBOX") -> list[str]:
    root = accountDir(dataDir)
    if folder != "INBOX":
        root = os.path.join(root, "." + folder)
    return ls(os.path.join(root, "cur"))


def test_setFlagsSystemFlagsInFileName(store, dataDir):
    unique = deliver(store, message(1))
    folder = openFolder(store)
    result = call(folder, "setFlags", [1], ["\\Seen", "\\Answered", "\\Flagged", "\\Deleted",
                                           "\\Draft"], "set")
    assert [m.flags for m in result] == [frozenset({"\\Seen", "\\Answered", "\\Flagged",
                                                    "\\Deleted", "\\Draft"})]
    assert curNames(dataDir) == [f"{unique},S={len(message(1))}:2,DFRST"]
    assert readMessage(folder, 1) == message(1)

    call(folder, "setFlags", [1], ["\\Deleted", "\\Draft"], "remove")
    assert curNames(dataDir) == [f"{unique},S={len(message(1))}:2,FRS"]
    call(folder, "setFlags", [1], ["\\Seen"], "set")
    assert curNames(dataDir) == [f"{unique},S={len(message(1))}:2,S"]
    call(folder, "setFlags", [1], ["\\Draft"], "add")
    assert curNames(dataDir) == [f"{unique},S={len(message(1))}:2,DS"]
    assert folder.messages()[0].flags == frozenset({"\\Seen", "\\Draft"})

    again = openFolder(restart(dataDir))
    assert again.messages()[0].flags == frozenset({"\\Seen", "\\Draft"})
    assert readMessage(again, 1) == message(1)


def fileOf(dataDir, folder, uid) -> str:
    """The cur/ file name of C{uid} in the open INBOX C{folder}."""
    unique = byUid(folder)[uid].uniqueId
    names = [n for n in curNames(dataDir) if n.split(",")[0] == unique]
    assert len(names) == 1, names
    return names[0]


def test_keywordsAndForwarded(store, dataDir):
    deliver(store, message(1))
    deliver(store, message(2))
    folder = openFolder(store)
    call(folder, "setFlags", [1], ["$Forwarded", "Work", "\\Seen"], "add")
    call(folder, "setFlags", [2], ["Personal", "Work"], "add")

    # Maildir info: system letters (P = passed = $Forwarded) then keyword letters,
    # all in ASCII order; keywords are lower-case letters, one per keyword folder-wide.
    info1 = fileOf(dataDir, folder, 1).split(":2,")[1]
    info2 = fileOf(dataDir, folder, 2).split(":2,")[1]
    assert info1[:2] == "PS" and len(info1) == 3 and "a" <= info1[2] <= "z"
    assert list(info2) == sorted(info2) and len(info2) == 2 and info2.isalpha() and info2.islower()
    assert info1[2] in info2  # "Work"

    expected = {1: frozenset({"$Forwarded", "Work", "\\Seen"}),
                2: frozenset({"Personal", "Work"})}
    assert {m.uid: m.flags for m in folder.messages()} == expected
    again = openFolder(restart(dataDir))
    assert {m.uid: m.flags for m in again.messages()} == expected

    call(again, "setFlags", [1], ["$Forwarded", "Work"], "remove")
    assert fileOf(dataDir, again, 1).endswith(":2,S")
    assert byUid(again)[1].flags == frozenset({"\\Seen"})
    assert byUid(again)[2].flags == frozenset({"Personal", "Work"})


def test_forwardedLetterWrittenByAnotherProgram(store, dataDir):
    unique = deliver(store, message(1))
    folder = openFolder(store)
    cur = os.path.join(accountDir(dataDir), "cur")
    old = f"{unique},S={len(message(1))}:2,"
    os.rename(os.path.join(cur, old), os.path.join(cur, old + "PS"))
    changes = call(folder, "refresh")
    assert changes.flagsChanged == (1,)
    assert folder.messages()[0].flags == frozenset({"$Forwarded", "\\Seen"})


def markSeenLikeMutt(dataDir, unique) -> None:
    """Another Maildir program (mutt, an MDA) changes flags by renaming the file in cur/."""
    cur = os.path.join(accountDir(dataDir), "cur")
    (name,) = [n for n in os.listdir(cur) if n.split(",")[0] == unique]
    base, info = name.split(":2,")
    os.rename(os.path.join(cur, name), os.path.join(cur, f"{base}:2,{''.join(sorted(info + 'S'))}"))


def test_openMessageAfterAnotherProgramChangedFlags(store, dataDir):
    unique = deliver(store, message(1))
    folder = openFolder(store)
    markSeenLikeMutt(dataDir, unique)
    assert readMessage(folder, 1) == message(1)  # no refresh in between


def test_setFlagsAfterAnotherProgramChangedFlags(store, dataDir):
    """Neither change is lost: ours is applied on top of theirs."""
    unique = deliver(store, message(1))
    folder = openFolder(store)
    call(folder, "setFlags", [1], ["\\Answered"], "add")
    markSeenLikeMutt(dataDir, unique)
    result = call(folder, "setFlags", [1], ["\\Flagged"], "add")
    assert "\\Flagged" in result[0].flags
    call(folder, "setFlags", [1], ["\\Answered"], "remove")
    assert curNames(dataDir) == [f"{unique},S={len(message(1))}:2,FS"]
    assert openFolder(restart(dataDir)).messages()[0].flags == frozenset({"\\Flagged", "\\Seen"})


def test_removeAfterAnotherProgramChangedFlags(store, dataDir):
    """POP3 DELE+QUIT of a message mutt has marked read must not bring it back under a new UID."""
    unique = deliver(store, message(1))
    deliver(store, message(2))
    folder = openFolder(store)
    markSeenLikeMutt(dataDir, unique)
    assert call(folder, "remove", [1]) == [1]
    assert all(not n.startswith(unique) for n in curNames(dataDir))
    assert call(folder, "refresh").added == ()
    assert uids(folder) == [2]
    assert uids(openFolder(restart(dataDir))) == [2]


def test_tooManyKeywordsFailsWithoutChanges(store, dataDir):
    deliver(store, message(1))
    folder = openFolder(store)
    call(folder, "setFlags", [1], [f"k{n}" for n in range(26)], "set")
    before = curNames(dataDir)
    error = failure(folder.setFlags, [1], ["one-too-many"], "add")
    assert isinstance(error, StorageError)
    assert curNames(dataDir) == before
    assert len(folder.messages()[0].flags) == 26


# -- append / remove -------------------------------------------------------------


# -- other writers, listeners ---------------------------------------------------


def test_externalWriterPickedUpByRefresh(store, dataDir):
    deliver(store, message(1))
    folder = openFolder(store)
    root = accountDir(dataDir)
    name = "1700000000.M1P4242.otherhost"
    with open(os.path.join(root, "tmp", name), "wb") as f:
        f.write(b"Subject: from procmail\r\n\r\nhi\r\n")
    os.rename(os.path.join(root, "tmp", name), os.path.join(root, "new", name))

    changes = call(folder, "refresh")
    assert changes.added == (2,)
    assert uids(folder) == [1, 2]
    assert byUid(folder)[2].uniqueId == name
    assert byUid(folder)[2].size == len(b"Subject: from procmail\r\n\r\nhi\r\n")
    assert readMessage(folder, 2) == b"Subject: from procmail\r\n\r\nhi\r\n"
    assert ls(os.path.join(root, "new")) == []

    assert call(folder, "refresh").added == ()  # nothing new the second time


# -- folders -------------------------------------------------------------------


def test_createFolderCreatesParents(store, dataDir):
    account = store.account(ALICE)
    onReactor(account.createFolder, "Work/Clients")
    root = accountDir(dataDir)
    for dirname in (".Work", ".Work.Clients"):
        for sub in ("cur", "new", "tmp"):
            assert os.path.isdir(os.path.join(root, dirname, sub))
        assert os.path.isfile(os.path.join(root, dirname, "maildirfolder"))
    assert onReactor(account.listFolders) == ["INBOX", "Work", "Work/Clients"]


def test_renameInboxMovesEveryFile(store, dataDir):
    """A file another program left in cur/ without ':2,' info moves too (nothing left behind)."""
    deliver(store, message(1))
    openFolder(store)
    root = accountDir(dataDir)
    with open(os.path.join(root, "cur", "1700000000.M1P7.otherhost"), "wb") as f:
        f.write(message(2))
    account = store.account(ALICE)
    onReactor(account.renameFolder, "INBOX", "Old")
    old = openFolder(store, "Old")
    assert sorted(readMessage(old, u) for u in uids(old)) == [message(1), message(2)]
    assert ls(os.path.join(root, "cur")) == []


def test_inboxSubfolder(store, dataDir):
    account = store.account(ALICE)
    onReactor(account.createFolder, "INBOX/Sub")
    assert onReactor(account.listFolders) == ["INBOX", "INBOX/Sub"]
    root = accountDir(dataDir)
    assert os.path.isfile(os.path.join(root, ".INBOX.Sub", "maildirfolder"))
    # maildirfolder marks a Maildir++ sub-folder; the account's own Maildir is not one.
    assert not os.path.exists(os.path.join(root, "maildirfolder"))


def test_deleteFolder(store, dataDir):
    account = store.account(ALICE)
    onReactor(account.createFolder, "Trash")
    deliver(store, message(1), folder="Trash")
    onReactor(account.deleteFolder, "Trash")
    assert onReactor(account.listFolders) == ["INBOX"]
    assert not os.path.exists(os.path.join(accountDir(dataDir), ".Trash"))
    assert isinstance(failure(account.openFolder, "Trash"), NoSuchFolder)
    assert [n for n in os.listdir(accountDir(dataDir)) if n.startswith("..")] == []


def test_halfDeletedFolderIsNotListed(store, dataDir):
    """deleteFolder renames to ..deleting-* before rmtree; a crash in between must not surface it."""
    account = store.account(ALICE)
    onReactor(account.createFolder, "Keep")
    for sub in ("cur", "new", "tmp"):
        os.makedirs(os.path.join(accountDir(dataDir), "..deleting-1700000000.M1P1Q1.host", sub))
    assert onReactor(account.listFolders) == ["INBOX", "Keep"]


@pytest.mark.parametrize("name", ["x" * 200 + "/" + "y" * 200, "ü" * 200, "." * 100,
                                  "/".join(["abcdefghijklmnopq"] * 16)])
def test_namesTooLongForTheFileSystemRejected(store, dataDir, name):
    """Within the generic limits but too long as a Maildir++ directory name: a clean refusal."""
    account = store.account(ALICE)
    openFolder(store)
    onReactor(account.createFolder, "Existing")
    before = tree(os.path.dirname(dataDir))
    for f, *args in [(account.createFolder, name), (account.openFolder, name),
                     (account.deleteFolder, name), (account.renameFolder, "Existing", name),
                     (store.deliver, ALICE, name, MessageSource.fromBytes(b"x"))]:
        error = failure(f, *args)
        assert isinstance(error, InvalidFolderName), (f.__name__, error)
    assert tree(os.path.dirname(dataDir)) == before


def test_renameRefusesWhenAChildNameWouldBeTooLong(store, dataDir):
    account = store.account(ALICE)
    onReactor(account.createFolder, "A/" + "c" * 150)
    longName = "b" * 150
    assert isinstance(failure(account.renameFolder, "A", longName), InvalidFolderName)
    assert onReactor(account.listFolders) == ["INBOX", "A", "A/" + "c" * 150]


# -- large folders, other programs, copies ---------------------------------------


def test_refreshWithoutChangesDoesNotListCur(store, dataDir, monkeypatch):
    """A 100,000-message folder must not be listed on every NOOP: unchanged dirs cost two stats."""
    for n in range(3):
        deliver(store, message(n))
    folder = openFolder(store)
    listed = []
    realListdir = os.listdir

    def listdir(path):
        listed.append(os.path.basename(path))
        return realListdir(path)

    monkeypatch.setattr(os, "listdir", listdir)
    assert not call(folder, "refresh")
    assert listed == []
    # A delivery changes new/ only: newcomers are adopted without listing cur/.
    deliver(store, message(9))
    assert call(folder, "refresh").added == (4,)
    assert listed == ["new"]
    # Our own flag changes and expunges do not make the next refresh list cur/ either.
    call(folder, "setFlags", [1], ["\\Deleted"], "add")
    call(folder, "remove", [1])
    listed.clear()
    assert not call(folder, "refresh")
    assert listed == []
    assert uids(openFolder(restart(dataDir))) == [2, 3, 4]


def test_anotherProgramsFlagChangeIsNoticed(store, dataDir):
    """mutt renames cur/ files to change flags: the changed cur/ forces a full rescan."""
    deliver(store, message(1))
    folder = openFolder(store)
    cur = os.path.join(accountDir(dataDir), "cur")
    [name] = ls(cur)
    os.rename(os.path.join(cur, name), os.path.join(cur, name[:-len(":2,")] + ":2,FS"))
    changes = call(folder, "refresh")
    assert changes.flagsChanged == (1,)
    assert folder.message(1).flags == {"\\Flagged", "\\Seen"}


def test_fullRescanHealsAMissedChange(store, dataDir, monkeypatch):
    """If a foreign change hid behind one of ours, the periodic full scan still finds it."""
    deliver(store, message(1))
    folder = openFolder(store)
    cur = os.path.join(accountDir(dataDir), "cur")
    [name] = ls(cur)
    os.rename(os.path.join(cur, name), os.path.join(cur, name[:-len(":2,")] + ":2,S"))
    folder._stamps = (maildirfolder._stamp(os.path.join(accountDir(dataDir), "new")),
                      maildirfolder._stamp(cur))  # as if our own change had covered it
    assert not call(folder, "refresh")
    monkeypatch.setattr(maildirfolder, "FULL_SCAN_INTERVAL", 0)
    assert call(folder, "refresh").flagsChanged == (1,)


def test_copyKeepsFlagsAndDatesAndLinks(store, dataDir):
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
    src = os.path.join(accountDir(dataDir), "cur")
    dst = os.path.join(accountDir(dataDir), ".Archive", "cur")
    inodes = {os.stat(os.path.join(src, n)).st_ino for n in ls(src)}
    assert len(inodes & {os.stat(os.path.join(dst, n)).st_ino for n in ls(dst)}) == 2
    # The copies have UIDs that survive a restart.
    again = openFolder(restart(dataDir), "Archive")
    assert uids(again) == [1, 2, 3]
    assert again.message(2).flags == {"\\Flagged", "project"}


def test_listenerHearsAnotherProgramsDeliveryWithoutRefreshCalls(store, dataDir):
    """IDLE push for mail another MDA wrote: the folder watches its directories while listened to."""
    deliver(store, message(1))
    folder = openFolder(store)
    root = accountDir(dataDir)

    def writeAndWait():
        d = defer.Deferred()

        def listener(changes):
            if changes.added and not d.called:
                d.callback(changes)

        folder.addListener(listener)
        name = "1700000001.M5P99.otherhost"
        with open(os.path.join(root, "tmp", name), "wb") as f:
            f.write(message(2))
        os.rename(os.path.join(root, "tmp", name), os.path.join(root, "new", name))
        return d.addTimeout(5, reactor).addBoth(lambda r: (folder.removeListener(listener), r)[1])

    changes = onReactor(writeAndWait)
    assert changes.added == (2,)
    assert folder._watch is None, "the watch stops with the last listener"


def test_uidlistReadsTornAndOldFiles(tmp_path):
    """The fast parse and the careful one agree; a torn last line or junk is skipped."""
    path = tmp_path / "twistmail-uidlist"
    good = "twistmail-uidlist 1 V7 N4\n1 1700000000 10 a,S=10\n2 1700000001 20 b,S=20\n"
    path.write_text(good)
    assert _uidlist.read(str(path)) == ((7, 4), {1: ("a,S=10", 1700000000, 10),
                                                 2: ("b,S=20", 1700000001, 20)})
    path.write_text(good + "3 1700000002 3")  # a crash in the middle of an append
    assert _uidlist.read(str(path))[1].keys() == {1, 2}
    path.write_text(good + "junk line here x\n4 1700000003.5 5 d\n")  # and an old float date
    header, listed = _uidlist.read(str(path))
    assert listed[4] == ("d", 1700000003, 5) and header == (7, 5)
    path.write_text("something else\n")
    assert _uidlist.read(str(path)) == (None, {})


def test_uidlistAppendAfterATornLineKeepsTheNewRecord(tmp_path):
    """A crash mid-append leaves a last line without its newline; the next append
    starts a line of its own, so only the torn record is lost, not the new one too."""
    path = tmp_path / "twistmail-uidlist"
    path.write_text("twistmail-uidlist 1 V7 N4\n1 1700000000 10 a,S=10\n2 17000")
    _uidlist.append(str(path), [(3, 1700000002, 30, "c,S=30")])
    _uidlist.append(str(path), [(4, 1700000003, 40, "d,S=40")])
    assert _uidlist.read(str(path))[1] == {1: ("a,S=10", 1700000000, 10),
                                           3: ("c,S=30", 1700000002, 30),
                                           4: ("d,S=40", 1700000003, 40)}
