"""The built-in storage backends and filters, registered the way a third-party plugin registers its own."""

from twistmail.filters.dkimsign import DKIMSignFilterFactory
from twistmail.storage.maildir import MaildirStoreFactory
from twistmail.storage.mbox import MboxStoreFactory

maildir = MaildirStoreFactory()
mbox = MboxStoreFactory()
dkimSign = DKIMSignFilterFactory()
