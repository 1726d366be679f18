"""Accounts in PostgreSQL ([accounts] backend = "postgresql"), end to end: the real CLI,
real ``twistd -n twistmail`` nodes sharing one database (tests/pgproc.py), stdlib clients.

Nothing sleeps to synchronise: every wait is a poll with a deadline (serverproc.waitUntil).
"""

from __future__ import annotations

import base64
import imaplib
import os
import poplib
import smtplib
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from serverproc import ServerProcess, listenerArgs, twistdCommand, waitUntil
from support import cli, freePort, startServer

from twistmail.auth.accounts import Accounts
from twistmail.auth.checkers import PasswordChecker, fromClient
from twistmail.auth.passwords import hashPassword, verifyPassword
from twistmail.auth.pgaccounts import PostgresAccounts
from twistmail.auth.throttle import AuthThrottle
from twistmail.errors import AccountsUnavailable
from twistmail.storage.postgresql import schema

pytestmark = pytest.mark.e2e

ALICE = "alice@example.test"


def writeConfig(tmp_path, dsn: str, backend: str = "postgresql", name: str = "twistmail.toml"):
    path = tmp_path / name
    path.write_text(f'[accounts]\nbackend = "{backend}"\ndsn = "{dsn}"\n'
                    # Failed logins are answered after failure_delay: 1 s, so that a failure
                    # the throttle counted would show in the timings below.
                    "[auth]\nfailure_delay = 1\n")
    return str(path)


@pytest.fixture
def dsn(postgres, tmp_path):
    dsn = postgres.dsn(str(tmp_path))
    schema.upgrade(dsn)
    return dsn


class Node:
    """One ``twistd -n twistmail`` with its own data directory, sharing the accounts."""

    def __init__(self, tmp_path, config: str, name: str) -> None:
        self.dataDir = tmp_path / name
        self.dataDir.mkdir(exist_ok=True)
        self.smtpPort, self.pop3Port, self.imapPort = freePort(), freePort(), freePort()
        listeners = listenerArgs(self.smtpPort, self.pop3Port, self.imapPort)
        # AUTH is offered on submission (the MX port takes no passwords).
        self.submissionPort = int(listeners[listeners.index("--submission") + 1].split(":")[1])
        self.process = ServerProcess(
            twistdCommand("--config", config, "--data-dir", str(self.dataDir),
                          "--hostname", "mx.example.test", *listeners),
            logPath=str(tmp_path / f"{name}.log"), cwd=str(tmp_path)).start()
        try:
            self.process.waitReady(self.smtpPort, self.pop3Port, self.imapPort)
        except BaseException:
            self.process.stop()
            raise

    def imap(self, address: str, password: str) -> imaplib.IMAP4:
        client = imaplib.IMAP4("127.0.0.1", self.imapPort, timeout=30)
        try:
            client.login(address, password)
        except BaseException:
            client.shutdown()
            raise
        return client

    def imapLogin(self, address: str, password: str) -> str:
        """'ok', or the NO text."""
        try:
            self.imap(address, password).logout()
        except imaplib.IMAP4.error as e:
            text = e.args[0]
            return text.decode() if isinstance(text, bytes) else str(text)
        return "ok"

    def pop3Login(self, address: str, password: str) -> str:
        client = poplib.POP3("127.0.0.1", self.pop3Port, timeout=30)
        try:
            client.user(address)
            client.pass_(password)
            return "ok"
        except poplib.error_proto as e:
            return e.args[0].decode()
        finally:
            client.quit()

    def smtpAuth(self, address: str, password: str) -> str:
        with smtplib.SMTP("127.0.0.1", self.submissionPort, timeout=30) as client:
            client.ehlo("client.example")
            token = base64.b64encode(f"\0{address}\0{password}".encode()).decode()
            code, text = client.docmd("AUTH", "PLAIN " + token)
            return f"{code} {text.decode()}"

    def rcpt(self, address: str) -> str:
        with smtplib.SMTP("127.0.0.1", self.smtpPort, timeout=30) as client:
            client.ehlo("client.example")
            client.mail("x@remote.test")
            code, text = client.rcpt(address)
            return f"{code} {text.decode()}"

    def assertNoTraceback(self) -> None:
        assert "Traceback" not in self.process.log, self.process.describe()


