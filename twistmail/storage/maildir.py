# -*- test-case-name: tests.test_store_conformance -*-
"""Maildir backend (https://cr.yp.to/proto/maildir.html) with Maildir++ folders.

Layout of one account (``<data_dir>/mail/<domain>/<local>/``)::

    cur/ new/ tmp/           INBOX
    .Sent/ .Work.Clients/    folders (Maildir++; '/' in IMAP names becomes '.')
    twistmail-uidlist        per folder: UIDVALIDITY, next UID, uid -> file base
    twistmail-keywords       per folder: keyword letters a-z (Dovecot's scheme)
    twistmail-subscriptions  per account

Delivery (SMTP) writes ``tmp/<unique>``, syncs it, renames it to
``new/<unique>,S=<size>`` and syncs ``new/`` — only then does SMTP say 250.
A crash before the rename leaves only a tmp/ file, which no reader lists.
Concurrent deliveries share their syncs (``twistmail._groupcommit``).
UIDs are assigned lazily when a folder is opened or refreshed, as Dovecot does,
so delivery never contends with readers for the uidlist.

Every blocking call runs in the thread pool; the shared in-memory index of a
folder is only touched on the reactor thread.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import socket
import threading
import time
import weakref
from dataclasses import dataclass

from twisted.internet import defer, threads
from twisted.logger import Logger
from zope.interface import implementer

from twistmail import _fsutil
from twistmail._groupcommit import GroupCommit, NewFile, writeNewFile
from twistmail.auth.accounts import AccountError, validAddress
from twistmail.errors import (
    FolderExists,
    InvalidFolderName,
    NoSuchFolder,
    NoSuchMessage,
    StorageError,
)
from twistmail.interfaces import IMailAccount, IMailbox, IMailStore, IMailStoreFactory
from twistmail.model import FolderChanges, StoredMessage
from twistmail.storage import folders

log = Logger()

UIDLIST = "twistmail-uidlist"
KEYWORDS = "twistmail-keywords"
SUBSCRIPTIONS = "twistmail-subscriptions"
UIDVALIDITY = "twistmail-uidvalidity"  # per account: the last UIDVALIDITY handed out
UIDLIST_MAGIC = "twistmail-uidlist 1"

# Maildir info letters (cr.yp.to): must be kept in ASCII order in the file name.
_FLAG_LETTERS = {"\\Draft": "D", "\\Flagged": "F", "\\Answered": "R", "\\Seen": "S", "\\Deleted": "T"}
_LETTER_FLAGS = {v: k for k, v in _FLAG_LETTERS.items()}
_LETTER_FLAGS["P"] = "$Forwarded"  # "passed" in Maildir, $Forwarded keyword in IMAP
MAX_KEYWORDS = 26
NAME_MAX = 255  # octets in one directory entry (Linux, BSD, macOS)

_counter = itertools.count()
_uidValidityLock = threading.Lock()
_HOST = socket.gethostname().replace("/", "\\057").replace(":", "\\072").replace(",", "\\054")


def uniqueName() -> str:
    """A Maildir unique name: time.M<usec>P<pid>Q<n>.host (unique per host, no locking)."""
    now = time.time()
    return f"{int(now)}.M{int(now % 1 * 1e6)}P{os.getpid()}Q{next(_counter)}.{_HOST}"


_ORDER = re.compile(r"(\d+)\.(?:M(\d+))?(?:P\d+)?(?:Q(\d+))?")


def _deliveryOrder(base: str) -> tuple:
    """Sort key: seconds, then microseconds and counter compared as numbers (M99 < M100)."""
    m = _ORDER.match(base)
    if m is None:
        return (float("inf"), 0, 0, base)
    return (int(m.group(1)), int(m.group(2) or 0), int(m.group(3) or 0), base)


def _splitName(filename: str) -> tuple[str, str]:
    """``base:2,FS`` -> (base, "FS")."""
    base, sep, info = filename.partition(":2,")
    return base, info if sep else ""


def _sizeFromBase(base: str) -> int | None:
    for field in base.split(",")[1:]:
        if field.startswith("S="):
            try:
                return int(field[2:])
            except ValueError:
                return None
    return None


def _makeMaildir(path: str) -> None:
    for sub in ("tmp", "new", "cur"):
        os.makedirs(os.path.join(path, sub), mode=0o700, exist_ok=True)


@dataclass
class _Entry:
    base: str
    info: str  # flag letters after ':2,' (system letters upper case, keywords a-z)
    size: int
    internalDate: float


@implementer(IMailbox)
class MaildirFolder:
    """One folder's shared index: every session on the folder sees this object."""

    def __init__(self, store: MaildirStore, account: str, name: str, path: str) -> None:
        self._store = store
        self.account = account
        self.name = name
        self.path = path
        self.uidValidity = 0
        self.uidNext = 1
        self._entries: dict[int, _Entry] = {}
        self._byBase: dict[str, int] = {}
        self._keywords: list[str] = []
        self._listeners: list = []
        self._lock = defer.DeferredLock()
        self._snapshot: list | None = None

    # -- reading ---------------------------------------------------------------

    def _message(self, uid: int, entry: _Entry) -> StoredMessage:
        flags = set()
        for letter in entry.info:
            if letter in _LETTER_FLAGS:
                flags.add(_LETTER_FLAGS[letter])
            elif "a" <= letter <= "z" and ord(letter) - 97 < len(self._keywords):
                flags.add(self._keywords[ord(letter) - 97])
        return StoredMessage(uid, entry.base.split(",")[0], frozenset(flags), entry.size,
                             entry.internalDate)

    def messages(self) -> list:
        if self._snapshot is None:
            self._snapshot = [self._message(uid, e) for uid, e in sorted(self._entries.items())]
        return self._snapshot

    def _changed(self, changes: FolderChanges) -> FolderChanges:
        if changes:
            self._snapshot = None
            for listener in list(self._listeners):
                try:
                    listener(changes)
                except Exception:
                    log.failure("folder listener failed for {folder}", folder=self.name)
        return changes

    def addListener(self, listener) -> None:
        self._listeners.append(listener)

    def removeListener(self, listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    # -- refresh: reconcile the index with the directory ------------------------

    def refresh(self) -> defer.Deferred:
        return self._lock.run(self._refresh)

    def _refresh(self) -> defer.Deferred:
        known = {e.base: uid for uid, e in self._entries.items()}
        d = self._store._run(self._scanSync, known, self.uidValidity)
        return d.addCallback(self._applyScan)

    def _scanSync(self, known: dict, uidValidity: int) -> dict:
        """Worker thread: move new/ to cur/, list cur/, assign UIDs to newcomers."""
        if not os.path.isdir(os.path.join(self.path, "cur")):
            raise NoSuchFolder(self.name)
        newDir, curDir = os.path.join(self.path, "new"), os.path.join(self.path, "cur")
        for name in os.listdir(newDir):
            if name.startswith("."):
                continue
            try:
                os.rename(os.path.join(newDir, name), os.path.join(curDir, name + ":2,"))
            except FileNotFoundError:
                pass  # another process took it
        onDisk: dict[str, tuple[str, str]] = {}
        for name in os.listdir(curDir):
            if name.startswith("."):
                continue
            base, info = _splitName(name)
            onDisk[base] = (name, info)
        uidlistPath = os.path.join(self.path, UIDLIST)
        header, listed = self._readUidlist(uidlistPath)
        result = {"keywords": self._readKeywords(), "entries": {}, "removed": []}
        if header is None:
            # No uidlist (new folder, or a restore): a fresh UIDVALIDITY invalidates
            # whatever clients cached (RFC 3501 §2.3.1.1).
            uidValidity, uidNext, listed = self._newUidValidity(), 1, {}
            rewrite = True
        else:
            uidValidity, uidNext = header
            rewrite = False
        present = {}
        for uid, (base, date, size) in listed.items():
            if base in onDisk:
                present[uid] = (base, date, size)
        if len(present) != len(listed):
            rewrite = True
        newcomers = sorted(set(onDisk) - {b for b, _, _ in present.values()}, key=_deliveryOrder)
        appended = []
        for base in newcomers:
            name = onDisk[base][0]
            size = _sizeFromBase(base)
            try:
                st = os.stat(os.path.join(curDir, name))
            except FileNotFoundError:
                continue
            if size is None:
                size = st.st_size
            present[uidNext] = (base, st.st_mtime, size)
            appended.append((uidNext, base, st.st_mtime, size))
            uidNext += 1
        if rewrite:
            self._writeUidlist(uidlistPath, uidValidity, uidNext, present)
        elif appended:
            with open(uidlistPath, "a", encoding="utf-8") as f:
                f.write("".join(f"{u} {int(d)} {s} {b}\n" for u, b, d, s in appended))
                f.flush()
                os.fsync(f.fileno())
        for uid, (base, date, size) in present.items():
            result["entries"][uid] = _Entry(base, onDisk[base][1], size, date)
        result["uidValidity"] = uidValidity
        result["uidNext"] = uidNext
        return result

    def _newUidValidity(self) -> int:
        """A UIDVALIDITY this account never issued before: a folder deleted and re-created
        within one second must not repeat the old value (RFC 3501 §2.3.1.1)."""
        root = self.path if self.name == "INBOX" else os.path.dirname(self.path)
        path = os.path.join(root, UIDVALIDITY)
        with _uidValidityLock:
            try:
                with open(path, encoding="utf-8") as f:
                    last = int(f.read().strip() or 0)
            except (FileNotFoundError, ValueError):
                last = 0
            value = max(int(time.time()), last + 1)
            _fsutil.atomicWrite(path, f"{value}\n".encode())
        return value

    def _readUidlist(self, path: str):
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().split("\n")
        except FileNotFoundError:
            return None, {}
        head = lines[0].split()
        if len(head) != 4 or " ".join(head[:2]) != UIDLIST_MAGIC:
            log.warn("{path}: unreadable uidlist, assigning a new UIDVALIDITY", path=path)
            return None, {}
        uidValidity, uidNext = int(head[2][1:]), int(head[3][1:])
        listed = {}
        for line in lines[1:]:
            parts = line.split(" ", 3)
            if len(parts) != 4:
                continue  # blank last line, or a torn append after a crash
            uid = int(parts[0])
            listed[uid] = (parts[3], float(parts[1]), int(parts[2]))
            uidNext = max(uidNext, uid + 1)
        return (uidValidity, uidNext), listed

    def _writeUidlist(self, path: str, uidValidity: int, uidNext: int, entries: dict) -> None:
        lines = [f"{UIDLIST_MAGIC} V{uidValidity} N{uidNext}\n"]
        lines += [f"{u} {int(d)} {s} {b}\n" for u, (b, d, s) in sorted(entries.items())]
        _fsutil.atomicWrite(path, "".join(lines).encode("utf-8"))

    def _readKeywords(self) -> list[str]:
        try:
            with open(os.path.join(self.path, KEYWORDS), encoding="utf-8") as f:
                return json.load(f)
        except FileNotFoundError:
            return []

    def _applyScan(self, result: dict) -> FolderChanges:
        validityChanged = bool(self.uidValidity) and result["uidValidity"] != self.uidValidity
        old = self._entries
        new = result["entries"]
        self._keywords = result["keywords"]
        self.uidValidity = result["uidValidity"]
        self.uidNext = result["uidNext"]
        self._entries = new
        self._byBase = {e.base: uid for uid, e in new.items()}
        changes = FolderChanges(
            added=tuple(sorted(set(new) - set(old))),
            removed=tuple(sorted(set(old) - set(new))),
            flagsChanged=tuple(sorted(u for u in set(new) & set(old) if new[u].info != old[u].info)),
            uidValidityChanged=validityChanged,
        )
        return self._changed(changes)

    # -- messages --------------------------------------------------------------

    def _fileName(self, uid: int) -> str:
        entry = self._entries.get(uid)
        if entry is None:
            raise NoSuchMessage(uid)
        return os.path.join(self.path, "cur", f"{entry.base}:2,{entry.info}")

    def openMessage(self, uid: int) -> defer.Deferred:
        try:
            path = self._fileName(uid)
        except NoSuchMessage:
            return defer.fail()
        return self._store._run(self._openSync, path, self._entries[uid].base)

    def readMessages(self, uids) -> defer.Deferred:
        try:
            targets = [(self._fileName(uid), self._entries[uid].base) for uid in uids]
        except NoSuchMessage:
            return defer.fail()
        return self._store._run(self._readSync, targets)

    def _readSync(self, targets: list[tuple[str, str]]) -> list[bytes]:
        out = []
        for path, base in targets:
            with self._openSync(path, base) as f:
                out.append(f.read())
        return out

    def _currentName(self, base: str) -> str | None:
        """The name in cur/ of message C{base} now: another program may have changed its flags."""
        for name in os.listdir(os.path.join(self.path, "cur")):
            if _splitName(name)[0] == base:
                return name
        return None

    def _openSync(self, path: str, base: str):
        try:
            return open(path, "rb")
        except FileNotFoundError:
            # Renamed by another program since our last scan (flags changed).
            name = self._currentName(base)
            if name is None:
                raise NoSuchMessage(base) from None
            return open(os.path.join(self.path, "cur", name), "rb")

    def _infoFor(self, flags: set) -> str:
        letters = {_FLAG_LETTERS[f] for f in flags if f in _FLAG_LETTERS}
        if "$Forwarded" in flags:
            letters.add("P")
        for keyword in sorted(f for f in flags if not f.startswith("\\") and f != "$Forwarded"):
            if keyword not in self._keywords:
                if len(self._keywords) >= MAX_KEYWORDS:
                    raise StorageError(f"at most {MAX_KEYWORDS} keywords per folder")
                self._keywords.append(keyword)
            letters.add(chr(97 + self._keywords.index(keyword)))
        return "".join(sorted(letters))

    def setFlags(self, uids, flags, mode: str) -> defer.Deferred:
        return self._lock.run(self._setFlags, set(uids), set(flags), mode)

    def _setFlags(self, uids: set, flags: set, mode: str) -> defer.Deferred:
        keywordsBefore = list(self._keywords)
        renames = []
        try:
            for uid in sorted(uids & set(self._entries)):
                entry = self._entries[uid]
                current = set(self._message(uid, entry).flags)
                if mode == "set":
                    wanted = set(flags)
                elif mode == "add":
                    wanted = current | flags
                else:
                    wanted = current - flags
                info = self._infoFor(wanted)
                if info != entry.info:
                    renames.append((uid, entry.base, entry.info, info))
        except StorageError:
            self._keywords = keywordsBefore
            return defer.fail()
        keywords = list(self._keywords) if self._keywords != keywordsBefore else None

        def apply(done: list) -> list:
            for uid, info in done:
                self._entries[uid].info = info
            self._changed(FolderChanges(flagsChanged=tuple(uid for uid, _ in done)))
            return [self._message(u, self._entries[u]) for u in sorted(uids & set(self._entries))]

        return self._store._run(self._renameSync, renames, keywords).addCallback(apply)

    def _renameSync(self, renames: list, keywords: list | None) -> list:
        if keywords is not None:
            _fsutil.atomicWrite(os.path.join(self.path, KEYWORDS), json.dumps(keywords).encode())
        cur = os.path.join(self.path, "cur")
        done = []
        for uid, base, old, new in renames:
            try:
                os.rename(os.path.join(cur, f"{base}:2,{old}"), os.path.join(cur, f"{base}:2,{new}"))
            except FileNotFoundError:
                # Another program changed its flags since our last scan: apply our
                # change on top of theirs instead of dropping it.
                name = self._currentName(base)
                if name is None:
                    continue  # expunged elsewhere; the next refresh reports it
                theirs = _splitName(name)[1]
                new = "".join(sorted((set(theirs) | (set(new) - set(old))) - (set(old) - set(new))))
                try:
                    os.rename(os.path.join(cur, name), os.path.join(cur, f"{base}:2,{new}"))
                except FileNotFoundError:
                    continue
            done.append((uid, new))
        return done

    def append(self, source: bytes, flags=(), internalDate: float | None = None) -> defer.Deferred:
        return self._lock.run(self._append, source, set(flags), internalDate)

    def _append(self, source: bytes, flags: set, internalDate: float | None) -> defer.Deferred:
        try:
            info = self._infoFor(flags)
        except StorageError:
            return defer.fail()
        keywords = list(self._keywords)
        d = self._store._commit.submit(
            lambda: [self._stageAppend(source, info, internalDate, keywords)])

        def refreshed(paths: list[str]) -> defer.Deferred:
            base = _splitName(os.path.basename(paths[0]))[0]
            return self._refresh().addCallback(lambda ignored: self._byBase[base])

        return d.addCallback(refreshed)

    def _stageAppend(self, source: bytes, info: str, internalDate, keywords: list) -> NewFile:
        _fsutil.atomicWrite(os.path.join(self.path, KEYWORDS), json.dumps(keywords).encode())
        return _stageMessage(self.path, [source], "cur", f":2,{info}", internalDate)

    def remove(self, uids) -> defer.Deferred:
        return self._lock.run(self._remove, set(uids))

    def _remove(self, uids: set) -> defer.Deferred:
        targets = {uid: self._fileName(uid) for uid in sorted(uids & set(self._entries))}
        keep = {u: (e.base, e.internalDate, e.size) for u, e in self._entries.items() if u not in targets}

        def removed(ignored) -> list:
            for uid in targets:
                del self._entries[uid]
            self._byBase = {e.base: uid for uid, e in self._entries.items()}
            self._changed(FolderChanges(removed=tuple(targets)))
            return list(targets)

        return self._store._run(self._removeSync, targets, keep).addCallback(removed)

    def _removeSync(self, targets: dict, keep: dict) -> None:
        for path in targets.values():
            try:
                os.unlink(path)
            except FileNotFoundError:
                # Its flags were changed by another program: it is still there under
                # another name, and would come back with a new UID if left.
                name = self._currentName(_splitName(os.path.basename(path))[0])
                if name is not None:
                    try:
                        os.unlink(os.path.join(self.path, "cur", name))
                    except FileNotFoundError:
                        pass
        _fsutil.fsyncDir(os.path.join(self.path, "cur"))
        # Rewrite, keeping N: UIDs of removed messages are never handed out again.
        self._writeUidlist(os.path.join(self.path, UIDLIST), self.uidValidity, self.uidNext, keep)


def _stageMessage(folderPath: str, chunks, subdir: str, suffix: str = "",
                  internalDate: float | None = None) -> NewFile:
    """Write C{tmp/<unique>}; L{GroupCommit} makes it durable and renames it into C{subdir}."""
    name = uniqueName()
    tmp = os.path.join(folderPath, "tmp", name)
    size = writeNewFile(tmp, chunks, internalDate)
    return NewFile(tmp, os.path.join(folderPath, subdir, f"{name},S={size}{suffix}"))


def _checkDirname(dirname: str) -> None:
    # A Maildir++ folder is one directory entry: escaped components joined by '.'.
    if len(os.fsencode(dirname)) > NAME_MAX:
        raise InvalidFolderName(f"folder name too long for this server (at most {NAME_MAX} "
                                "octets once escaped, all levels together)")


@implementer(IMailAccount)
class MaildirAccount:
    def __init__(self, store: MaildirStore, name: str, root: str) -> None:
        self._store = store
        self.name = name
        self.root = root

    def folderPath(self, name: str) -> str:
        name = folders.normalize(name)
        if name == "INBOX":
            return self.root
        dirname = "." + ".".join(folders.escapeComponent(p) for p in name.split(folders.SEPARATOR))
        _checkDirname(dirname)
        return os.path.join(self.root, dirname)

    def _nameFromDir(self, dirname: str) -> str:
        return folders.SEPARATOR.join(folders.unescapeComponent(p) for p in dirname[1:].split("."))

    def listFolders(self) -> defer.Deferred:
        return self._store._run(self._listSync)

    def _listSync(self) -> list[str]:
        names = ["INBOX"]
        try:
            entries = os.listdir(self.root)
        except FileNotFoundError:
            return names
        for entry in entries:
            if entry.startswith(".") and not entry.startswith("..") and \
                    os.path.isdir(os.path.join(self.root, entry, "cur")):
                names.append(self._nameFromDir(entry))
        return sorted(names, key=lambda n: (n != "INBOX", n))

    def createFolder(self, name: str) -> defer.Deferred:
        if isinstance(name, str) and folders.isInbox(name):
            return defer.fail(FolderExists("INBOX"))  # it always exists
        return defer.maybeDeferred(self.folderPath, name).addCallback(
            lambda path: self._store._run(self._createSync, folders.normalize(name), path))

    def _createSync(self, name: str, path: str) -> None:
        if os.path.isdir(os.path.join(path, "cur")):
            raise FolderExists(name)
        _makeMaildir(self.root)
        parts = name.split(folders.SEPARATOR)
        for depth in range(1, len(parts) + 1):  # Maildir++ has no implicit parents
            folderPath = self.folderPath(folders.SEPARATOR.join(parts[:depth]))
            if folderPath == self.root:
                continue  # INBOX/...: the account's Maildir is not a Maildir++ folder
            _makeMaildir(folderPath)
            with open(os.path.join(folderPath, "maildirfolder"), "a"):
                pass
        _fsutil.fsyncDir(self.root)

    def deleteFolder(self, name: str) -> defer.Deferred:
        try:
            name = folders.normalize(name)
            path = self.folderPath(name)
        except InvalidFolderName:
            return defer.fail()
        if name == "INBOX":
            return defer.fail(StorageError("INBOX cannot be deleted"))
        return self._store._run(self._deleteSync, name, path)

    def _deleteSync(self, name: str, path: str) -> None:
        if not os.path.isdir(os.path.join(path, "cur")):
            raise NoSuchFolder(name)
        # Rename away first so no reader sees a half-deleted folder.
        trash = os.path.join(self.root, f"..deleting-{uniqueName()}")
        os.rename(path, trash)
        _fsutil.fsyncDir(self.root)
        shutil.rmtree(trash, ignore_errors=True)
        self._store._forget(self.name, name)

    def renameFolder(self, old: str, new: str) -> defer.Deferred:
        try:
            old, new = folders.normalize(old), folders.normalize(new)
        except InvalidFolderName:
            return defer.fail()
        return self._store._run(self._renameSync, old, new)

    def _renameSync(self, old: str, new: str) -> None:
        src, dst = self.folderPath(old), self.folderPath(new)
        if old == "INBOX":
            _makeMaildir(self.root)  # INBOX always exists, even before the first delivery
        if new == "INBOX":
            raise FolderExists(new)
        if not os.path.isdir(os.path.join(src, "cur")):
            raise NoSuchFolder(old)
        if os.path.isdir(os.path.join(dst, "cur")):
            raise FolderExists(new)
        if old == "INBOX":
            # RFC 3501 §6.3.5: move INBOX's messages into the new folder, leave INBOX empty.
            self._createSync(new, dst)
            for sub in ("cur", "new"):
                for name in os.listdir(os.path.join(src, sub)):
                    os.rename(os.path.join(src, sub, name), os.path.join(dst, sub, name))
            for path in (os.path.join(src, "cur"), os.path.join(src, "new"), os.path.join(dst, "cur"),
                         os.path.join(dst, "new")):
                _fsutil.fsyncDir(path)
            self._store._forget(self.name, old)
            return
        prefix = os.path.basename(src)
        moves = [(entry, os.path.basename(dst) + entry[len(prefix):])
                 for entry in os.listdir(self.root)  # the folder and its children
                 if entry == prefix or entry.startswith(prefix + ".")]
        for _, target in moves:  # check all first: never leave a rename half done
            _checkDirname(target)
        for entry, target in moves:
            os.rename(os.path.join(self.root, entry), os.path.join(self.root, target))
        parent = new.rsplit(folders.SEPARATOR, 1)[0] if folders.SEPARATOR in new else None
        if parent and not os.path.isdir(os.path.join(self.folderPath(parent), "cur")):
            self._createSync(parent, self.folderPath(parent))
        _fsutil.fsyncDir(self.root)
        self._store._forget(self.name, old)

    def openFolder(self, name: str) -> defer.Deferred:
        try:
            name = folders.normalize(name)
            path = self.folderPath(name)
        except InvalidFolderName:
            return defer.fail()
        folder = self._store._folder(self.name, name, path)
        if name == "INBOX":
            d = self._store._run(_makeMaildir, self.root)
        else:
            d = defer.succeed(None)
        return d.addCallback(lambda ignored: folder.refresh()).addCallback(lambda ignored: folder)

    def subscriptions(self) -> defer.Deferred:
        return self._store._run(self._readSubscriptions)

    def _readSubscriptions(self) -> list[str]:
        try:
            with open(os.path.join(self.root, SUBSCRIPTIONS), encoding="utf-8") as f:
                return sorted(line for line in f.read().split("\n") if line)
        except FileNotFoundError:
            return []

    def setSubscribed(self, name: str, subscribed: bool) -> defer.Deferred:
        try:
            name = folders.normalize(name)
        except InvalidFolderName:
            return defer.fail()
        return self._store._run(self._setSubscribedSync, name, subscribed)

    def _setSubscribedSync(self, name: str, subscribed: bool) -> None:
        current = set(self._readSubscriptions())
        current = current | {name} if subscribed else current - {name}
        _makeMaildir(self.root)
        _fsutil.atomicWrite(os.path.join(self.root, SUBSCRIPTIONS),
                            "".join(n + "\n" for n in sorted(current)).encode("utf-8"))


@implementer(IMailStore)
class MaildirStore:
    """All accounts' Maildirs under ``<data_dir>/mail``."""

    def __init__(self, dataDir: str, deferToThread=threads.deferToThread) -> None:
        self.root = os.path.join(dataDir, "mail")
        self._run = deferToThread
        self._commit = GroupCommit(deferToThread)
        self._folders: weakref.WeakValueDictionary = weakref.WeakValueDictionary()

    def accountPath(self, name: str) -> str:
        try:
            canonical = validAddress(name)
        except AccountError as e:
            raise StorageError(str(e)) from None
        local, domain = canonical.split("@")
        return os.path.join(self.root, domain, local)

    def account(self, name: str) -> MaildirAccount:
        return MaildirAccount(self, name.lower(), self.accountPath(name))

    def _folder(self, account: str, name: str, path: str) -> MaildirFolder:
        key = (account, name)
        folder = self._folders.get(key)
        if folder is None:
            folder = self._folders[key] = MaildirFolder(self, account, name, path)
        return folder

    def _forget(self, account: str, name: str) -> None:
        self._folders.pop((account, name), None)

    def deliver(self, account: str, folder: str, source, flags=()) -> defer.Deferred:
        try:
            acct = self.account(account)
            path = acct.folderPath(folder)
        except StorageError:
            return defer.fail()
        d = self._commit.submit(lambda: [self._stageDelivery(acct.root, path, source)])

        def delivered(paths: list[str]) -> str:
            open_ = self._folders.get((acct.name, folders.normalize(folder)))
            if open_ is not None and open_._listeners:
                open_.refresh().addErrback(lambda f: log.failure("refresh after delivery", f))
            return os.path.basename(paths[0]).split(",")[0]

        return d.addCallback(delivered)

    def _stageDelivery(self, root: str, path: str, source) -> NewFile:
        if not os.path.isdir(os.path.join(path, "tmp")):
            try:
                _makeMaildir(root)
                _makeMaildir(path)
                # Any of these may have gained an entry: path's tmp/new/cur, root's
                # .Folder or tmp/new/cur, the domain's account, mail/'s domain,
                # the data dir's mail/.  A 250 needs every link to the file durable.
                for directory in dict.fromkeys((path, root, os.path.dirname(root), self.root,
                                                os.path.dirname(self.root))):
                    _fsutil.fsyncDir(directory)
            except OSError as e:
                raise StorageError(f"cannot create Maildir {path}: {e.strerror}") from e
        return _stageMessage(path, source.chunks(), "new")

    def removeAccount(self, name: str) -> defer.Deferred:
        path = self.accountPath(name)
        return self._run(shutil.rmtree, path, True)


@implementer(IMailStoreFactory)
class MaildirStoreFactory:
    name = "maildir"
    description = "Maildir++ folders, one file per message (default)"

    def makeStore(self, options: dict, dataDir: str) -> MaildirStore:
        from twistmail.config import ConfigError

        if options:
            raise ConfigError(f"[storage.maildir] has no options; remove {', '.join(options)}")
        return MaildirStore(dataDir)
