# -*- test-case-name: tests.test_throttle -*-
"""twisted.cred checker for usernames (full addresses) and passwords."""

from __future__ import annotations

from twisted.cred import credentials, error
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet import defer, task, threads
from zope.interface import implementer

from twistmail.auth.accounts import accountKey
from twistmail.auth.passwords import verifyPassword
from twistmail.auth.throttle import AuthThrottle
from twistmail.errors import AccountsUnavailable
from twistmail.interfaces import IAccountStore
from twistmail.metrics import LOGIN_PROTOCOLS, Metrics


def fromClient(creds, client: str, protocol: str):
    """Tag C{creds} with where they came from, for the throttle and the logs."""
    creds.client = client
    creds.protocol = protocol
    return creds


def _client(creds) -> str:
    return getattr(creds, "client", "unknown")


@implementer(ICredentialsChecker)
class PasswordChecker:
    """Checks IUsernamePassword against argon2 hashes, off the reactor thread.

    With a throttle, a client address that has been failing waits before its
    password is checked, a blocked one is refused without a hash computed, and
    every failure is answered only after the throttle's delay; a correct
    password is answered as soon as it is checked.

    Every outcome is counted (L{Metrics.logins}): per protocol, ok, failed or blocked.
    """

    credentialInterfaces = (credentials.IUsernamePassword,)

    def __init__(self, accounts: IAccountStore, deferToThread=threads.deferToThread,
                 throttle: AuthThrottle | None = None, clock=None,
                 metrics: Metrics | None = None) -> None:
        self._accounts = accounts
        self._deferToThread = deferToThread
        self._throttle = throttle
        if clock is None:
            from twisted.internet import reactor as clock
        self._clock = clock
        self._logins = (metrics or Metrics()).logins

    def requestAvatarId(self, creds) -> defer.Deferred:
        try:
            username = creds.username.decode("utf-8") if isinstance(creds.username, bytes) else creds.username
            password = creds.password.decode("utf-8") if isinstance(creds.password, bytes) else creds.password
        except UnicodeDecodeError:
            return self._fail(creds, "", None)
        username = username.strip().lower()
        if self._throttle is None:
            return self._check(creds, username, password)
        blocked, delay = self._throttle.before(_client(creds))
        if blocked:
            self._count(creds, "blocked")
            return self._refuse(delay)
        if not delay:
            return self._check(creds, username, password)
        return task.deferLater(self._clock, delay, self._check, creds, username, password)

    def _check(self, creds, username: str, password: str) -> defer.Deferred:
        try:
            hashed = self._accounts.passwordHash(username)
        except AccountsUnavailable:
            # Not the client's mistake: answered as a temporary error by the protocol,
            # and not counted by the throttle (an outage must not block anybody).
            return defer.fail()
        d = self._deferToThread(verifyPassword, hashed, password)

        def checked(ok: bool):
            if not ok:
                return self._fail(creds, username, password)
            self._count(creds, "ok")
            if self._throttle is not None:
                self._throttle.succeeded(_client(creds))
            # One account name however it was typed (NFC, IDNA A-label: L{accountKey}).
            return accountKey(username)

        return d.addCallback(checked)

    def _count(self, creds, result: str) -> None:
        protocol = getattr(creds, "protocol", "")
        self._logins.labels(protocol if protocol in LOGIN_PROTOCOLS else "other", result).inc()

    def _fail(self, creds, username: str, password: str | None) -> defer.Deferred:
        self._count(creds, "failed")
        if self._throttle is None:
            return defer.fail(error.UnauthorizedLogin())
        return self._refuse(self._throttle.failed(_client(creds), username,
                                                  getattr(creds, "protocol", "?"), password))

    def _refuse(self, delay: float) -> defer.Deferred:
        def refuse():
            raise error.UnauthorizedLogin()

        return task.deferLater(self._clock, delay, refuse)
