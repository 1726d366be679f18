"""The real twistd: a self-signed certificate on first start, and SIGHUP reloading [tls]."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl

import pytest
from serverproc import ServerProcess, listenerArgs, twistdCommand
from support import freePort

from twistmail.tls import generateSelfSigned

pytestmark = pytest.mark.e2e


def insecure() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def subjectOf(tls: ssl.SSLSocket) -> str:
    from cryptography import x509

    return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True)).subject.rfc4514_string()


def connect(port: int) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    tls = insecure().wrap_socket(raw, server_hostname="mx.example.test")
    assert tls.recv(4096).startswith(b"* OK")
    return tls


def start(tmp_path, *extra: str) -> tuple[ServerProcess, int]:
    smtp, pop3, imap = freePort(), freePort(), freePort()
    args = listenerArgs(smtp, pop3, imap)
    imaps = int(args[args.index("--imaps") + 1].split(":")[1])
    process = ServerProcess(twistdCommand(*extra, *args), logPath=str(tmp_path / "server.log"),
                            cwd=str(tmp_path)).start()
    process.waitReady(smtp, pop3, imap)
    return process, imaps


def test_self_signed_certificate_on_first_start_is_logged(tmp_path):
    process, imaps = start(tmp_path, "--data-dir", str(tmp_path / "data"), "--hostname",
                           "mx.example.test")
    try:
        process.waitForLog(lambda log: "generated a self-signed certificate for mx.example.test"
                           in log, "the self-signed certificate warning")
        with connect(imaps) as tls:
            assert subjectOf(tls) == "CN=mx.example.test"
    finally:
        process.stop()
    # A restart reuses it instead of making another.
    first = (tmp_path / "data" / "tls" / "selfsigned.crt").read_bytes()
    process, _ = start(tmp_path, "--data-dir", str(tmp_path / "data"), "--hostname",
                       "mx.example.test")
    process.stop()
    assert (tmp_path / "data" / "tls" / "selfsigned.crt").read_bytes() == first


def test_sighup_reloads_the_certificate_without_dropping_connections(tmp_path):
    for name in ("one", "two"):
        generateSelfSigned(f"{name}.example.test", str(tmp_path / f"{name}.crt"),
                           str(tmp_path / f"{name}.key"))
    shutil.copy(tmp_path / "one.crt", tmp_path / "current.crt")
    shutil.copy(tmp_path / "one.key", tmp_path / "current.key")
    config = tmp_path / "twistmail.toml"
    config.write_text('[server]\ndata_dir = "data"\nhostname = "mx.example.test"\n'
                      '[tls]\ncertificate = "current.crt"\nkey = "current.key"\n')
    process, imaps = start(tmp_path, "--config", str(config))
    try:
        before = connect(imaps)
        assert subjectOf(before) == "CN=one.example.test"
        shutil.copy(tmp_path / "two.crt", tmp_path / "current.crt")
        shutil.copy(tmp_path / "two.key", tmp_path / "current.key")
        process.proc.send_signal(signal.SIGHUP)
        process.waitForLog(lambda log: "certificate reloaded" in log, "the reload")
        with connect(imaps) as after:
            assert subjectOf(after) == "CN=two.example.test"
        before.sendall(b"a NOOP\r\n")  # the old connection is still up, on the old certificate
        assert before.recv(4096).startswith(b"a OK")
        before.close()
        # A broken file is refused and the current certificate stays in service.
        (tmp_path / "current.crt").write_text("not a certificate\n")
        process.proc.send_signal(signal.SIGHUP)
        process.waitForLog(lambda log: "reload failed, keeping the current certificate" in log,
                           "the failed reload")
        with connect(imaps) as still:
            assert subjectOf(still) == "CN=two.example.test"
        assert process.proc.poll() is None
    finally:
        process.stop()
    assert "Traceback" not in process.log


def test_bad_certificate_stops_twistd_with_the_key_and_fix(tmp_path):
    from serverproc import runTwistd

    config = tmp_path / "twistmail.toml"
    config.write_text('[server]\ndata_dir = "data"\n[tls]\ncertificate = "nope.crt"\n'
                      'key = "nope.key"\n')
    result = runTwistd(["--config", str(config), *listenerArgs(freePort(), freePort())],
                       cwd=str(tmp_path))
    assert result.returncode != 0
    last = result.stdout.strip().splitlines()[-1]
    assert f"{config}: [tls]:" in last and "nope.crt" in last and "Fix:" in last
    assert "Traceback" not in result.stdout
    assert not os.path.exists(tmp_path / "data" / "tls")
