"""Test support: a reactor in a background thread, and servers built as makeService builds them.

Tests call into the reactor with ``onReactor(f, ...)`` (blockingCallFromThread)
and talk to listeners with real blocking clients (smtplib, poplib, sockets)
from the test thread, exactly as a mail client would.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from twisted.internet import reactor, threads

_started = threading.Event()


def startReactor() -> None:
    if _started.is_set():
        return
    thread = threading.Thread(
        target=reactor.run, kwargs={"installSignalHandlers": False}, daemon=True, name="reactor")
    reactor.callWhenRunning(_started.set)
    thread.start()
    if not _started.wait(10):
        raise RuntimeError("reactor did not start")


def onReactor(f, *args, **kwargs):
    """Run f on the reactor thread and wait for its (possibly Deferred) result."""
    startReactor()
    return threads.blockingCallFromThread(reactor, f, *args, **kwargs)


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningServer:
    dataDir: str
    ports: dict  # protocol -> port, every listener (smtp, submission, submissions, ...)
    service: object
    accounts: object
    store: object

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


def startServer(dataDir: str, **sections) -> RunningServer:
    """Build the real service tree (tap.makeService) on free loopback ports and start it."""
    from twistmail import config as configmod
    from twistmail import tap

    ports = {protocol: freePort() for protocol in configmod.ALL_PROTOCOLS}
    overrides = {"server": {"data_dir": dataDir, "hostname": "mx.example.test"},
                 "listen": {p: [f"tcp:{port}:interface=127.0.0.1"] for p, port in ports.items()},
                 # Failed logins are answered after a delay; tests that are not about it
                 # should not wait for it.
                 "auth": {"failure_delay": 0.01}}
    for section, values in sections.items():
        overrides.setdefault(section, {}).update(values)
    options = tap.Options()
    options.config = configmod.load(None, overrides)

    def build():
        svc = tap.makeService(options)
        svc.privilegedStartService()
        svc.startService()
        return svc

    svc = onReactor(build)
    smtpFactory = svc.getServiceNamed(f"smtp tcp:{ports['smtp']}:interface=127.0.0.1").factory
    return RunningServer(dataDir, ports, svc, smtpFactory.accounts,
                         smtpFactory.delivery.local._store)


def cli(*args: str, dataDir: str, stdin: str = "", check: bool = True) -> subprocess.CompletedProcess:
    """Run the real admin CLI in a subprocess."""
    proc = subprocess.run([sys.executable, "-m", "twistmail", "--data-dir", dataDir, *args],
                          input=stdin, capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"twistmail {' '.join(args)} failed: {proc.stderr}")
    return proc


def addUser(dataDir: str, address: str, password: str = "secret") -> None:
    """Create the domain (if needed) and user through the Accounts API (fast path for tests)."""
    from twistmail.auth.accounts import Accounts
    from twistmail.auth.passwords import hashPassword

    accounts = Accounts(dataDir)
    with accounts.editing():
        domain = address.split("@")[1]
        if domain not in accounts.domains:
            accounts.addDomain(domain)
        accounts.addUser(address, hashPassword(password))


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
