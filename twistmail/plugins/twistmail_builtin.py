"""The built-in storage backends, registered the way a third-party plugin registers its own."""

from twistmail.storage.maildir import MaildirStoreFactory
from twistmail.storage.mbox import MboxStoreFactory

maildir = MaildirStoreFactory()
mbox = MboxStoreFactory()