def ready(node: Node) -> bool:
    """The node has read the accounts: an unknown user is a permanent 550, not a 451."""
    return node.rcpt("nobody@example.test").startswith("550 ")


def test_a_cli_change_is_seen_by_every_node_within_a_second(tmp_path, dsn):
    config = writeConfig(tmp_path, dsn)
    cli("--config", config, "domain", "add", "example.test", dataDir=str(tmp_path))
    nodes = [Node(tmp_path, config, "one"), Node(tmp_path, config, "two")]
    try:
        for node in nodes:
            waitUntil(lambda node=node: ready(node), 10, "the node to read the accounts",
                      describe=node.process.describe)
        assert nodes[0].imapLogin(ALICE, "first-pw").startswith("[AUTHENTICATIONFAILED]")

        cli("--config", config, "user", "add", ALICE, dataDir=str(tmp_path), stdin="first-pw\n")
        added = time.monotonic()
        for node in nodes:  # no restart, no reload interval: the NOTIFY brings it
            waitUntil(lambda node=node: node.rcpt(ALICE).startswith("250 "), 1.0,
                      "the new user to be known", describe=node.process.describe)
        assert time.monotonic() - added < 1.0
        # (A login is slower to measure: an argon2id hash, and the throttle's delay
        # after the failure above.)
        assert all(node.imapLogin(ALICE, "first-pw") == "ok" for node in nodes)
        assert all(node.smtpAuth(ALICE, "first-pw").startswith("235 ") for node in nodes)

        # Several sessions of one account at once, on both nodes.
        with ThreadPoolExecutor(6) as pool:
            sessions = list(pool.map(lambda n: nodes[n % 2].imap(ALICE, "first-pw"), range(6)))
        for client in sessions:
            assert client.select("INBOX")[0] == "OK"
            assert client.noop()[0] == "OK"
        for client in sessions:
            client.logout()

        cli("--config", config, "user", "passwd", ALICE, dataDir=str(tmp_path),
            stdin="second-pw\n")
        for node in nodes:
            waitUntil(lambda node=node: node.imapLogin(ALICE, "second-pw") == "ok", 5.0,
                      "the new password", describe=node.process.describe)
            assert node.pop3Login(ALICE, "first-pw").startswith("-ERR [AUTH]")

        cli("--config", config, "alias", "add", "team@example.test", ALICE, dataDir=str(tmp_path))
        cli("--config", config, "user", "quota", ALICE, "10M", dataDir=str(tmp_path))
        cli("--config", config, "user", "remove", ALICE, dataDir=str(tmp_path))
        for node in nodes:
            waitUntil(lambda node=node: node.rcpt(ALICE).startswith("550 "), 1.0,
                      "the removed user to be unknown", describe=node.process.describe)
        for node in nodes:
            node.assertNoTraceback()
    finally:
        for node in nodes:
            node.process.stop()


