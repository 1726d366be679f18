"""Test support: a reactor in a background thread, and servers built as makeService builds them.

Tests call into the reactor with ``onReactor(f, ...)`` (blockingCallFromThread)
and talk to listeners with real blocking clients (smtplib, poplib, sockets)
from the test thread, exactly as a mail client would.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest

from twistmail.testing import onReactor, startReactor  # noqa: F401 - re-exported for tests

_portsHandedOut: set[int] = set()


def _ephemeralLow() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _slice(low: int, high: int) -> tuple[int, int]:
    """This pytest-xdist worker's share of [low, high) (all of it without xdist)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # "gw0", "gw1", ...
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker.startswith("gw") or count <= 1:
        return low, high
    size = (high - low) // count
    start = low + int(worker[2:]) * size
    return start, start + size


def freePort() -> int:
    """A loopback TCP port nothing listens on, never handed out before in this run.

    Probing with bind(0) would return ports from the ephemeral range, where the
    tests' own client connections can take one before the server listens, and
    could return the same port twice.  So: ports below the ephemeral range,
    each handed out once; under pytest-xdist each worker has its own slice of
    that range, so two workers never hand out the same port."""
    low, high = _slice(10000, _ephemeralLow())
    for _ in range(1000):
        port = random.randrange(low, high)
        if port in _portsHandedOut:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _portsHandedOut.add(port)
        return port
    raise AssertionError("no free loopback port below the ephemeral range")


#: The storage backends the protocol and interop tests run on.
BACKENDS = ("maildir", "mbox", "postgresql")
#: The session's PostgreSQL (tests/pgproc.py), once a test on the postgresql backend asked.
_postgres = None


@pytest.fixture(params=BACKENDS, name="backend")
def everyBackend(request) -> str:
    """Imported by a test module, this overrides conftest's ``backend``: every test
    there runs on each storage backend (conftest's ``server`` uses it)."""
    global _postgres
    if request.param == "postgresql":
        _postgres = request.getfixturevalue("postgres")
    return request.param


def postgresOptions(dataDir: str) -> dict:
    """``[storage.postgresql]`` for a server on C{dataDir}: a schema of its own, upgraded
    (a server restarted on the same data directory finds its mail again)."""
    from twistmail.storage.postgresql import schema

    if _postgres is None:
        raise AssertionError("the postgresql backend needs the postgres fixture (everyBackend)")
    dsn = _postgres.dsn(dataDir)
    schema.upgrade(dsn)
    return {"dsn": dsn}


@dataclass
class RunningServer:
    dataDir: str
    ports: dict  # protocol -> port, every listener (smtp, submission, submissions, ...)
    service: object
    accounts: object
    store: object
    backend: str = "maildir"
    host: str = "127.0.0.1"  # the address every listener is bound to

    @property
    def smtpPort(self) -> int:
        return self.ports["smtp"]

    @property
    def pop3Port(self) -> int:
        return self.ports["pop3"]

    @property
    def imapPort(self) -> int:
        return self.ports["imap"]

    def stop(self) -> None:
        onReactor(self.service.stopService)


def startServer(dataDir: str, backendOptions: dict | None = None, host: str = "127.0.0.1",
                configFile: str | None = None, **sections) -> RunningServer:
    """Build the real service tree (tap.makeService) on free loopback ports and start it.

    @param backendOptions: ``{backend: {option: value}}``, as ``[storage.<backend>]`` tables.
    @param configFile: a TOML file read first, as ``--config`` reads it (the data
        directory, host name and listeners still come from here).
    @param host: the loopback address to listen on.  Clients connect from 127.0.0.1,
        so on another address (127.0.0.2) they are not the listener's own host and
        count as remote (no passwords without TLS).
    """
    import dataclasses
    from types import MappingProxyType

    from twistmail import config as configmod
    from twistmail import tap

    ports = {protocol: freePort() for protocol in configmod.ALL_PROTOCOLS}
    overrides = {"server": {"data_dir": dataDir, "hostname": "mx.example.test"},
                 "listen": {p: [f"tcp:{port}:interface={host}"] for p, port in ports.items()},
                 # Failed logins are answered after a delay; tests that are not about it
                 # should not wait for it.
                 "auth": {"failure_delay": 0.01}}
    for section, values in sections.items():
        overrides.setdefault(section, {}).update(values)
    if sections.get("storage", {}).get("backend") == "postgresql" and not backendOptions:
        backendOptions = {"postgresql": postgresOptions(dataDir)}
    options = tap.Options()
    options.config = configmod.load(configFile, overrides)
    if backendOptions:
        options.config = dataclasses.replace(options.config, backendOptions=MappingProxyType(
            {name: MappingProxyType(table) for name, table in backendOptions.items()}))

    def build():
        svc = tap.makeService(options)
        try:
            svc.privilegedStartService()
            svc.startService()
        except SystemExit as e:
            # twistd's start-up error; as a plain exception so pytest reports it as this
            # test's failure (a SystemExit from a fixture derails the fixtures of later tests).
            svc.stopService()
            raise AssertionError(str(e)) from None
        return svc

    svc = onReactor(build)
    ports["smtp"] = int(options.config.listeners("smtp")[0].split(":")[1])
    smtpFactory = svc.getServiceNamed(f"smtp {options.config.listeners('smtp')[0]}").factory
    return RunningServer(dataDir, ports, svc, smtpFactory.accounts,
                         smtpFactory.delivery.local._store, options.config["storage"]["backend"], host)


