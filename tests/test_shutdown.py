"""Stopping the real ``twistd -n twistmail``: a second SIGTERM or SIGINT during shutdown
(an impatient operator, systemd's stop and then a kill) is noted, not a critical traceback.

Twisted's reactor answers every SIGTERM and SIGINT with ``reactor.stop()``, and a
second call raises ``ReactorNotRunning`` (twisted/twisted#2265, open since 2006),
which the reactor logged as an unhandled error at critical level.
"""

from __future__ import annotations

import signal
import smtplib
import socket

import pytest
from serverproc import ServerProcess, twistdCommand
from support import freePort

pytestmark = pytest.mark.e2e

#: Signals that stop twistd; it re-raises the first one so its parent sees why it
#: ended (CLEAN_EXIT in test_e2e).
CLEAN_EXIT = (0, -signal.SIGTERM, -signal.SIGINT)
BAD = ("Traceback", "ReactorNotRunning", "critical", "CRITICAL", "Unhandled")


@pytest.fixture
def stalledServer(tmp_path):
    """twistd whose stop takes seconds: a relay delivery is under way to a smarthost that
    takes the connection and never greets, and the queue runner's stop waits for it."""
    from twistmail.config import ALL_PROTOCOLS

    smarthost = socket.create_server(("127.0.0.1", 0))
    config = tmp_path / "twistmail.toml"
    config.write_text(f'[relay]\nsmarthost = "127.0.0.1:{smarthost.getsockname()[1]}"\n'
                      'smarthost_tls = "opportunistic"\ntrusted_networks = ["127.0.0.0/8"]\n')
    ports = {p: freePort() for p in ALL_PROTOCOLS}
    listeners = [a for p, port in ports.items() for a in (f"--{p}", f"tcp:{port}:interface=127.0.0.1")]
    process = ServerProcess(
        twistdCommand("--config", str(config), "--data-dir", str(tmp_path / "data"),
                      "--hostname", "mx.example.test", *listeners),
        logPath=str(tmp_path / "server.log"), cwd=str(tmp_path)).start()
    try:
        process.waitReady(ports["smtp"], ports["pop3"], ports["imap"])
        with smtplib.SMTP("127.0.0.1", ports["smtp"], timeout=10) as client:
            client.sendmail("a@example.test", ["b@remote.test"], b"Subject: x\r\n\r\nx\r\n")
        smarthost.settimeout(30)
        connection, _ = smarthost.accept()  # the delivery is under way
        with connection, smarthost:
            yield process
    finally:
        process.stop()
        print(process.describe())


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT])
def test_a_second_signal_during_shutdown_is_no_traceback(stalledServer, second):
    process = stalledServer
    process.proc.send_signal(signal.SIGTERM)
    process.waitForLog(lambda log: "Received SIGTERM, shutting down." in log, "the first SIGTERM")
    process.proc.send_signal(second)
    status = process.proc.wait(30)
    log = process.log
    assert status in CLEAN_EXIT, process.describe()
    assert f"Received {second.name} while already stopping; ignored" in log, process.describe()
    assert "Server Shut Down." in log
    for bad in BAD:
        assert bad not in log, process.describe()


def test_two_signals_at_once_are_no_traceback(stalledServer):
    """Both pending before the reactor handles either (the kernel hands over SIGINT first)."""
    process = stalledServer
    process.proc.send_signal(signal.SIGTERM)
    process.proc.send_signal(signal.SIGINT)
    status = process.proc.wait(30)
    assert status in CLEAN_EXIT, process.describe()
    for bad in BAD:
        assert bad not in process.log, process.describe()
