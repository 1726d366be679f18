# -*- test-case-name: tests.test_filters -*-
"""Built-in submission rules (RFC 6409), always first on the submission listeners."""

from __future__ import annotations

import secrets

from twisted.logger import Logger

from twistmail._logtext import loggable
from twistmail.delivery.trace import now
from twistmail.errors import AccountsUnavailable
from twistmail.filters.base import Filter
from twistmail.model import Verdict

log = Logger()


class SenderOwnership(Filter):
    """RFC 6409 §4.2, §6.1: MAIL only after AUTH, and only as oneself (an address or
    alias that routes to the authenticated account), unless C{check} is off
    (``[submission] require_own_sender = false``)."""

    name = "builtin:sender"

    def __init__(self, accounts, delimiter: str, check: bool = True) -> None:
        self._accounts = accounts
        self._delimiter = delimiter
        self._check = check

    def mailFrom(self, session):
        if not session.authenticated:
            return Verdict.reject("5.7.0 Authentication required", 530)
        if not self._check:
            return None
        sender = session.sender.lower()
        try:
            owned = session.authenticated in self._accounts.route(sender, self._delimiter)
        except AccountsUnavailable:
            return Verdict.tempfail("4.3.0 Sender check failed temporarily, try again later")
        except Exception:
            owned = False
        if owned:
            return None
        log.info("smtp reject client={client} user={user} from=<{sender}> "
                 "result=sender not owned", client=session.client, user=session.authenticated,
                 sender=loggable(sender))
        return Verdict.reject("5.7.1 Sender address rejected: not owned by the authenticated user",
                              553)


class MessageIdAndDate(Filter):
    """RFC 6409 §8.3, §8.4: a submission server may add the Message-ID and Date the
    client left out.  Added before the configured filters run, so a DKIM signer
    after this one signs them."""

    name = "builtin:message-id"

    def __init__(self, hostname: bytes) -> None:
        self._hostname = hostname.decode("ascii", "replace")

    def endOfData(self, session, message):
        headers = []
        if "message-id" not in message.headers:
            headers.append(("Message-ID",
                            f"<{session.id}.{secrets.token_hex(4)}@{self._hostname}>"))
        if "date" not in message.headers:
            headers.append(("Date", now().decode()))
        return Verdict.accept(headers)