def test_migrated_accounts_keep_their_passwords_and_outages_are_temporary(
        tmp_path, dsn, postgres):
    fileConfig = writeConfig(tmp_path, dsn, backend="file", name="file.toml")
    dataDir = tmp_path / "one"
    dataDir.mkdir()
    cli("--config", fileConfig, "domain", "add", "example.test", dataDir=str(dataDir))
    cli("--config", fileConfig, "user", "add", ALICE, dataDir=str(dataDir), stdin="old-pw\n")
    cli("--config", fileConfig, "alias", "add", "team@example.test", ALICE, dataDir=str(dataDir))
    fileHash = Accounts(str(dataDir)).passwordHash(ALICE)

    out = cli("--config", fileConfig, "migrate-accounts", "--to", "postgresql",
              dataDir=str(dataDir)).stdout
    assert "1 user(s)" in out and 'backend = "postgresql"' in out
    assert PostgresAccounts(dsn).passwordHash(ALICE) == fileHash
    again = cli("--config", fileConfig, "migrate-accounts", "--to", "postgresql",
                dataDir=str(dataDir))  # the same entries again: nothing differs
    assert again.returncode == 0

    node = Node(tmp_path, writeConfig(tmp_path, dsn), "one")  # the same data directory
    try:
        waitUntil(lambda: node.imapLogin(ALICE, "old-pw") == "ok", 10,
                  "the migrated password to work", describe=node.process.describe)
        assert node.rcpt("team@example.test").startswith("250 ")
        held = node.imap(ALICE, "old-pw")
        assert held.select("INBOX")[0] == "OK"

        postgres.pause()
        try:
            waitUntil(lambda: node.smtpAuth(ALICE, "old-pw").startswith("454 4.7.0"), 10,
                      "AUTH to fail temporarily", describe=node.process.describe)
            assert node.rcpt(ALICE).startswith("451 4.3.0"), node.rcpt(ALICE)
            assert node.pop3Login(ALICE, "old-pw").startswith("-ERR [SYS/TEMP]")
            # Not failed logins: with failure_delay = 1 s a counted failure would make
            # each attempt wait 1, 2, 4, 8 ... seconds; these are answered at once.
            started = time.monotonic()
            for _ in range(6):
                assert node.imapLogin(ALICE, "old-pw").startswith("[UNAVAILABLE]")
            assert time.monotonic() - started < 5, "outage answers were delayed as failures"
            assert held.noop()[0] == "OK"  # a session logged in goes on
        finally:
            postgres.resume()
        waitUntil(lambda: node.imapLogin(ALICE, "old-pw") == "ok", 15,
                  "the node to recover by itself", describe=node.process.describe)
        assert node.rcpt(ALICE).startswith("250 ")
        started = time.monotonic()
        assert node.smtpAuth(ALICE, "old-pw").startswith("235 ")
        assert node.imapLogin(ALICE, "wrong").startswith("[AUTHENTICATIONFAILED]")
        assert time.monotonic() - started < 3  # one real failure: one delay, no block
        held.logout()
        node.assertNoTraceback()
    finally:
        node.process.stop()


def test_an_outage_is_not_a_failed_login_for_the_throttle(dsn):
    """The checker answers AccountsUnavailable and the throttle counts nothing."""
    from twisted.cred.credentials import UsernamePassword
    from twisted.internet import defer

    accounts = PostgresAccounts(dsn, follow=True)  # not started: nothing read yet
    throttle = AuthThrottle(1.0, 15.0, 2, 600.0, 600.0)
    checker = PasswordChecker(accounts, lambda f, *a: defer.maybeDeferred(f, *a), throttle)
    for _ in range(5):
        d = checker.requestAvatarId(fromClient(UsernamePassword(b"alice@example.test", b"pw"),
                                               "192.0.2.1", "imap"))
        failures = []
        d.addErrback(failures.append)
        assert failures and failures[0].check(AccountsUnavailable)
    assert throttle.before("192.0.2.1") == (False, 0.0)


def test_migrate_refuses_a_conflicting_entry(tmp_path, dsn, dataDir):
    config = writeConfig(tmp_path, dsn, backend="file")
    files = Accounts(dataDir)
    with files.editing():
        files.addDomain("example.test")
        files.addUser(ALICE, hashPassword("file-pw"))
    database = PostgresAccounts(dsn)
    with database.editing():
        database.addDomain("example.test")
        database.addUser(ALICE, hashPassword("db-pw"))
    proc = cli("--config", config, "migrate-accounts", "--to", "postgresql", dataDir=dataDir,
               check=False)
    assert proc.returncode != 0
    assert f"user {ALICE}" in proc.stderr and "nothing was copied" in proc.stderr
    assert verifyPassword(PostgresAccounts(dsn).passwordHash(ALICE), "db-pw")


