"""ACME against a real CA: Debian's pebble, started here on loopback.

The server (the tree makeService builds) orders its certificate with HTTP-01
on its own [listen] http listener, serves it on every TLS listener without
dropping connections, keeps the old one while the CA is down, and renews.
"""

from __future__ import annotations

import http.client
import imaplib
import os
import signal
import smtplib
import socket
import ssl
import stat
import time

import pytest
from certs import makeCerts
from dnsserver import A, startDNS
from pebble import Pebble
from serverproc import waitUntil
from support import addUser, freePort, startServer
from test_acme import makeCertificate
from test_tls import insecure
from twisted.logger import formatEvent, globalLogPublisher

HOST = "mx.example.test"  # startServer's host name
#: What DNS says: every test name is this host; autodiscover.example.test has no record.
ZONE = {name: [A("127.0.0.1")] for name in (HOST, "mta-sts.example.test",
                                            "autoconfig.example.test")}


@pytest.fixture
def dns():
    server = startDNS(ZONE)
    yield server
    server.stop()


@pytest.fixture
def pebble(tmp_path, dns):
    directory = tmp_path / "pebble"
    directory.mkdir()
    ca = Pebble(str(directory), dns.nameserver, httpPort=freePort())
    yield ca
    ca.stop()


@pytest.fixture
def logged():
    events: list[str] = []

    def observe(event) -> None:
        text = formatEvent(event)
        if "acme" in text:
            events.append(text)

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


def serve(dataDir: str, ca: Pebble, **tls):
    """The server of a host with one domain, example.test, ordering from C{ca}."""
    if not os.path.exists(os.path.join(dataDir, "accounts.json")):
        addUser(dataDir, "alice@example.test")
    server = startServer(
        dataDir, listen={"http": [f"tcp:{ca.httpPort}:interface=127.0.0.1"],
                         "https": [f"tcp:{freePort()}:interface=127.0.0.1"]},
        mta_sts={"mode": "enforce", "mx": [HOST]},
        tls={"acme": True, "acme_directory": ca.directoryURL, "acme_ca_file": ca.caFile,
             "acme_email": "postmaster@example.test", "acme_retry_min": 1, **tls})
    server.http = ca.httpPort
    return server


def trusting(ca: Pebble) -> ssl.SSLContext:
    """A client that accepts only certificates chained to pebble's root, for HOST."""
    return ssl.create_default_context(cadata=ca.root().decode("ascii"))


class AsHost:
    """smtplib and imaplib name the host they connected to (127.0.0.1) for the check:
    this context checks for HOST instead, as a client that resolved HOST would."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context

    def wrap_socket(self, sock, server_hostname=None, **kwargs):
        return self.context.wrap_socket(sock, server_hostname=HOST, **kwargs)


def imaps(port: int, context: ssl.SSLContext) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    tls = context.wrap_socket(raw, server_hostname=HOST)
    assert tls.recv(4096).startswith(b"* OK")
    return tls


def names(tls: ssl.SSLSocket) -> list[str]:
    from cryptography import x509

    cert = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))
    return sorted(cert.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName))


def servedByPebble(port: int, ca: Pebble) -> bool:
    try:
        with imaps(port, trusting(ca)):
            return True
    except ssl.SSLCertVerificationError:
        return False


def test_certificate_from_pebble_after_the_ca_was_down_with_open_connections_untouched(
        dataDir, pebble, logged):
    # The CA is not up yet: the order fails, is logged, and retried with backoff while the
    # self-signed certificate keeps serving.
    server = serve(dataDir, pebble)
    try:
        failure = waitUntil(lambda: [e for e in logged if "retrying in" in e], 20, "a failed order")
        assert f"obtaining a certificate for {HOST} " in failure[0]
        assert "retrying in 1 s (the current certificate stays in service)" in failure[0]
        before = imaps(server.ports["imaps"], insecure())
        assert names(before) == [HOST]  # the self-signed one
        waitUntil(lambda: len([e for e in logged if "retrying in 2 s" in e]), 20,
                  "the second failure, after twice the wait")

        pebble.start()
        waitUntil(lambda: servedByPebble(server.ports["imaps"], pebble), 60,
                  "the certificate from pebble on imaps",
                  describe=lambda: "\n".join(logged) + pebble.describe())
        with imaps(server.ports["imaps"], trusting(pebble)) as after:
            # Each name the web listener serves, except the one DNS does not know.
            assert names(after) == ["autoconfig.example.test", "mta-sts.example.test", HOST]
        assert [e for e in logged if "leaving autodiscover.example.test out" in e]
        with smtplib.SMTP("127.0.0.1", server.smtpPort, timeout=10) as smtp:
            smtp.starttls(context=AsHost(trusting(pebble)))  # verifies chain and host name
            assert smtp.noop()[0] == 250
        client = imaplib.IMAP4("127.0.0.1", server.imapPort, timeout=10)
        client.starttls(ssl_context=AsHost(trusting(pebble)))
        client.logout()

        # The connection opened before the swap is up, on the certificate it started with.
        before.sendall(b"a NOOP\r\n")
        assert before.recv(4096).startswith(b"a OK")
        assert names(before) == [HOST]
        before.close()

        # No path under the challenge directory names anything but a token in flight.
        for path in ("/.well-known/acme-challenge/../../etc/passwd",
                     "/.well-known/acme-challenge/..%2f..%2facme%2faccount.key",
                     "/.well-known/acme-challenge/"):
            conn = http.client.HTTPConnection("127.0.0.1", server.http, timeout=10)
            conn.request("GET", path, headers={"Host": HOST})
            response = conn.getresponse()
            assert response.status == 404, path
            assert b"PRIVATE KEY" not in response.read()
            conn.close()
    finally:
        server.stop()

    acme = os.path.join(dataDir, "acme")
    assert stat.S_IMODE(os.stat(acme).st_mode) == 0o700
    assert sorted(os.listdir(acme)) == ["account.json", "account.key", "cert.pem", "key.pem"]
    for name in os.listdir(acme):
        assert stat.S_IMODE(os.stat(os.path.join(acme, name)).st_mode) == 0o600, name


def test_renewal_within_30_days_of_expiry_reuses_the_account(dataDir, pebble, logged):
    pebble.start()
    server = serve(dataDir, pebble)
    try:
        waitUntil(lambda: servedByPebble(server.ports["imaps"], pebble), 60,
                  "the first certificate", describe=lambda: "\n".join(logged))
    finally:
        server.stop()
    acme = os.path.join(dataDir, "acme")
    with open(os.path.join(acme, "account.json"), "rb") as f:
        account = f.read()
    assert b'"directory": "' + pebble.directoryURL.encode() in account

    # Now the certificate on disk expires in 20 days (covering every name): a restart
    # serves it, and renews it at once with the same account.
    certPath, _ = makeCertificate(acme, [HOST, "autoconfig.example.test",
                                         "mta-sts.example.test"], 20, time.time())
    with open(certPath, "rb") as f:
        expiring = ssl.PEM_cert_to_DER_cert(f.read().decode("ascii"))
    logged.clear()
    server = serve(dataDir, pebble)
    try:
        waitUntil(lambda: servedByPebble(server.ports["imaps"], pebble), 60,
                  "the renewed certificate", describe=lambda: "\n".join(logged))
        with imaps(server.ports["imaps"], trusting(pebble)) as new:
            assert new.getpeercert(binary_form=True) != expiring
    finally:
        server.stop()
    with open(os.path.join(acme, "account.json"), "rb") as f:
        assert f.read() == account  # not registered again
    assert not [e for e in logged if "retrying in" in e]


def test_tls_alpn_01_on_the_https_listener_alone(dataDir, pebble, logged):
    """No plain web listener: the CA's TLS handshake with ALPN acme-tls/1 is answered."""
    pebble.start()
    addUser(dataDir, "alice@example.test")
    server = startServer(
        dataDir, listen={"https": [f"tcp:{pebble.tlsPort}:interface=127.0.0.1"]},
        tls={"acme": True, "acme_directory": pebble.directoryURL, "acme_ca_file": pebble.caFile})
    try:
        waitUntil(lambda: servedByPebble(server.ports["imaps"], pebble), 60,
                  "the certificate from pebble", describe=lambda: "\n".join(logged))
        with imaps(server.ports["imaps"], trusting(pebble)) as tls:
            assert names(tls) == ["autoconfig.example.test", HOST]
    finally:
        server.stop()
    assert not [e for e in logged if "retrying in" in e]


