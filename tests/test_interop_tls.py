"""TLS and AUTH with real clients from Debian: swaks, curl, openssl s_client, fetchmail, mbsync.

Every login below is made over TLS, as a remote client's would be (the server
trusts no network for plaintext passwords: ``plaintext_networks = []``).  openssl and mbsync verify the server against its own generated
certificate; curl, swaks and fetchmail are told not to check it.
"""

from __future__ import annotations

import imaplib
import os
import re
import ssl

import pytest
from support import addUser, startServer
from test_interop import requireTool, run

pytestmark = pytest.mark.interop

ALICE = "alice@example.test"
BOB = "bob@example.test"


@pytest.fixture
def strict(dataDir):
    addUser(dataDir, ALICE)
    addUser(dataDir, BOB)
    srv = startServer(dataDir, auth={"plaintext_networks": []})
    yield srv
    srv.stop()


def certificate(server) -> str:
    return os.path.join(server.dataDir, "tls", "selfsigned.crt")


def messages(server, address: str) -> list[bytes]:
    local, domain = address.split("@")
    out = []
    for sub in ("new", "cur"):
        path = os.path.join(server.dataDir, "mail", domain, local, sub)
        for name in sorted(os.listdir(path)) if os.path.isdir(path) else []:
            with open(os.path.join(path, name), "rb") as f:
                out.append(f.read())
    return out


def test_swaks_starttls_and_auth_on_submission(strict):
    swaks = requireTool("swaks", "swaks libnet-ssleay-perl")
    result = run([swaks, "--server", "127.0.0.1", "--port", str(strict.ports["submission"]),
                  "--tls", "--auth", "PLAIN", "--auth-user", ALICE, "--auth-password", "secret",
                  "--from", ALICE, "--to", BOB, "--header", "Subject: swaks over tls"])
    assert result.returncode == 0, result.stdout
    assert "<~  235 2.7.0 Authentication successful" in result.stdout  # "~": over TLS
    assert re.search(r"^<~  250 2\.0\.0 Ok: queued as", result.stdout, re.MULTILINE)
    [data] = messages(strict, BOB)
    assert b"Subject: swaks over tls" in data


def test_swaks_implicit_tls_auth_login_and_wrong_password(strict):
    swaks = requireTool("swaks", "swaks libnet-ssleay-perl")
    port = str(strict.ports["submissions"])
    ok = run([swaks, "--server", "127.0.0.1", "--port", port, "--tlsc", "--auth", "LOGIN",
              "--auth-user", ALICE, "--auth-password", "secret", "--from", ALICE, "--to", BOB])
    assert ok.returncode == 0, ok.stdout
    bad = run([swaks, "--server", "127.0.0.1", "--port", port, "--tlsc", "--auth", "LOGIN",
               "--auth-user", ALICE, "--auth-password", "nope", "--from", ALICE, "--to", BOB])
    assert bad.returncode != 0
    assert "<~* 535 5.7.8" in bad.stdout
    assert "nope" not in open(os.path.join(strict.dataDir, "accounts.json")).read()


def test_curl_smtps_imaps_pop3s(strict, tmp_path):
    curl = requireTool("curl", "curl")
    message = tmp_path / "message.eml"
    message.write_bytes(b"From: alice@example.test\r\nTo: bob@example.test\r\n"
                        b"Subject: curl smtps\r\n\r\nsent by curl\r\n")
    sent = run([curl, "-sS", "-k", f"smtps://127.0.0.1:{strict.ports['submissions']}",
                "--mail-from", ALICE, "--mail-rcpt", BOB, "--upload-file", str(message),
                "--user", f"{ALICE}:secret"])
    assert sent.returncode == 0, sent.stdout
    [data] = messages(strict, BOB)
    assert data.endswith(message.read_bytes())
    listed = run([curl, "-sS", "-k", f"imaps://127.0.0.1:{strict.ports['imaps']}/",
                  "--user", f"{BOB}:secret"])
    assert listed.returncode == 0, listed.stdout
    assert '"/" INBOX' in listed.stdout and "Sent" in listed.stdout
    fetched = run([curl, "-sS", "-k", f"imaps://127.0.0.1:{strict.ports['imaps']}/INBOX;UID=1",
                   "--user", f"{BOB}:secret"])
    assert fetched.returncode == 0 and "sent by curl" in fetched.stdout, fetched.stdout
    popped = run([curl, "-sS", "-k", f"pop3s://127.0.0.1:{strict.ports['pop3s']}/1",
                  "--user", f"{BOB}:secret"])
    assert popped.returncode == 0 and "sent by curl" in popped.stdout, popped.stdout
    refused = run([curl, "-sS", "-k", f"pop3s://127.0.0.1:{strict.ports['pop3s']}/1",
                   "--user", f"{BOB}:wrong"])
    assert refused.returncode != 0


