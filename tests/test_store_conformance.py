"""One conformance suite (twistmail.testing.StoreConformanceTests), every backend.

The example plugin's run is in tests/test_plugins.py: it is loaded through
the plugin path, as a third-party backend would be.
"""

from __future__ import annotations

import collections
import mailbox
import os
import threading
import weakref

import pytest

from twistmail.delivery.spool import MessageSource
from twistmail.storage.maildir import MaildirStore
from twistmail.storage.mbox import MboxStore
from twistmail.testing import StoreConformanceTests, onReactor
from twistmail.testing.conformance import ALICE, deliver, message, openFolder, uids


def accountDir(dataDir: str, tree: str, address: str) -> str:
    local, domain = address.split("@")
    return os.path.join(dataDir, tree, domain, local)


class TestMaildir(StoreConformanceTests):
    hasExternalWriters = True

    def makeStore(self, dataDir):
        return MaildirStore(dataDir)

    def accountDir(self, dataDir, address):
        return accountDir(dataDir, "mail", address)

    def externalDelivery(self, dataDir, account, folder, data):
        """As an MDA writes a Maildir: tmp/, then a rename into new/."""
        assert folder == "INBOX"
        root = self.accountDir(dataDir, account)
        name = f"1700000000.M{len(os.listdir(os.path.join(root, 'new')))}P4242.otherhost"
        with open(os.path.join(root, "tmp", name), "wb") as f:
            f.write(data)
        os.rename(os.path.join(root, "tmp", name), os.path.join(root, "new", name))


def appendWithMailbox(path: str, data: bytes) -> None:
    """As procmail or any Debian program appends to an mbox: fcntl and dot-lock first."""
    box = mailbox.mbox(path, create=False)
    box.lock()
    try:
        box.add(data)  # bytes: written as they are (a Message would be re-encoded)
        box.flush()
    finally:
        box.unlock()
        box.close()


class TestMbox(StoreConformanceTests):
    hasExternalWriters = True

    def makeStore(self, dataDir):
        return MboxStore(dataDir)

    def accountDir(self, dataDir, address):
        return accountDir(dataDir, "mbox", address)

    def externalDelivery(self, dataDir, account, folder, data):
        assert folder == "INBOX"
        appendWithMailbox(os.path.join(self.accountDir(dataDir, account), "INBOX"), data)


# -- the file backends' shared folder cache ------------------------------------------------


class _ThreadRecording:
    """Mixin for the cache's mapping types: which threads changed it."""

    def _record(self) -> None:
        self.threads.add(threading.current_thread().name)

    def __setitem__(self, key, value):
        self._record()
        super().__setitem__(key, value)

    def __delitem__(self, key):
        self._record()
        super().__delitem__(key)

    def pop(self, key, *default):
        self._record()
        return super().pop(key, *default)

    def popitem(self, *args, **kwargs):
        self._record()
        return super().popitem(*args, **kwargs)

    def move_to_end(self, *args, **kwargs):
        self._record()
        return super().move_to_end(*args, **kwargs)


class _RecordingWeakDict(_ThreadRecording, weakref.WeakValueDictionary):
    threads: set


class _RecordingOrderedDict(_ThreadRecording, collections.OrderedDict):
    threads: set


@pytest.mark.parametrize("storeClass", [MaildirStore, MboxStore])
def test_folder_cache_changed_only_on_the_reactor_thread(storeClass, tmp_path):
    """Deleting and renaming folders (INBOX too) while sessions have them open edits
    the store's folder cache only on the reactor thread, which every session reads
    it from: a worker thread editing it races the reactor's lookups."""
    store = storeClass(str(tmp_path))
    store._folders = _RecordingWeakDict()
    store._recentlyUsed = _RecordingOrderedDict()
    store._folders.threads = store._recentlyUsed.threads = set()
    account = store.account(ALICE)
    for name in ("Work", "Work/Old", "Gone"):
        onReactor(account.createFolder, name)
    deliver(store, message(1))
    held = [onReactor(account.openFolder, n) for n in ("INBOX", "Work", "Work/Old", "Gone")]
    onReactor(account.deleteFolder, "Gone")
    onReactor(account.renameFolder, "Work", "Play")
    onReactor(account.renameFolder, "INBOX", "Archive")
    assert store._folders.threads | store._recentlyUsed.threads == {"reactor"}
    assert uids(openFolder(store, "Archive")) == [1]
    # INBOX stayed (RFC 3501 §6.3.5): still the one index its sessions share.
    assert openFolder(store, "INBOX") is held[0] and held[0].messages() == []


class TestPostgresql(StoreConformanceTests):
    """The same contract on a real PostgreSQL (tests/pgproc.py): restart() is a second
    store, with its own pool and caches, on the same database, as another node or a
    restarted server sees it."""

    hasExternalWriters = True  # another node on the same database

    @pytest.fixture(autouse=True)
    def _cluster(self, postgres):
        self.cluster = postgres

    def externalDelivery(self, dataDir, account, folder, data):
        other = self.makeStore(dataDir)
        onReactor(other.deliver, account, folder, MessageSource.fromBytes(data))

    def makeStore(self, dataDir):
        from twistmail.storage.postgresql import PostgresStore, schema

        dsn = self.cluster.dsn(dataDir)
        schema.upgrade(dsn)
        store = PostgresStore(dsn)
        self._stores = getattr(self, "_stores", []) + [store]
        return store

    @pytest.fixture(autouse=True)
    def _closeStores(self):
        yield
        for store in getattr(self, "_stores", []):
            store.close()
