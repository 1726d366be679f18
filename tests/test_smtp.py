"""Inbound SMTP behaviour over loopback, with smtplib and raw sockets."""

from __future__ import annotations

import os
import re
import smtplib
import socket

import pytest
from support import maildirFiles, onReactor, readAll, startServer

MSG = b"From: x@remote.test\r\nTo: alice@example.test\r\nSubject: hi\r\n\r\nhello\r\n"


def stored(server, address="alice@example.test") -> list[bytes]:
    local, domain = address.split("@")
    new = os.path.join(server.dataDir, "mail", domain, local, "new")
    out = []
    for name in maildirFiles(server.dataDir, address):
        with open(os.path.join(new, name), "rb") as f:
            out.append(f.read())
    return out


def body(message: bytes) -> bytes:
    """Strip our Received: header (first header, folded lines start with a tab)."""
    assert message.startswith(b"Received: ")
    lines = message.split(b"\r\n")
    i = 1
    while lines[i].startswith(b"\t"):
        i += 1
    return b"\r\n".join(lines[i:])


def connect(server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.smtpPort), timeout=10)
    assert readAll(sock, b"\r\n").startswith(b"220 ")
    return sock


def test_ehlo_advertises_extensions(server):
    with smtplib.SMTP("127.0.0.1", server.smtpPort) as s:
        code, _ = s.ehlo("client.example")
        assert code == 250
        for ext in ("pipelining", "8bitmime", "enhancedstatuscodes"):
            assert s.has_extn(ext)
        assert s.esmtp_features["size"] == str(25 * 1024 * 1024)
        assert not s.has_extn("auth")  # the MX role offers no AUTH


def test_delivers_exact_bytes_with_received_header(server):
    message = MSG + b"..leading dot\r\n.\tdot tab\r\nlast line no dot\r\n"
    with smtplib.SMTP("127.0.0.1", server.smtpPort) as s:
        s.ehlo("client.example")
        # smtplib dot-stuffs; we check the server unstuffs to the exact original
        refused = s.sendmail("x@remote.test", ["alice@example.test"], message)
    assert refused == {}
    [copy] = stored(server)
    assert body(copy) == message
    first = copy.split(b"\r\n\r\n")[0]
    assert b"from client.example ([127.0.0.1])" in first
    assert b"by mx.example.test (twistmail) with ESMTP id " in first
    assert b"for <alice@example.test>" in first
    [name] = maildirFiles(server.dataDir, "alice@example.test")
    assert name.endswith(f",S={len(copy)}")


def test_one_copy_per_local_recipient_and_plus_addressing(server):
    with smtplib.SMTP("127.0.0.1", server.smtpPort) as s:
        s.sendmail("x@remote.test", ["alice@example.test", "Alice+News@Example.TEST", "bob@example.test"], MSG)
    assert len(stored(server, "alice@example.test")) == 1  # alice and alice+news are one account
    assert len(stored(server, "bob@example.test")) == 1
    # several recipients: no "for <...>" that would disclose the others
    assert b"for <" not in stored(server, "bob@example.test")[0].split(b"\r\n\r\n")[0]


def test_alias_delivers_to_targets(server):
    with server.accounts.editing() as accounts:
        accounts.addAlias("team@example.test", ["alice@example.test", "bob@example.test"])
    with smtplib.SMTP("127.0.0.1", server.smtpPort) as s:
        s.sendmail("x@remote.test", ["team@example.test"], MSG)
    assert len(stored(server, "alice@example.test")) == 1
    assert len(stored(server, "bob@example.test")) == 1


@pytest.mark.parametrize("rcpt, code, enhanced", [
    ("nobody@example.test", 550, b"5.1.1"),
    ("someone@remote.test", 550, b"5.7.1"),
    ("someone@example.test.remote.test", 550, b"5.7.1"),
    ("alice%remote.test@example.test", 550, b"5.1.1"),  # %-hack
    ('"alice@remote.test"@example.test', 550, b"5.1.1"),  # quoted local part
    ("@example.test:someone@remote.test", 550, b"5.7.1"),  # source route to a remote
])
def test_rcpt_rejections_never_relay(server, rcpt, code, enhanced):
    sock = connect(server)
    sock.sendall(b"EHLO c\r\n")
    readAll(sock, b"250 ")
    sock.sendall(b"MAIL FROM:<x@remote.test>\r\n")
    assert readAll(sock, b"\r\n").startswith(b"250 2.1.0")
    sock.sendall(f"RCPT TO:<{rcpt}>\r\n".encode())
    reply = readAll(sock, b"\r\n")
    assert reply.startswith(f"{code} ".encode() + enhanced), reply
    sock.sendall(b"DATA\r\n")
    assert readAll(sock, b"\r\n").startswith(b"503 5.5.1")
    sock.close()