@pytest.mark.parametrize("protocol, starttls", [("smtp", "smtp"), ("submission", "smtp"),
                                                 ("pop3", "pop3"), ("imap", "imap")])
def test_openssl_starttls_verifies_against_the_certificate(strict, protocol, starttls):
    openssl = requireTool("openssl", "openssl")
    result = run([openssl, "s_client", "-connect", f"127.0.0.1:{strict.ports[protocol]}",
                  "-starttls", starttls, "-CAfile", certificate(strict),
                  "-verify_hostname", "mx.example.test", "-verify_return_error", "-brief"],
                 timeout=30)
    assert "Verification: OK" in result.stdout, result.stdout
    assert re.search(r"Protocol version: TLSv1\.[23]", result.stdout), result.stdout


def test_openssl_tls_1_1_is_refused(strict):
    openssl = requireTool("openssl", "openssl")
    old = run([openssl, "s_client", "-connect", f"127.0.0.1:{strict.ports['imaps']}", "-tls1_1",
               "-cipher", "DEFAULT@SECLEVEL=0", "-brief"], timeout=30)
    assert "Protocol version" not in old.stdout, old.stdout
    assert old.returncode != 0
    new = run([openssl, "s_client", "-connect", f"127.0.0.1:{strict.ports['imaps']}", "-tls1_2",
               "-brief"], timeout=30)
    assert "Protocol version: TLSv1.2" in new.stdout, new.stdout  # the same client, newer TLS


def test_fetchmail_over_pop3s(strict, tmp_path):
    fetchmail = requireTool("fetchmail", "fetchmail")
    client = imaplib.IMAP4_SSL("127.0.0.1", strict.ports["imaps"],
                               ssl_context=ssl._create_unverified_context())
    client.login(BOB, "secret")
    client.append("INBOX", None, None, b"Subject: for fetchmail\r\n\r\nover pop3s\r\n")
    client.logout()
    home = tmp_path / "fetchmail-home"
    home.mkdir(mode=0o700)
    out = tmp_path / "fetched"
    rc = tmp_path / "fetchmailrc"
    rc.write_text(f"poll 127.0.0.1 with proto POP3 service {strict.ports['pop3s']}\n"
                  f'  user "{BOB}" there with password "secret" is "root" here\n'
                  f"  options fetchall keep no stripcr ssl no sslcertck\n"
                  f'  mda "cat >> {out}"\n')
    rc.chmod(0o600)
    result = run([fetchmail, "--nosyslog", "--invisible", "--verbose", "-f", str(rc)],
                 env=dict(os.environ, FETCHMAILHOME=str(home)))
    assert result.returncode == 0, result.stdout
    assert out.read_bytes() == b"Subject: for fetchmail\r\n\r\nover pop3s\r\n"


def test_mbsync_over_imaps_with_the_certificate_pinned(strict, tmp_path):
    mbsync = requireTool("mbsync", "isync")
    client = imaplib.IMAP4_SSL("127.0.0.1", strict.ports["imaps"],
                               ssl_context=ssl._create_unverified_context())
    client.login(BOB, "secret")
    client.append("INBOX", None, None, b"Subject: for mbsync\r\n\r\nover imaps\r\n")
    client.logout()
    local = tmp_path / "mail"
    local.mkdir()
    rc = tmp_path / "mbsyncrc"
    rc.write_text(f"IMAPAccount t\nHost 127.0.0.1\nPort {strict.ports['imaps']}\nUser {BOB}\n"
                  f"Pass secret\nSSLType IMAPS\nCertificateFile {certificate(strict)}\n\n"
                  f"IMAPStore remote\nAccount t\n\nMaildirStore local\nPath {local}/\n"
                  f"Inbox {local}/INBOX\n\nChannel sync\nFar :remote:INBOX\nNear :local:INBOX\n"
                  f"Create Near\nSyncState *\n")
    result = run([mbsync, "-c", str(rc), "-V", "sync"])
    assert result.returncode == 0, result.stdout
    assert "Password is being sent in the clear" not in result.stdout
    files = list((local / "INBOX" / "new").iterdir()) + list((local / "INBOX" / "cur").iterdir())
    assert len(files) == 1 and files[0].read_bytes().endswith(b"over imaps\n")
