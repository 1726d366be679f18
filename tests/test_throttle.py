"""Password guessing: the failing client address is slowed, then blocked; an account never is.

Dovecot's auth_penalty and fail2ban: what is punished is the address that sends
wrong passwords, so a correct password from an address that has not been failing
always works at once, whatever others did to that account.
"""

from __future__ import annotations

import poplib
import socket

import pytest
from support import addUser, startServer
from twisted.cred import error
from twisted.cred.credentials import UsernamePassword
from twisted.internet import defer, task
from twisted.logger import globalLogPublisher

from twistmail.auth import throttle as throttlemod
from twistmail.auth.accounts import Accounts
from twistmail.auth.checkers import PasswordChecker, fromClient
from twistmail.auth.passwords import hashPassword
from twistmail.auth.throttle import AuthThrottle

ALICE = "alice@example.test"


def throttle(clock: task.Clock, **kw) -> AuthThrottle:
    settings = dict(failureDelay=2, maxDelay=15, maxFailures=5, window=600, blockTime=600)
    settings.update(kw)
    return AuthThrottle(**settings, clock=clock.seconds)


def test_delay_doubles_with_the_addresss_failures_up_to_the_cap():
    clock = task.Clock()
    t = throttle(clock, maxFailures=100)
    delays = [t.failed("10.0.0.1", "alice@x", "imap") for _ in range(6)]
    assert delays == [2, 4, 8, 15, 15, 15]  # Dovecot: 2^n s, at most 15 s
    assert t.before("10.0.0.1") == (False, 15), "the next check from there waits too"
    assert t.before("10.0.0.2") == (False, 0), "another address is not slowed"
    clock.advance(601)
    assert t.before("10.0.0.1") == (False, 0), "failures expire after the window"


def test_address_blocked_after_max_failures_then_released():
    clock = task.Clock()
    t = throttle(clock)
    for _ in range(4):
        t.failed("192.0.2.7", "alice@x", "pop3")
    assert t.before("192.0.2.7")[0] is False
    t.failed("192.0.2.7", "alice@x", "pop3")
    assert t.before("192.0.2.7")[0] is True
    assert t.before("::ffff:192.0.2.7")[0] is True, "the same address, dual-stack"
    assert t.before("192.0.2.8") == (False, 0)
    clock.advance(601)
    assert t.before("192.0.2.7")[0] is False


def test_ipv6_clients_are_counted_per_64():
    clock = task.Clock()
    t = throttle(clock)
    for n in range(5):
        t.failed(f"2001:db8:1:2::{n + 1}", "alice@x", "imap")
    assert t.before("2001:db8:1:2:ffff::9")[0] is True
    assert t.before("2001:db8:1:3::1") == (False, 0)


@pytest.mark.parametrize("client", ["127.0.0.1", "127.9.9.9", "::1", "::ffff:127.0.0.1"])
def test_loopback_is_slowed_but_never_blocked(client):
    clock = task.Clock()
    t = throttle(clock)
    for _ in range(50):
        t.failed(client, "alice@x", "imap")
    assert t.before(client) == (False, 15)


def test_many_addresses_against_one_account_slow_its_failures_never_block_it():
    clock = task.Clock()
    t = throttle(clock)
    delays = [t.failed(f"10.0.{n // 250}.{n % 250}", "alice@x", "imap") for n in range(50)]
    assert delays[0] == 2 and delays[-1] == 15, "each address failed once; the account is hot"
    assert t.before("10.9.9.9") == (False, 0), "a fresh address checks at once"
    assert t.failed("10.9.9.9", "bob@x", "imap") == 2, "other accounts are not slowed"


def test_success_clears_the_addresss_failures():
    clock = task.Clock()
    t = throttle(clock)
    for _ in range(3):
        t.failed("10.0.0.1", "alice@x", "imap")
    t.succeeded("10.0.0.1")
    assert t.before("10.0.0.1") == (False, 0)


def test_state_is_bounded(monkeypatch):
    monkeypatch.setattr(throttlemod, "MAX_TRACKED", 1000)
    clock = task.Clock()
    t = throttle(clock)
    for n in range(1010):
        t.failed(f"10.0.{n >> 8}.{n & 255}", str(n) + "x" * 65536, "imap")
    assert len(t._addresses) == len(t._accounts) == 1000
    assert max(len(key) for key in t._accounts) < 400
    assert t.before("10.0.0.0") == (False, 0), "the least recently seen is forgotten"
    assert t.before("10.0.3.241") == (False, 2)


def test_block_is_logged_once_fail2ban_style_without_the_password():
    seen = []
    globalLogPublisher.addObserver(seen.append)
    try:
        t = throttle(task.Clock())
        for _ in range(6):
            t.failed("192.0.2.7", "alice\n@x", "smtp")
    finally:
        globalLogPublisher.removeObserver(seen.append)
    from twisted.logger import formatEvent

    lines = [formatEvent(e) for e in seen if e.get("log_format", "").startswith("auth block")]
    assert lines == ["auth block client=192.0.2.7 result=blocked for 600s after 5 failed logins "
                     "in 600s (last: smtp user=alice\\n@x)"]


