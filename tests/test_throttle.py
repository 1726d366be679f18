"""Password guessing: failures are slowed, then the address or the account is locked out."""

from __future__ import annotations

from twisted.cred import error
from twisted.cred.credentials import UsernamePassword
from twisted.internet import defer, task
from twisted.logger import globalLogPublisher

from twistmail.auth.accounts import Accounts
from twistmail.auth.checkers import PasswordChecker, fromClient
from twistmail.auth.passwords import hashPassword
from twistmail.auth.throttle import AuthThrottle


class Now:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def throttle(now: Now) -> AuthThrottle:
    return AuthThrottle(maxFailures=3, window=60, lockout=300, failureDelay=2, clock=now)


def test_lockout_per_address_and_per_account():
    now = Now()
    t = throttle(now)
    for _ in range(3):
        assert t.lockedOut("10.0.0.1", "alice@x") is None
        t.failed("10.0.0.1", "alice@x", "imap")
    assert "address locked out for 300" in t.lockedOut("10.0.0.1", "bob@x")
    assert "account locked out" in t.lockedOut("10.9.9.9", "alice@x")
    assert t.lockedOut("10.9.9.9", "bob@x") is None
    now.t += 301
    assert t.lockedOut("10.0.0.1", "alice@x") is None


def test_failures_outside_the_window_do_not_count_and_success_clears():
    now = Now()
    t = throttle(now)
    t.failed("10.0.0.1", "alice@x", "pop3")
    t.failed("10.0.0.1", "alice@x", "pop3")
    now.t += 61
    t.failed("10.0.0.1", "alice@x", "pop3")
    assert t.lockedOut("10.0.0.1", "alice@x") is None
    t.failed("10.0.0.1", "alice@x", "pop3")
    t.succeeded("10.0.0.1", "alice@x")
    t.failed("10.0.0.1", "alice@x", "pop3")
    assert t.lockedOut("10.0.0.1", "alice@x") is None


def test_lockout_is_logged_without_the_password(tmp_path):
    seen = []
    globalLogPublisher.addObserver(seen.append)
    try:
        t = throttle(Now())
        for _ in range(3):
            t.failed("192.0.2.7", "alice@x", "smtp")
    finally:
        globalLogPublisher.removeObserver(seen.append)
    events = [e for e in seen if e.get("log_format", "").startswith("auth lockout")]
    assert len(events) == 2  # the address and the account
    assert {e["kind"] for e in events} == {"address", "account"}
    assert all(e["client"] == "192.0.2.7" and e["protocol"] == "smtp" for e in events)


def test_checker_delays_failures_and_skips_the_hash_when_locked(tmp_path):
    accounts = Accounts(str(tmp_path))
    with accounts.editing():
        accounts.addDomain("example.test")
        accounts.addUser("alice@example.test", hashPassword("right"))
    clock = task.Clock()
    hashed = []

    def inline(f, *args):
        hashed.append(args[1])
        return defer.maybeDeferred(f, *args)

    t = AuthThrottle(maxFailures=2, window=60, lockout=300, failureDelay=2, clock=clock.seconds)
    checker = PasswordChecker(accounts, inline, throttle=t, clock=clock)

    def attempt(password: str):
        outcome = []
        creds = fromClient(UsernamePassword(b"alice@example.test", password.encode()), "10.1.1.1",
                           "imap")
        checker.requestAvatarId(creds).addBoth(outcome.append)
        return outcome

    first = attempt("wrong")
    assert first == [], "a failure is not answered at once"
    clock.advance(2)
    assert first[0].check(error.UnauthorizedLogin)
    second = attempt("wrong")
    clock.advance(2)
    assert second[0].check(error.UnauthorizedLogin)
    assert hashed == ["wrong", "wrong"]
    locked = attempt("right")  # even the right password: locked out, no hash computed
    clock.advance(2)
    assert locked[0].check(error.UnauthorizedLogin) and hashed == ["wrong", "wrong"]
    clock.advance(300)
    ok = attempt("right")
    assert ok == ["alice@example.test"], "success is answered at once"