def test_cli_on_postgresql_and_check_config_hides_the_password(tmp_path, dsn, dataDir):
    config = writeConfig(tmp_path, dsn + " password=hunter2")
    cli("--config", config, "domain", "add", "example.test", dataDir=dataDir)
    cli("--config", config, "user", "add", ALICE, dataDir=dataDir, stdin="pw\n")
    listed = cli("--config", config, "user", "list", dataDir=dataDir).stdout
    assert ALICE in listed
    assert not (tmp_path / "data" / "accounts.json").exists()
    shown = cli("--config", config, "check-config", dataDir=dataDir).stdout
    assert "hunter2" not in shown and "accounts.dsn" in shown and "xxxxx" in shown
    twice = cli("--config", config, "user", "add", ALICE, dataDir=dataDir, stdin="pw\n",
                check=False)
    assert twice.returncode != 0 and "already exists" in twice.stderr


def test_unreachable_or_unupgraded_database_is_a_cli_error(tmp_path, postgres, dataDir):
    fresh = writeConfig(tmp_path, postgres.dsn(str(tmp_path) + "/fresh"), name="fresh.toml")
    proc = cli("--config", fresh, "domain", "list", dataDir=dataDir, check=False)
    assert proc.returncode != 0 and "twistmail db upgrade" in proc.stderr
    upgraded = cli("--config", fresh, "db", "upgrade", dataDir=dataDir).stdout
    assert f"-> {schema.LATEST}" in upgraded
    assert cli("--config", fresh, "domain", "list", dataDir=dataDir).returncode == 0
    away = writeConfig(tmp_path, f"host={tmp_path} dbname=nothing user=postgres",
                       name="away.toml")
    proc = cli("--config", away, "domain", "list", dataDir=dataDir, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "cannot reach the accounts database" in proc.stderr


def test_postgresql_backend_needs_a_dsn(tmp_path, dataDir):
    path = tmp_path / "bad.toml"
    path.write_text('[accounts]\nbackend = "postgresql"\n')
    proc = cli("--config", str(path), "domain", "list", dataDir=dataDir, check=False)
    assert proc.returncode != 0
    assert "[accounts] dsn" in proc.stderr and "Fix:" in proc.stderr


def test_web_admin_edits_the_tables_and_shows_the_change_at_once(dsn, dataDir, postgres):
    from test_webadmin import Browser

    admin = "postmaster@example.test"
    accounts = PostgresAccounts(dsn)
    with accounts.editing():
        accounts.addDomain("example.test")
        accounts.addUser(admin, hashPassword("adminpw"))
    port = freePort()
    srv = startServer(dataDir, listen={"http": [f"tcp:{port}:interface=127.0.0.1"]},
                      admin={"enabled": True, "admins": [admin]},
                      accounts={"backend": "postgresql", "dsn": dsn})
    try:
        browser = Browser(port)
        waitUntil(lambda: browser.login(admin, "adminpw")[0] == 303, 10, "the admin login")
        _, _, page = browser.request("GET", "/admin/")
        status, _, page = browser.request("POST", "/admin/user/add", {
            "csrf": browser.token(page), "address": "bob@example.test", "password": "bobpw"})
        assert status == 200 and "user bob@example.test added" in page
        assert "bob@example.test</" in page  # the dashboard after the change lists bob
        assert "bob@example.test" in PostgresAccounts(dsn).users
        assert not os.path.exists(os.path.join(dataDir, "accounts.json"))

        postgres.pause()
        try:
            waitUntil(lambda: browser.request("GET", "/admin/")[0] == 503, 10,
                      "the admin pages to answer 503")
            assert Browser(port).login(admin, "adminpw")[0] == 503
        finally:
            postgres.resume()
        waitUntil(lambda: browser.request("GET", "/admin/")[0] == 200, 15, "the admin pages back")
    finally:
        srv.stop()
