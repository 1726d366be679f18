"""twistd plugin: ``twistd twistmail``.  Loads twistmail.tap lazily (as twisted_mail does)."""

from twisted.application.service import ServiceMaker

twistmail = ServiceMaker(
    "twistmail",
    "twistmail.tap",
    "All-in-one mail server: SMTP (MX and relay), POP3, IMAP4, Maildir",
    "twistmail",
)