def checkerFor(tmp_path, clock: task.Clock, **kw):
    accounts = Accounts(str(tmp_path))
    with accounts.editing():
        accounts.addDomain("example.test")
        accounts.addUser(ALICE, hashPassword("right"))
    hashed = []

    def inline(f, *args):
        hashed.append(args[1])
        return defer.maybeDeferred(f, *args)

    checker = PasswordChecker(accounts, inline, throttle=throttle(clock, **kw), clock=clock)

    def attempt(password: str, client: str):
        outcome = []
        creds = fromClient(UsernamePassword(ALICE.encode(), password.encode()), client, "imap")
        checker.requestAvatarId(creds).addBoth(outcome.append)
        return outcome

    return attempt, hashed


def test_checker_right_password_from_a_fresh_address_after_50_failures(tmp_path):
    clock = task.Clock()
    attempt, hashed = checkerFor(tmp_path, clock)
    outcomes = [attempt("wrong", f"10.0.0.{n}") for n in range(1, 51)]
    assert all(o == [] for o in outcomes), "failures are not answered at once"
    ok = attempt("right", "10.0.1.1")
    assert ok == [ALICE], "answered at once, not even after a delay"
    clock.advance(15)
    assert all(o[0].check(error.UnauthorizedLogin) for o in outcomes)


def test_checker_blocked_address_is_refused_without_a_hash_after_the_delay(tmp_path):
    clock = task.Clock()
    attempt, hashed = checkerFor(tmp_path, clock, maxFailures=2)
    for n in range(2):
        attempt(f"wrong{n}", "192.0.2.1")
        clock.advance(15)
    blocked = attempt("right", "192.0.2.1")
    assert blocked == [] and hashed == ["wrong0", "wrong1"], "no hash computed"
    clock.advance(15)
    assert blocked[0].check(error.UnauthorizedLogin)
    clock.advance(600)
    slowed = attempt("right", "192.0.2.1")
    assert slowed == [ALICE], "unblocked: failures outside the window are forgotten"


def test_checker_delays_the_check_of_a_failing_address(tmp_path):
    clock = task.Clock()
    attempt, hashed = checkerFor(tmp_path, clock)
    attempt("wrong", "127.0.0.5")
    clock.advance(2)
    later = attempt("right", "127.0.0.5")
    assert later == [] and hashed == ["wrong"], "checked only after the address's penalty"
    clock.advance(2)
    assert later == [ALICE]


def test_the_same_wrong_password_again_is_one_failure_as_in_dovecot():
    """A phone holding an old password opens five connections at once: one mistake, not five."""
    clock = task.Clock()
    t = throttle(clock)
    delays = [t.failed("192.0.2.7", "alice@x", "imap", "old") for _ in range(20)]
    assert delays == [2] * 20, "repeats do not escalate"
    assert t.before("192.0.2.7") == (False, 2), "not blocked"
    assert t.failed("192.0.2.7", "bob@x", "imap", "old") == 4, "another account is another guess"
    assert t.failed("192.0.2.7", "alice@x", "imap", "guess") == 8, "another password is another guess"


def test_guessing_with_different_passwords_still_blocks():
    clock = task.Clock()
    t = throttle(clock)
    for n in range(5):
        t.failed("192.0.2.7", "alice@x", "imap", f"guess{n}")
    assert t.before("192.0.2.7")[0] is True


def test_checker_stale_password_on_many_connections_never_blocks_its_owner(tmp_path):
    clock = task.Clock()
    attempt, hashed = checkerFor(tmp_path, clock)
    for _ in range(10):
        attempt("old-password", "192.0.2.1")
        clock.advance(15)
    fixed = attempt("right", "192.0.2.1")
    clock.advance(2)
    assert fixed == [ALICE], "the owner's new password works after one short delay"


# -- over a real protocol --------------------------------------------------------------


class POP3From(poplib.POP3):
    """A POP3 client from C{source} (127.0.0.x: each a distinct client address)."""

    def __init__(self, port: int, source: str) -> None:
        self.source = source
        super().__init__("127.0.0.1", port, timeout=10)

    def _create_socket(self, timeout):
        return socket.create_connection((self.host, self.port), timeout, (self.source, 0))


def test_pop3_right_password_works_after_50_wrong_ones_from_other_addresses(dataDir):
    addUser(dataDir, ALICE)
    # Trust the clients' addresses for plaintext: this test is about guessing, not TLS.
    srv = startServer(dataDir, auth={"plaintext_networks": ["127.0.0.0/8"], "max_delay": 0.05})
    try:
        for n in range(50):
            pop = POP3From(srv.pop3Port, f"127.0.0.{2 + n % 10}")
            pop.user(ALICE)
            with pytest.raises(poplib.error_proto):
                pop.pass_("wrong")
            pop.quit()
        pop = POP3From(srv.pop3Port, "127.0.0.100")
        pop.user(ALICE)
        assert pop.pass_("secret").startswith(b"+OK")
        pop.quit()
        again = POP3From(srv.pop3Port, "127.0.0.2")  # loopback: slowed, never blocked
        again.user(ALICE)
        assert again.pass_("secret").startswith(b"+OK")
        again.quit()
    finally:
        srv.stop()
