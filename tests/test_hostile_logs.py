"""What a client can make the server write to its log.

A user name, an address or an IMAP ID field is the client's text: with a
CR or LF in it, it forged log lines of its own; with spaces, a second
``client=`` in the real line (fail2ban-style filters then ban whom the
attacker names); unbounded, it filled the disk.  Never a password.
"""

from __future__ import annotations

import base64
import poplib
import re
import smtplib

from hostile import logged, smtpDialog  # noqa: F401 - logged is a fixture
from imapwire import RawIMAP

from twistmail.auth.throttle import AuthThrottle

FORGED = b"evil\nsmtp auth user=admin client=192.0.2.66 result=failed\rx y"


def lines(seen: list[dict]) -> list[str]:
    from twisted.logger import formatEvent

    return [formatEvent(e) for e in seen]


def assertNotForged(seen: list[dict]) -> None:
    text = lines(seen)
    assert not any("\n" in line or "\r" in line for line in text), text
    assert not any(re.search(r"\sclient=192\.0\.2\.66", line) for line in text), text
    assert any(line.count("evil\\n") for line in text), text


def test_smtp_auth_user_name_cannot_forge_log_lines(server, logged):  # noqa: F811
    plain = base64.b64encode(b"\0" + FORGED + b"\0hunter2")
    smtpDialog(server.ports["submission"], [b"EHLO x", b"AUTH PLAIN " + plain])
    assertNotForged(logged)
    assert "hunter2" not in repr(logged)


def test_pop3_user_name_cannot_forge_log_lines(server, logged):  # noqa: F811
    client = poplib.POP3("127.0.0.1", server.pop3Port, timeout=10)
    # LF and CR alone do not end a POP3 line; USER takes no spaces, tabs do as well
    client._putcmd("USER " + FORGED.replace(b" ", b"\t").decode())
    client._getresp()
    try:
        client.pass_("hunter2")
    except poplib.error_proto:
        pass
    plain = base64.b64encode(b"\0" + FORGED + b"\0hunter2").decode()
    try:
        client._shortcmd("AUTH PLAIN " + plain)
    except poplib.error_proto:
        pass
    client.quit()
    assertNotForged(logged)
    assert "hunter2" not in repr(logged)


def test_imap_login_and_id_cannot_forge_or_flood_the_log(server, logged):  # noqa: F811
    client = RawIMAP(server.imapPort)
    client.send(b"a ID (\"name\" {%d+}\r\n%s \"version\" \"%s\")\r\n" % (len(FORGED), FORGED, b"v" * 60_000))
    assert client.until(b"a")[1].startswith(b"OK")
    client.send(b"b LOGIN {%d+}\r\n%s hunter2\r\n" % (len(FORGED), FORGED))
    assert client.until(b"b")[1].startswith(b"NO")
    client.close()
    assertNotForged(logged)
    assert max(len(line) for line in lines(logged)) < 2000
    assert "hunter2" not in repr(logged)


def test_smtp_address_with_spaces_cannot_add_fields(server, logged):  # noqa: F811
    """A quoted local part may hold spaces (RFC 5321 §4.1.2)."""
    with smtplib.SMTP("127.0.0.1", server.smtpPort) as s:
        s.ehlo("x")
        s.mail('"a client=192.0.2.66 result=ok"@remote.test')
        assert s.rcpt("nobody@other.test")[0] == 550
    text = [line for line in lines(logged) if line.startswith("smtp reject")]
    assert text and not any(" client=192.0.2.66" in line for line in text), text


def test_throttle_keeps_a_bounded_key_per_account():
    """An account name is the client's: 100,000 keys of a 64 KiB name were gigabytes."""
    throttle = AuthThrottle(failureDelay=1, maxDelay=15, maxFailures=5, window=60, blockTime=60,
                            clock=lambda: 0)
    throttle.failed("192.0.2.1", "x" * 65536, "imap")
    assert max(len(key) for key in throttle._accounts) < 400
    assert throttle.failed("192.0.2.2", "x" * 65536, "imap") == 2, "the same account"
    assert throttle.failed("192.0.2.3", "x" * 65536 + "y", "imap") == 1, "another one"


def test_remote_reply_cannot_forge_relay_log_lines():
    """A receiving server's reply is logged as one line, its words kept readable."""
    from twisted.logger import globalLogPublisher

    from twistmail.relay.sender import DEFERRED, Result, logAttempt

    seen: list[dict] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        logAttempt({"id": "Q1", "domain": "remote.test"}, "mx.remote.test",
                   {"a@remote.test": Result(DEFERRED, "451 4.3.0 try later\r\n"
                                            + FORGED.decode())})
    finally:
        globalLogPublisher.removeObserver(seen.append)
    assertNotForged(seen)
    assert "reply=451 4.3.0 try later" in lines(seen)[0]