def test_source_route_to_local_user_is_delivered(server):
    # RFC 5321 §4.1.1.3: source routes are ignored, the final address counts.
    # (Raw socket: smtplib's quoteaddr mangles source routes.)
    sock = connect(server)
    sock.sendall(b"EHLO c\r\nMAIL FROM:<x@remote.test>\r\n"
                 b"RCPT TO:<@relay.example,@b.example:alice@example.test>\r\nDATA\r\n")
    replies = readAll(sock, b"354 ")
    assert b"250 2.1.5" in replies
    sock.sendall(MSG + b".\r\n")
    assert b"250 2.0.0" in readAll(sock, b"250 2.0.0")
    sock.close()
    assert len(stored(server)) == 1


def test_null_sender_accepted(server):
    with smtplib.SMTP("127.0.0.1", server.smtpPort) as s:
        s.sendmail("", ["alice@example.test"], MSG)
    assert len(stored(server)) == 1


def test_declared_size_over_limit_is_refused_at_mail(server):
    with smtplib.SMTP("127.0.0.1", server.smtpPort) as s:
        s.ehlo()
        code, msg = s.mail("x@remote.test", [f"SIZE={25 * 1024 * 1024 + 1}"])
        assert (code, msg[:5]) == (552, b"5.3.4")
        code, msg = s.mail("x@remote.test", ["SIZE=100", "BODY=8BITMIME"])
        assert code == 250
        s.rset()
        code, msg = s.docmd("MAIL", "FROM:<x@remote.test> SMTPUTF8 X-UNKNOWN")
        assert code == 555


