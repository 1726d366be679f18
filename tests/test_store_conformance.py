"""One conformance suite (twistmail.testing.StoreConformanceTests), every backend.

The example plugin's run is in tests/test_plugins.py: it is loaded through
the plugin path, as a third-party backend would be.
"""

from __future__ import annotations

import mailbox
import os

from twistmail.storage.maildir import MaildirStore
from twistmail.storage.mbox import MboxStore
from twistmail.testing import StoreConformanceTests


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
