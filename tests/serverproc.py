"""The real server as a subprocess (``twistd -n twistmail ...``), for e2e and packaging tests.

Readiness is a bounded poll: connect to each port until its greeting arrives
(SMTP ``220``, POP3 ``+OK``, IMAP ``* OK``); a server that exits early fails at once with its
log.  Stopping is SIGTERM, wait, and SIGKILL only if it does not exit in time.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import support

from twistmail.config import ALL_PROTOCOLS

#: twistd from the environment running the tests (``python -m twisted`` is ``twist``,
#: a different launcher without -n/--pidfile).
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")

START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0


def listenerArgs(smtpPort: int, pop3Port: int, imapPort: int | None = None) -> list[str]:
    """Every listener on a free loopback port (never the embedded defaults, which a
    developer's own server may be using)."""
    ports = {p: support.freePort() for p in ALL_PROTOCOLS}
    ports.update(smtp=smtpPort, pop3=pop3Port, imap=imapPort or ports["imap"])
    return [arg for p, port in ports.items() for arg in (f"--{p}", f"tcp:{port}:interface=127.0.0.1")]


def twistdCommand(*args: str, twistd: str = TWISTD) -> list[str]:
    if not os.path.exists(twistd):
        raise AssertionError(f"{twistd} does not exist: install Twisted into this environment "
                             "(pip install -e '.[test]')")
    return [twistd, "-n", "--pidfile=", "twistmail", *args]


def subprocessEnv() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def waitUntil(condition: Callable[[], object], timeout: float, what: str,
              interval: float = 0.05, describe: Callable[[], str] = lambda: "") -> object:
    """Poll C{condition} until it returns something true; fail after C{timeout} seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}\n{describe()}")
        time.sleep(interval)


def greeting(port: int, host: str = "127.0.0.1", timeout: float = 5.0) -> bytes | None:
    """The first line the server sends on C{port}, or None if nothing listens yet."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            data = b""
            while b"\n" not in data:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
            return data
    except ConnectionRefusedError:
        return None


@dataclass
class ServerProcess:
    """One twistd process; output (stdout and stderr) goes to C{logPath}."""

    argv: list[str]
    logPath: str
    cwd: str | None = None
    proc: subprocess.Popen | None = field(default=None, repr=False)

    def start(self) -> ServerProcess:
        with open(self.logPath, "ab") as log:
            self.proc = subprocess.Popen(self.argv, cwd=self.cwd, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT,
                                         env=subprocessEnv())
        return self

    @property
    def log(self) -> str:
        try:
            with open(self.logPath, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def describe(self) -> str:
        state = "running" if self.proc and self.proc.poll() is None else \
            f"exited with status {self.proc.returncode if self.proc else None}"
        return f"server {state}: {' '.join(self.argv)}\n--- server log ---\n{self.log}--- end ---"

    def waitReady(self, smtpPort: int | None, pop3Port: int | None, imapPort: int | None = None,
                  timeout: float = START_TIMEOUT) -> dict[str, bytes]:
        """Wait until every given port greets; return the greetings."""
        banners: dict[str, bytes] = {}
        for name, port, expected in (("smtp", smtpPort, b"220 "), ("pop3", pop3Port, b"+OK"),
                                     ("imap", imapPort, b"* OK ")):
            if port is None:
                continue

            def ready(port=port, name=name):
                if self.proc.poll() is not None:
                    raise AssertionError(f"the server exited before {name} port {port} was "
                                         f"ready\n{self.describe()}")
                return greeting(port)

            banner = waitUntil(ready, timeout, f"the {name} greeting on 127.0.0.1:{port}",
                               describe=self.describe)
            assert banner.startswith(expected), f"{name} greeting {banner!r}\n{self.describe()}"
            banners[name] = banner
        return banners

    def waitForLog(self, predicate: Callable[[str], object], what: str,
                   timeout: float = 10.0) -> object:
        return waitUntil(lambda: predicate(self.log), timeout, f"{what} in the server log",
                         describe=self.describe)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM, wait; SIGKILL (and fail) if it does not stop within C{timeout}."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout)
            raise AssertionError(f"the server ignored SIGTERM for {timeout:g}s and was killed"
                                 f"\n{self.describe()}") from None


def runTwistd(args: Sequence[str], cwd: str | None = None, timeout: float = 30,
              twistd: str = TWISTD) -> subprocess.CompletedProcess:
    """Run twistd to completion (for start-up failures); output merged into stdout.

    A server that starts instead of failing would run forever: after C{timeout}
    seconds it is killed and the test fails saying so.
    """
    argv = twistdCommand(*args, twistd=twistd)
    try:
        return subprocess.run(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=timeout,
                              env=subprocessEnv())
    except subprocess.TimeoutExpired as e:
        output = e.output.decode("utf-8", "replace") if isinstance(e.output, bytes) else e.output
        raise AssertionError(f"expected {' '.join(argv)} to exit at start-up, but it was still "
                             f"running after {timeout:g}s\n--- output ---\n{output}") from None