def cli(*args: str, dataDir: str, stdin: str = "", check: bool = True) -> subprocess.CompletedProcess:
    """Run the real admin CLI in a subprocess."""
    proc = subprocess.run([sys.executable, "-m", "twistmail", "--data-dir", dataDir, *args],
                          input=stdin, capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"twistmail {' '.join(args)} failed: {proc.stderr}")
    return proc


def addUser(dataDir: str, address: str, password: str = "secret") -> None:
    """Create the domain (if needed) and user through the Accounts API (fast path for tests).

    The hash is argon2id with the cheapest parameters (each hash records its own,
    so the server verifies it as it would any other): hundreds of logins in the
    suite then cost microseconds, not 40 ms of CPU each.  The production
    parameters are tested in tests/test_accounts.py."""
    from argon2 import PasswordHasher

    from twistmail.auth.accounts import Accounts

    hashPassword = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1).hash

    accounts = Accounts(dataDir)
    with accounts.editing():
        domain = address.split("@")[1]
        if domain not in accounts.domains:
            accounts.addDomain(domain)
        accounts.addUser(address, hashPassword(password))


def accountDir(dataDir: str, address: str, backend: str = "maildir") -> str:
    local, domain = address.split("@")
    return os.path.join(dataDir, "mail" if backend == "maildir" else backend, domain, local)


def storedMessages(dataDir: str, address: str, backend: str = "maildir") -> list[bytes]:
    """The messages in the account's INBOX as another program reading the files sees them
    (for postgresql: another node reading the database)."""
    if backend == "postgresql":
        return _otherNode(dataDir, lambda store: store.account(address).openFolder("INBOX")
                          .addCallback(lambda box: box.readMessages(box.uids())))
    root = accountDir(dataDir, address, backend)
    if backend == "maildir":
        out = []
        for sub in ("new", "cur"):
            for name in maildirFiles(dataDir, address, sub):
                with open(os.path.join(root, sub, name), "rb") as f:
                    out.append(f.read())
        return out
    from twistmail.storage import _mboxformat

    try:
        with open(os.path.join(root, "INBOX"), "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return []
    return [_mboxformat.unquote(data[m.contentAt:m.skipFrom] + _mboxformat.JOINTS[m.joint]
                                + data[m.skipTo:m.end])
            for m in _mboxformat.parse(data, 0, len(data), 0)]


def _otherNode(dataDir: str, action):
    """Run C{action(store)} on the reactor with a second PostgresStore on the server's
    database, as another node would; close it after."""
    from twistmail.storage.postgresql import PostgresStore

    store = PostgresStore(postgresOptions(dataDir)["dsn"])
    try:
        return onReactor(action, store)
    finally:
        store.close()


def externalDelivery(dataDir: str, address: str, data: bytes, backend: str = "maildir") -> None:
    """Put a message into INBOX as another program does: an MDA writing a Maildir
    (tmp/, then new/), one appending to an mbox with fcntl and dot-lock (Python's mailbox),
    or, for postgresql, another twistmail node on the same database."""
    if backend == "postgresql":
        from twistmail.delivery.spool import MessageSource

        _otherNode(dataDir, lambda store: store.deliver(address, "INBOX",
                                                        MessageSource.fromBytes(data)))
        return
    root = accountDir(dataDir, address, backend)
    if backend == "maildir":
        name = f"{time.time():.6f}.P{os.getpid()}.otherprogram"
        with open(os.path.join(root, "tmp", name), "wb") as f:
            f.write(data)
        os.rename(os.path.join(root, "tmp", name), os.path.join(root, "new", name))
        return
    import mailbox

    box = mailbox.mbox(os.path.join(root, "INBOX"), create=False)
    box.lock()
    try:
        box.add(data)  # bytes are written as they are (a Message would be re-encoded)
        box.flush()
    finally:
        box.unlock()
        box.close()


def maildirFiles(dataDir: str, address: str, sub: str = "new") -> list[str]:
    local, domain = address.split("@")
    path = os.path.join(dataDir, "mail", domain, local, sub)
    try:
        return sorted(os.listdir(path))
    except FileNotFoundError:
        return []


def readAll(sock: socket.socket, until: bytes, timeout: float = 10) -> bytes:
    """Read from a raw socket until C{until} appears (or fail after C{timeout})."""
    sock.settimeout(timeout)
    data = b""
    deadline = time.monotonic() + timeout
    while until not in data:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {until!r}; got {data!r}")
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data
