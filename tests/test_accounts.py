"""Accounts: routing (users, aliases, user+tag), validation, and pick-up of CLI edits."""

from __future__ import annotations

import json
import os
import signal
import stat
from contextlib import contextmanager

import pytest

from twistmail.auth.accounts import (
    MAX_ALIAS_DEPTH,
    AccountError,
    Accounts,
    NotLocal,
    UnknownUser,
)
from twistmail.auth.passwords import hashPassword, verifyPassword

HASH = "$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$aGFzaGhhc2g"  # shape only; route() never checks it


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@contextmanager
def deadline(seconds: float):
    """Fail (instead of hanging the suite) if the block runs longer than C{seconds}."""
    def expired(signum, frame):
        raise AssertionError(f"still running after {seconds}s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def accounts(dataDir):
    a = Accounts(dataDir)
    with a.editing():
        a.addDomain("example.test")
        a.addDomain("example.org")
        for user in ("alice@example.test", "bob@example.test", "carol@example.org"):
            a.addUser(user, HASH)
    return a


def edit(dataDir, change) -> None:
    """What the admin CLI does: a separate Accounts instance, locked, written atomically."""
    admin = Accounts(dataDir)
    with admin.editing():
        change(admin)


# -- route -------------------------------------------------------------------------


def test_routeUser(accounts):
    assert accounts.route("alice@example.test") == ["alice@example.test"]
    assert accounts.route("carol@example.org") == ["carol@example.org"]


def test_routeIsCaseInsensitive(accounts):
    assert accounts.route("Alice@EXAMPLE.Test") == ["alice@example.test"]
    assert accounts.route("alice@example.test.") == ["alice@example.test"]


def test_notLocalVersusUnknownUser(accounts):
    with pytest.raises(NotLocal):
        accounts.route("alice@elsewhere.example")
    with pytest.raises(UnknownUser):
        accounts.route("nobody@example.test")
    with pytest.raises(UnknownUser):
        accounts.route("not-an-address")
    assert accounts.isLocalDomain("EXAMPLE.test")
    assert not accounts.isLocalDomain("elsewhere.example")


def test_aliases(accounts):
    accounts.addAlias("postmaster@example.test", ["alice@example.test"])
    accounts.addAlias("team@example.test", ["alice@example.test", "bob@example.test"])
    accounts.addAlias("everyone@example.test", ["team@example.test", "carol@example.org",
                                                "postmaster@example.test"])
    assert accounts.route("postmaster@example.test") == ["alice@example.test"]
    assert sorted(accounts.route("team@example.test")) == ["alice@example.test", "bob@example.test"]
    # Recursive, and each account once even when reached twice.
    assert sorted(accounts.route("Everyone@Example.Test")) == [
        "alice@example.test", "bob@example.test", "carol@example.org"]


def test_aliasLoopTerminates(accounts):
    accounts.addAlias("a@example.test", ["b@example.test"])
    accounts.addAlias("b@example.test", ["a@example.test"])
    with deadline(5):
        with pytest.raises(UnknownUser):
            accounts.route("a@example.test")
    accounts.addAlias("b@example.test", ["bob@example.test"])  # b -> a, bob
    with deadline(5):
        assert accounts.route("a@example.test") == ["bob@example.test"]


def test_aliasMeshDoesNotExplode(accounts):
    """Mutually referring aliases must cost linear time, not (fan-out ** depth)."""
    names = [f"list{n}@example.test" for n in range(12)]
    for name in names:
        accounts.addAlias(name, names)
    accounts.addAlias(names[-1], ["bob@example.test"])
    with deadline(5):
        for name in names:
            assert accounts.route(name) == ["bob@example.test"]


def test_aliasDepthIsBounded(accounts):
    chain = [f"hop{n}@example.test" for n in range(30)]
    for here, there in zip(chain, chain[1:], strict=False):
        accounts.addAlias(here, [there])
    accounts.addAlias(chain[-1], ["alice@example.test"])
    assert accounts.route(chain[-5]) == ["alice@example.test"]
    assert accounts.route(chain[-MAX_ALIAS_DEPTH]) == ["alice@example.test"]
    with pytest.raises(UnknownUser):
        accounts.route(chain[-MAX_ALIAS_DEPTH - 1])
    with pytest.raises(UnknownUser):
        accounts.route(chain[0])  # 30 hops: past the limit


def test_plusAddressing(accounts):
    assert accounts.route("alice+lists@example.test") == ["alice@example.test"]
    assert accounts.route("Alice+Lists+more@Example.Test") == ["alice@example.test"]
    with pytest.raises(UnknownUser):
        accounts.route("nobody+tag@example.test")
    with pytest.raises(UnknownUser):
        accounts.route("alice+tag@example.test", delimiter="")  # sub-addressing disabled
    assert accounts.route("alice-tag@example.test", delimiter="-") == ["alice@example.test"]


def test_plusAddressingReachesAliases(accounts):
    accounts.addAlias("team@example.test", ["bob@example.test"])
    assert accounts.route("team+urgent@example.test") == ["bob@example.test"]


def test_exactNameWithDelimiterCannotExist(accounts):
    """user+tag always means 'user': no account or alias may contain the delimiter."""
    with pytest.raises(AccountError, match="local part"):
        accounts.addUser("x+y@example.test", HASH)
    with pytest.raises(AccountError, match="local part"):
        accounts.addAlias("x+y@example.test", ["alice@example.test"])
    assert "x+y@example.test" not in accounts.users and accounts.aliases == {}


def test_passwordHash(accounts):
    assert accounts.passwordHash("ALICE@example.test") == HASH
    assert accounts.passwordHash("nobody@example.test") is None


# -- validation --------------------------------------------------------------------


@pytest.mark.parametrize("local", ["../x", "a/b", ".x", "x.", "a..b", "", "-x", "a b", "a@b",
                                   "a\\b", "a\x00b", "x" * 65, "ü/b", "a%b", "a:b"])
def test_addUserRejectsBadLocalParts(accounts, local):
    with pytest.raises(AccountError):
        accounts.addUser(f"{local}@example.test", HASH)
    assert sorted(accounts.users) == ["alice@example.test", "bob@example.test", "carol@example.org"]


@pytest.mark.parametrize("local", ["a", "first.last", "x_y", "x-y", "x-", "_x", "0", "a" * 64])
def test_addUserAcceptsGoodLocalParts(accounts, local):
    assert accounts.addUser(f"{local.upper()}@Example.Test", HASH) == f"{local}@example.test"


@pytest.mark.parametrize("domain", ["exa mple.test", "under_score.test", "-x.test", "x-.test",
                                   "a..b", "", ".", "a/b", "..", "x" * 64 + ".test"])
def test_addDomainRejectsBadDomains(accounts, domain):
    with pytest.raises(AccountError):
        accounts.addDomain(domain)


def test_addUserChecks(accounts):
    with pytest.raises(AccountError, match="twistmail domain add elsewhere.example"):
        accounts.addUser("dave@elsewhere.example", HASH)
    with pytest.raises(AccountError, match="already exists"):
        accounts.addUser("ALICE@example.test", HASH)
    accounts.addAlias("team@example.test", ["alice@example.test"])
    with pytest.raises(AccountError, match="already exists"):
        accounts.addUser("team@example.test", HASH)
    with pytest.raises(AccountError, match="domain"):
        accounts.addDomain("Example.TEST")


def test_aliasChecks(accounts):
    with pytest.raises(AccountError, match="is a user"):
        accounts.addAlias("alice@example.test", ["bob@example.test"])
    with pytest.raises(AccountError, match="cannot forward"):
        accounts.addAlias("fwd@example.test", ["someone@elsewhere.example"])
    with pytest.raises(AccountError, match="domain add"):
        accounts.addAlias("x@elsewhere.example", ["alice@example.test"])
    with pytest.raises(AccountError):
        accounts.addAlias("empty@example.test", [])
    assert accounts.aliases == {}


def test_removeDomainRefusedWhileInUse(accounts):
    with pytest.raises(AccountError, match="remove them first"):
        accounts.removeDomain("example.org")
    accounts.removeUser("carol@example.org")
    accounts.addAlias("info@example.org", ["alice@example.test"])
    with pytest.raises(AccountError, match="remove them first"):
        accounts.removeDomain("example.org")
    accounts.removeAlias("info@example.org")
    assert accounts.removeDomain("EXAMPLE.org") == "example.org"
    assert accounts.domains == {"example.test"}
    with pytest.raises(AccountError, match="domain list"):
        accounts.removeDomain("example.org")


def test_removeAndPasswd(accounts):
    accounts.setPassword("Bob@example.test", "new-hash")
    assert accounts.passwordHash("bob@example.test") == "new-hash"
    accounts.removeUser("bob@example.test")
    with pytest.raises(UnknownUser):
        accounts.route("bob@example.test")
    for f in (accounts.removeUser, accounts.removeAlias):
        with pytest.raises(AccountError, match="list"):
            f("nobody@example.test")
    with pytest.raises(AccountError):
        accounts.setPassword("nobody@example.test", "x")


# -- the file --------------------------------------------------------------------


def test_changesPersist(accounts, dataDir):
    with accounts.editing():
        accounts.addAlias("team@example.test", ["alice@example.test", "bob@example.test"])
    again = Accounts(dataDir)
    assert again.domains == {"example.test", "example.org"}
    assert sorted(again.users) == ["alice@example.test", "bob@example.test", "carol@example.org"]
    assert sorted(again.route("team@example.test")) == ["alice@example.test", "bob@example.test"]


def test_missingFileIsEmpty(tmp_path):
    a = Accounts(str(tmp_path / "not-yet"))
    assert a.domains == set() and a.users == {} and a.aliases == {}
    with pytest.raises(NotLocal):
        a.route("alice@example.test")


def test_foreignFileRefused(dataDir):
    with open(os.path.join(dataDir, "accounts.json"), "w") as f:
        json.dump({"domains": [], "users": {}, "aliases": {}}, f)
    with pytest.raises(AccountError, match="backup"):
        Accounts(dataDir)


def test_fileWrittenAtomicallyWithoutPlaintext(dataDir):
    password = "correct horse battery staple"
    a = Accounts(dataDir)
    for n in range(3):
        with a.editing():
            if n == 0:
                a.addDomain("example.test")
            a.addUser(f"user{n}@example.test", hashPassword(password))
    assert sorted(os.listdir(dataDir)) == ["accounts.json", "accounts.json.lock"]
    path = os.path.join(dataDir, "accounts.json")
    with open(path, "rb") as f:
        raw = f.read()
    assert password.encode() not in raw
    document = json.loads(raw)
    assert document["format"] == "twistmail-accounts"
    stored = document["users"]["user0@example.test"]["password"]
    assert stored.startswith("$argon2id$")
    assert verifyPassword(stored, password)
    assert not verifyPassword(stored, "wrong")
    # Hashes are secrets too: only the server's user may read the file.
    assert stat.S_IMODE(os.stat(path).st_mode) & 0o077 == 0


def test_failedEditWritesNothing(accounts, dataDir):
    path = os.path.join(dataDir, "accounts.json")
    with open(path, "rb") as f:
        before = f.read()
    with pytest.raises(AccountError), accounts.editing():
        accounts.addDomain("new.example")
        accounts.addUser("../evil@new.example", HASH)
    with open(path, "rb") as f:
        assert f.read() == before
    assert "new.example" not in Accounts(dataDir).domains


def test_runningServerPicksUpChangesAfterReloadInterval(accounts, dataDir):
    clock = FakeClock()
    server = Accounts(dataDir, reloadInterval=5, clock=clock)
    with pytest.raises(UnknownUser):
        server.route("dave@example.test")

    edit(dataDir, lambda a: a.addUser("dave@example.test", HASH))
    clock.now += 4  # within the interval: the server does not even stat() the file
    with pytest.raises(UnknownUser):
        server.route("dave@example.test")
    clock.now += 1
    assert server.route("dave@example.test") == ["dave@example.test"]

    edit(dataDir, lambda a: a.removeUser("dave@example.test"))
    clock.now += 5
    with pytest.raises(UnknownUser):
        server.route("dave@example.test")

    edit(dataDir, lambda a: a.addDomain("new.example"))
    clock.now += 5
    assert server.isLocalDomain("new.example")
    edit(dataDir, lambda a: a.setPassword("alice@example.test", "changed"))
    clock.now += 5
    assert server.passwordHash("alice@example.test") == "changed"


def test_sameSizeChangeIsPickedUp(accounts, dataDir):
    """A password change keeps the file size; it must still be noticed."""
    clock = FakeClock()
    server = Accounts(dataDir, reloadInterval=1, clock=clock)
    assert server.passwordHash("alice@example.test") == HASH
    replacement = HASH[:-1] + ("A" if HASH[-1] != "A" else "B")
    edit(dataDir, lambda a: a.setPassword("alice@example.test", replacement))
    clock.now += 1
    assert server.passwordHash("alice@example.test") == replacement


def test_hashParametersAndOlderHashesStillVerify():
    """New hashes use OWASP's argon2id parameters; a hash made with other parameters
    (argon2-cffi's default, an earlier twistmail) still verifies: each hash names its own."""
    from argon2 import PasswordHasher

    assert hashPassword("pw").startswith("$argon2id$v=19$m=19456,t=2,p=1$")
    older = PasswordHasher(time_cost=3, memory_cost=65536, parallelism=4).hash("pw")
    assert verifyPassword(older, "pw")
    assert not verifyPassword(older, "wrong")
    assert not verifyPassword(None, "pw")
    assert not verifyPassword("not a hash", "pw")
