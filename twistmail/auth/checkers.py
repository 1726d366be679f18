# -*- test-case-name: tests.test_pop3 -*-
"""twisted.cred checker for usernames (full addresses) and passwords."""

from __future__ import annotations

from twisted.cred import credentials, error
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet import defer, threads
from zope.interface import implementer

from twistmail.auth.accounts import Accounts
from twistmail.auth.passwords import verifyPassword


@implementer(ICredentialsChecker)
class PasswordChecker:
    """Checks IUsernamePassword against argon2 hashes, off the reactor thread."""

    credentialInterfaces = (credentials.IUsernamePassword,)

    def __init__(self, accounts: Accounts, deferToThread=threads.deferToThread) -> None:
        self._accounts = accounts
        self._deferToThread = deferToThread

    def requestAvatarId(self, creds) -> defer.Deferred:
        try:
            username = creds.username.decode("utf-8") if isinstance(creds.username, bytes) else creds.username
            password = creds.password.decode("utf-8") if isinstance(creds.password, bytes) else creds.password
        except UnicodeDecodeError:
            return defer.fail(error.UnauthorizedLogin())
        username = username.strip().lower()
        hashed = self._accounts.passwordHash(username)
        d = self._deferToThread(verifyPassword, hashed, password)

        def checked(ok: bool):
            if not ok:
                raise error.UnauthorizedLogin()
            return username

        return d.addCallback(checked)