def test_oversize_data_is_refused_and_nothing_stored(dataDir):
    from support import addUser

    addUser(dataDir, "alice@example.test")
    srv = startServer(dataDir, smtp={"max_message_size": 10_000})
    try:
        sock = connect(srv)
        sock.sendall(b"EHLO c\r\nMAIL FROM:<x@remote.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
        readAll(sock, b"354 ")
        line = b"x" * 998 + b"\r\n"
        for _ in range(100):  # 100 KB, ten times the limit, streamed
            sock.sendall(line)
        sock.sendall(b".\r\n")
        reply = readAll(sock, b"552 ")
        assert b"552 5.3.4" in reply
        sock.sendall(b"NOOP\r\n")  # the session is still usable
        assert readAll(sock, b"\r\n").startswith(b"250")
        sock.close()
        assert stored(srv) == []
        assert maildirFiles(dataDir, "alice@example.test", "tmp") == []
    finally:
        srv.stop()


def test_disconnect_mid_data_stores_nothing(server):
    sock = connect(server)
    sock.sendall(b"EHLO c\r\nMAIL FROM:<x@remote.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
    readAll(sock, b"354 ")
    sock.sendall(MSG + b"half of the message")
    sock.close()
    # A later transaction on a new connection proves the server processed the close.
    with smtplib.SMTP("127.0.0.1", server.smtpPort) as s:
        s.sendmail("x@remote.test", ["bob@example.test"], MSG)
    assert stored(server) == []
    assert maildirFiles(server.dataDir, "alice@example.test", "tmp") == []


def test_disk_error_answers_451_and_leaves_nothing_partial(server):
    root = os.path.join(server.dataDir, "mail", "example.test", "alice")
    for sub in ("tmp", "cur"):
        os.makedirs(os.path.join(root, sub))
    with open(os.path.join(root, "new"), "w") as f:  # new/ is not a directory: rename fails
        f.write("not a directory")
    with smtplib.SMTP("127.0.0.1", server.smtpPort) as s:
        with pytest.raises(smtplib.SMTPDataError) as e:
            s.sendmail("x@remote.test", ["alice@example.test"], MSG)
        assert e.value.smtp_code == 451
        assert e.value.smtp_error.startswith(b"4.3.0")
    assert os.listdir(os.path.join(root, "tmp")) == []


def test_pipelined_commands_are_answered_in_order(server):
    sock = connect(server)
    sock.sendall(b"EHLO c\r\n")
    readAll(sock, b"250 ")
    # Two whole transactions in one write (RFC 2920), including a bad recipient.
    batch = (b"MAIL FROM:<x@remote.test>\r\nRCPT TO:<alice@example.test>\r\n"
             b"RCPT TO:<nobody@example.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n")
    sock.sendall(batch)
    replies = readAll(sock, b"354 ").split(b"\r\n")
    assert [r[:9] for r in replies[:5]] == [b"250 2.1.0", b"250 2.1.5", b"550 5.1.1", b"250 2.1.5",
                                            b"354 End d"]
    sock.sendall(MSG + b".\r\n" + b"MAIL FROM:<y@remote.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n")
    replies = readAll(sock, b"354 ").split(b"\r\n")
    assert replies[0].startswith(b"250 2.0.0 Ok: queued as ")
    assert [r[:9] for r in replies[1:4]] == [b"250 2.1.0", b"250 2.1.5", b"354 End d"]
    sock.sendall(MSG + b".\r\nQUIT\r\n")
    replies = readAll(sock, b"221 ")
    assert replies.startswith(b"250 2.0.0")
    sock.close()
    assert len(stored(server, "alice@example.test")) == 1
    assert len(stored(server, "bob@example.test")) == 2


@pytest.mark.parametrize("fake_end", [b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\r"])
def test_smtp_smuggling_bare_lf_or_cr_never_ends_data(server, fake_end):
    """CVE-2023-51764 class: only <CRLF>.<CRLF> ends DATA."""
    smuggled = (b"MAIL FROM:<admin@example.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"
                b"Subject: smuggled\r\n\r\nevil\r\n")
    sock = connect(server)
    sock.sendall(b"EHLO c\r\nMAIL FROM:<x@remote.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
    readAll(sock, b"354 ")
    sock.sendall(MSG + b"before" + fake_end + smuggled + b".\r\n")
    reply = readAll(sock, b"250 2.0.0")
    sock.sendall(b"QUIT\r\n")
    reply += readAll(sock, b"221 ")
    sock.close()
    assert reply.count(b"\r\n250 ") + reply.startswith(b"250 ") == 1  # one message, no smuggled MAIL
    [copy] = stored(server, "alice@example.test")
    # After a real CRLF a leading dot is transparency and is removed (RFC 5321 §4.5.2).
    expected_end = fake_end.replace(b"\r\n.", b"\r\n") if fake_end.startswith(b"\r\n.") else fake_end
    assert body(copy) == MSG + b"before" + expected_end + smuggled
    assert stored(server, "bob@example.test") == []


def test_overlong_command_line_gets_500_and_session_survives(server):
    sock = connect(server)
    sock.sendall(b"EHLO " + b"a" * 5000 + b"\r\n")
    assert readAll(sock, b"\r\n").startswith(b"500 5.5.2")
    sock.sendall(b"EHLO c\r\n")
    assert b"250 " in readAll(sock, b"250 ")
    # a line that never ends is discarded as it streams, not buffered
    for _ in range(200):
        sock.sendall(b"x" * 10_000)
    sock.sendall(b"\r\nNOOP\r\n")
    reply = readAll(sock, b"250 2.0.0")
    assert reply.count(b"500 5.5.2") == 1
    sock.close()


def test_too_many_recipients(dataDir):
    from support import addUser

    addUser(dataDir, "alice@example.test")
    srv = startServer(dataDir, smtp={"max_recipients": 3})
    try:
        with smtplib.SMTP("127.0.0.1", srv.smtpPort) as s:
            s.ehlo()
            s.mail("x@remote.test")
            for _ in range(3):
                assert s.rcpt("alice@example.test")[0] == 250
            code, msg = s.rcpt("alice@example.test")
            assert (code, msg[:5]) == (452, b"4.5.3")
    finally:
        srv.stop()


def test_bad_sequence_and_syntax(server):
    with smtplib.SMTP("127.0.0.1", server.smtpPort) as s:
        s.ehlo()
        assert s.rcpt("alice@example.test")[0] == 503
        assert s.docmd("DATA")[0] == 503
        assert s.docmd("MAIL", "FROM:<not an address>")[0] in (501, 553)
        assert s.docmd("BOGUS")[0] == 500
        code, msg = s.docmd("VRFY", "alice@example.test")
        assert code == 252  # never confirms which users exist
        assert s.noop()[0] == 250


def test_fsync_before_250(server, monkeypatch):
    """250 after DATA only once the file and its directory are fsynced."""
    from twistmail import _fsutil

    events = []
    realFsync, realDir = os.fsync, _fsutil.fsyncDir
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), realFsync(fd))[1])
    monkeypatch.setattr(_fsutil, "fsyncDir", lambda p: (events.append(("dir", os.path.basename(p))),
                                                         realDir(p))[1])
    with smtplib.SMTP("127.0.0.1", server.smtpPort) as s:
        s.sendmail("x@remote.test", ["alice@example.test"], MSG)
        events.append("250")
    assert events.index("fsync") < events.index(("dir", "new")) < events.index("250")


def test_transaction_and_reject_logged(server):
    from twisted.logger import globalLogPublisher

    seen = []
    onReactor(globalLogPublisher.addObserver, seen.append)
    try:
        with smtplib.SMTP("127.0.0.1", server.smtpPort) as s:
            s.sendmail("x@remote.test", ["alice@example.test"], MSG)
            with pytest.raises(smtplib.SMTPRecipientsRefused):
                s.sendmail("x@remote.test", ["other@remote.test"], MSG)
    finally:
        onReactor(globalLogPublisher.removeObserver, seen.append)
    tx = [e for e in seen if e.get("log_format", "").startswith("smtp id=")]
    assert len(tx) == 1
    assert tx[0]["client"] == "127.0.0.1" and tx[0]["sender"] == "x@remote.test"
    assert tx[0]["rcpts"] == "alice@example.test" and tx[0]["result"] == "delivered"
    assert tx[0]["size"] > len(MSG) and re.fullmatch("[0-9A-F]{16}", tx[0]["id"])
    rejects = [e for e in seen if e.get("log_format", "").startswith("smtp reject")]
    assert [r["why"] for r in rejects] == ["relay denied"]


def test_client_cut_off_after_too_many_errors(server):
    sock = connect(server)
    sock.sendall(b"BOGUS\r\n" * 30)
    replies = readAll(sock, b"421 ")
    assert replies.count(b"500 ") == 20  # MAX_ERRORS answered, then cut off
    assert b"421 4.7.0" in replies
    assert sock.recv(100) == b""  # closed
    sock.close()


@pytest.mark.parametrize("hops, accepted", [(100, True), (101, False)])
def test_mail_loop_is_refused_after_100_received_fields(server, hops, accepted):
    """RFC 5321 §6.3: counting Received: fields stops a message that keeps coming back."""
    trace = b"".join(b"Received: from hop%d.example by hop%d.example; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
                     % (i, i + 1) for i in range(hops))
    message = trace + MSG + b"Received: in the body does not count\r\n"
    with smtplib.SMTP("127.0.0.1", server.smtpPort) as s:
        if accepted:
            assert s.sendmail("x@remote.test", ["alice@example.test"], message) == {}
        else:
            with pytest.raises(smtplib.SMTPDataError) as info:
                s.sendmail("x@remote.test", ["alice@example.test"], message)
            assert info.value.smtp_code == 554 and info.value.smtp_error.startswith(b"5.4.6")
    assert len(stored(server)) == (1 if accepted else 0)


def test_authenticated_client_may_relay_the_hook_for_smtp_auth(dataDir):
    """SMTP AUTH only has to set ``client.authenticated``; the relay policy does the rest."""
    import dataclasses

    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import StringTransport

    from twistmail import config as configmod
    from twistmail.auth.accounts import Accounts
    from twistmail.delivery.routing import RelayPolicy, Router
    from twistmail.protocols.smtp import SMTPFactory

    config = configmod.load(None)
    factory = SMTPFactory(config["smtp"], "mx.example.test",
                          Router(Accounts(dataDir), RelayPolicy([])), None, dataDir)
    replies = []
    for authenticated in (None, "alice@example.test"):
        proto = factory.buildProtocol(IPv4Address("TCP", "203.0.113.9", 4321))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "203.0.113.9", 4321))
        proto.makeConnection(transport)
        proto.client = dataclasses.replace(proto.client, authenticated=authenticated)
        proto.dataReceived(b"EHLO c\r\nMAIL FROM:<alice@example.test>\r\nRCPT TO:<bob@remote.test>\r\n")
        replies.append(transport.value().splitlines()[-1])
        proto.connectionLost(None)
    assert replies[0].startswith(b"550 5.7.1") and replies[1].startswith(b"250 2.1.5")