@pytest.mark.e2e
def test_twistd_obtains_the_certificate_reloads_it_on_sighup_and_stops(tmp_path, pebble):
    """The real ``twistd -n twistmail`` with [tls] acme in its config file."""
    from serverproc import ServerProcess, listenerArgs, twistdCommand

    pebble.start()
    dataDir = tmp_path / "data"
    addUser(str(dataDir), "alice@example.test")
    config = tmp_path / "twistmail.toml"
    config.write_text(f'''[server]
data_dir = "data"
hostname = "{HOST}"
[listen]
http = ["tcp:{pebble.httpPort}:interface=127.0.0.1"]
[tls]
acme = true
acme_directory = "{pebble.directoryURL}"
acme_ca_file = "{pebble.caFile}"
''')
    smtp, pop3, imap = freePort(), freePort(), freePort()
    args = listenerArgs(smtp, pop3, imap)
    imapsPort = int(args[args.index("--imaps") + 1].split(":")[1])
    process = ServerProcess(twistdCommand("--config", str(config), *args),
                            logPath=str(tmp_path / "server.log"), cwd=str(tmp_path)).start()
    try:
        process.waitReady(smtp, pop3, imap)
        process.waitForLog(lambda log: "acme: serving a new certificate for " + HOST in log,
                           "the new certificate", timeout=60)
        assert servedByPebble(imapsPort, pebble)
        process.proc.send_signal(signal.SIGHUP)
        process.waitForLog(lambda log: f"certificate reloaded from {dataDir}/acme/cert.pem"
                           in log, "the reload of the ACME certificate")
        assert servedByPebble(imapsPort, pebble)
    finally:
        status = process.stop()
    assert status == -signal.SIGTERM, process.describe()  # twistd re-raises it
    assert "Traceback" not in process.log


def test_stopping_does_not_wait_for_a_ca_that_does_not_answer(dataDir, tmp_path):
    """The CA accepts the connection and says nothing: the order waits for it in its
    thread, but stopping the server does not (systemd would kill a stop that hangs)."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    silent.settimeout(20)
    (tmp_path / "ca.pem").write_bytes(makeCerts("localhost").caPEM)
    server = startServer(dataDir, listen={"http": [f"tcp:{freePort()}:interface=127.0.0.1"]},
                         tls={"acme": True, "acme_ca_file": str(tmp_path / "ca.pem"),
                              "acme_directory": f"https://127.0.0.1:{silent.getsockname()[1]}/dir"})
    try:
        connection, _ = silent.accept()  # the order is waiting for the CA now
    except BaseException:
        server.stop()
        raise
    try:
        started = time.monotonic()
        server.stop()
        assert time.monotonic() - started < 5
    finally:
        connection.close()
        silent.close()

