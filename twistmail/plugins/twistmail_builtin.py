"""The built-in storage backends and filters, registered the way a third-party plugin registers its own."""

from twistmail.filters.dkimsign import DKIMSignFilterFactory
from twistmail.filters.dnsbl import DnsblFilterFactory
from twistmail.filters.greylist import GreylistFilterFactory
from twistmail.filters.rspamd import RspamdFilterFactory
from twistmail.filters.spfdkimdmarc import SpfDkimDmarcFactory
from twistmail.storage.maildir import MaildirStoreFactory
from twistmail.storage.mbox import MboxStoreFactory
from twistmail.storage.postgresql import PostgresStoreFactory

maildir = MaildirStoreFactory()
mbox = MboxStoreFactory()
postgresql = PostgresStoreFactory()

dkimSign = DKIMSignFilterFactory()
dnsbl = DnsblFilterFactory()
greylist = GreylistFilterFactory()
rspamd = RspamdFilterFactory()
spfDkimDmarc = SpfDkimDmarcFactory()
