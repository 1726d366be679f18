"""A compromised account cannot send without bound: outbound limits on submission,
over loopback with smtplib, as a mail client (or a spammer holding a password) sends."""

from __future__ import annotations

import smtplib

import pytest
from support import addUser, cli, onReactor, startServer

ALICE, CAROL, BOB = "alice@example.test", "carol@example.test", "bob@example.test"
MSG = b"Subject: hi\r\n\r\nhello\r\n"


@pytest.fixture
def limited(dataDir):
    for user in (ALICE, BOB, CAROL):
        addUser(dataDir, user)
    started = []

    def start(**submission):
        srv = startServer(dataDir, submission=submission)
        started.append(srv)
        return srv

    yield start
    for srv in started:
        if srv.service.running:
            srv.stop()


def login(srv, user=ALICE) -> smtplib.SMTP:
    s = smtplib.SMTP("127.0.0.1", srv.ports["submission"], timeout=10)
    s.ehlo()
    s.login(user, "secret")
    return s


def test_messages_past_the_hourly_limit_get_451_at_mail(limited):
    srv = limited(max_messages_per_hour=2)
    with login(srv) as s:
        for _ in range(2):
            assert s.sendmail(ALICE, [BOB], MSG) == {}
        code, text = s.mail(ALICE)
        assert code == 451 and text.startswith(b"4.7.1"), text
        assert b"messages per hour" in text and ALICE.encode() in text


def test_recipients_past_the_hourly_limit_get_451_at_rcpt(limited):
    srv = limited(max_recipients_per_hour=3)
    with login(srv) as s:
        refused = s.sendmail(ALICE, [f"bob+{n}@example.test" for n in range(5)], MSG)
        assert sorted(refused) == ["bob+3@example.test", "bob+4@example.test"]
        code, text = refused["bob+3@example.test"]
        assert code == 451 and text.startswith(b"4.7.1") and b"recipients per hour" in text


def test_concurrent_sessions_of_one_account_cannot_overshoot(limited):
    """Five sessions say MAIL before any finishes: only the limit's worth are let on."""
    srv = limited(max_messages_per_hour=3)
    sessions = [login(srv) for _ in range(5)]
    try:
        codes = [s.mail(ALICE)[0] for s in sessions]
        assert codes == [250, 250, 250, 451, 451]
        for s in sessions[:3]:
            assert s.rcpt(BOB)[0] == 250
        for s in sessions[:3]:
            assert s.data(MSG)[0] == 250
        assert sessions[3].mail(ALICE)[0] == 451  # the three sent fill the hour
    finally:
        for s in sessions:
            s.close()


def test_pipelined_transaction_past_the_recipient_limit(limited):
    """RFC 2920: MAIL, RCPTs and DATA sent at once are answered in order; the RCPT past
    the limit gets 451, and the message goes to the recipients accepted before it."""
    import base64
    import socket

    from support import readAll

    srv = limited(max_recipients_per_hour=2)
    with socket.create_connection(("127.0.0.1", srv.ports["submission"]), timeout=10) as sock:
        readAll(sock, b"\r\n")
        sock.sendall(b"EHLO client\r\nAUTH PLAIN " + base64.b64encode(
            b"\0" + ALICE.encode() + b"\0secret") + b"\r\n")
        readAll(sock, b"235 ")
        sock.sendall(b"MAIL FROM:<" + ALICE.encode() + b">\r\n" + b"".join(
            b"RCPT TO:<bob+%d@example.test>\r\n" % n for n in range(3)) + b"DATA\r\n")
        replies = readAll(sock, b"354 ").split(b"\r\n")[:5]
        assert [r[:3] for r in replies] == [b"250", b"250", b"250", b"451", b"354"], replies
        assert replies[3].startswith(b"451 4.7.1")
        sock.sendall(MSG + b".\r\nQUIT\r\n")
        assert b"250 2.0.0 Ok: queued" in readAll(sock, b"221 ")
    with login(srv) as s:
        assert s.mail(ALICE)[0] == 250
        assert s.rcpt(BOB)[0] == 451  # the two recipients sent fill the hour


def test_concurrent_recipients_are_shared_across_sessions(limited):
    srv = limited(max_recipients_per_hour=4)
    one, two = login(srv), login(srv)
    try:
        one.mail(ALICE)
        two.mail(ALICE)
        codes = []
        for n in range(3):
            codes.append(one.rcpt(f"bob+a{n}@example.test")[0])
            codes.append(two.rcpt(f"bob+b{n}@example.test")[0])
        assert codes == [250, 250, 250, 250, 451, 451]
    finally:
        one.close()
        two.close()


def test_an_abandoned_transaction_gives_its_reservation_back(limited):
    srv = limited(max_messages_per_hour=1, max_recipients_per_hour=1)
    with login(srv) as s:
        s.mail(ALICE)
        s.rcpt(BOB)
        s.rset()
    dropped = login(srv)
    dropped.mail(ALICE)
    dropped.rcpt(BOB)
    dropped.close()  # disconnected mid-transaction
    with login(srv) as s:
        assert s.sendmail(ALICE, [BOB], MSG) == {}  # the one message of the hour
        assert s.mail(ALICE)[0] == 451


def test_auth_on_the_mx_port_is_limited_too(dataDir):
    """With [smtp] auth = true, port 25 is another way for a user to send."""
    addUser(dataDir, ALICE)
    srv = startServer(dataDir, smtp={"auth": True}, submission={"max_messages_per_hour": 1})
    try:
        with smtplib.SMTP("127.0.0.1", srv.smtpPort, timeout=10) as s:
            s.ehlo()
            s.login(ALICE, "secret")
            assert s.sendmail(ALICE, [ALICE], MSG) == {}
            code, text = s.mail(ALICE)
            assert code == 451 and text.startswith(b"4.7.1")
        with smtplib.SMTP("127.0.0.1", srv.smtpPort, timeout=10) as s:
            assert s.sendmail("x@remote.test", [ALICE], MSG) == {}  # MX mail: not limited
    finally:
        srv.stop()


def test_domain_limit_counts_every_user_of_the_sending_domain(limited):
    srv = limited(max_messages_per_hour=10, domain_max_messages_per_hour=2)
    with login(srv, ALICE) as s:
        s.sendmail(ALICE, [BOB], MSG)
    with login(srv, CAROL) as s:
        s.sendmail(CAROL, [BOB], MSG)
        code, text = s.mail(CAROL)
        assert code == 451 and text.startswith(b"4.7.1")
        assert b"domain example.test" in text and b"messages per hour" in text


def test_refusal_is_logged_with_who_what_and_result(limited):
    from twisted.logger import globalLogPublisher

    srv = limited(max_messages_per_hour=1)
    seen = []
    onReactor(globalLogPublisher.addObserver, seen.append)
    try:
        with login(srv) as s:
            s.sendmail(ALICE, [BOB], MSG)
            s.mail(ALICE)
    finally:
        onReactor(globalLogPublisher.removeObserver, seen.append)
    [event] = [e for e in seen if e.get("log_format", "").startswith("ratelimit ")]
    assert (event["user"], event["domain"], event["limit"], event["result"]) == (
        ALICE, "example.test", "max_messages_per_hour", "deferred")
    assert event["client"] == "127.0.0.1" and event["max"] == 1


def test_a_restart_does_not_reset_the_window(limited, dataDir):
    srv = limited(max_messages_per_hour=2)
    with login(srv) as s:
        s.sendmail(ALICE, [BOB], MSG)
        s.sendmail(ALICE, [BOB], MSG)
    srv.stop()
    again = limited(max_messages_per_hour=2)
    with login(again) as s:
        assert s.mail(ALICE)[0] == 451


def test_cli_shows_the_counts_against_the_limits(limited, dataDir):
    srv = limited(max_messages_per_hour=5, max_recipients_per_hour=20)
    with login(srv, ALICE) as s:
        s.sendmail(ALICE, [BOB, CAROL], MSG)
        s.sendmail(ALICE, [BOB], MSG)
    with login(srv, CAROL) as s:
        s.sendmail(CAROL, [BOB], MSG)
    srv.stop()  # publishes the counts at stop
    config = dataDir + "/limits.toml"
    with open(config, "w") as f:
        f.write("[submission]\nmax_messages_per_hour = 5\nmax_recipients_per_hour = 20\n")
    users = cli("--config", config, "user", "list", dataDir=dataDir).stdout.splitlines()
    assert users[0].split() == ["ADDRESS", "ALIASES", "MESSAGES-1H", "RECIPIENTS-1H"]
    rows = {line.split()[0]: line.split()[1:] for line in users[1:]}
    assert rows[ALICE] == ["-", "2/5", "3/20"]
    assert rows[CAROL] == ["-", "1/5", "1/20"]
    assert rows[BOB] == ["-", "0/5", "0/20"]

    out = cli("--config", config, "queue", "senders", dataDir=dataDir).stdout.splitlines()
    assert out[0].split() == ["SENDER", "KIND", "MESSAGES-1H", "RECIPIENTS-1H"]
    assert [line.split() for line in out[1:4]] == [
        ["example.test", "domain", "3/1000", "4/5000"],
        [ALICE, "user", "2/5", "3/20"],
        [CAROL, "user", "1/5", "1/20"],
    ]


def test_cli_fails_on_a_damaged_state_file(dataDir):
    import os

    os.makedirs(os.path.join(dataDir, "state"))
    with open(os.path.join(dataDir, "state", "ratelimits.json"), "w") as f:
        f.write("{")
    proc = cli("queue", "senders", dataDir=dataDir, check=False)
    assert proc.returncode == 1 and "ratelimits.json" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.e2e
def test_twistd_publishes_the_counts_at_sigterm_and_keeps_them_over_a_restart(tmp_path):
    """The real twistd: its stop (SIGTERM) writes the counts in the thread pool while the
    reactor shuts down, the CLI shows them, and the next twistd goes on with the hour."""
    from serverproc import ServerProcess, twistdCommand
    from support import freePort

    dataDir = str(tmp_path / "data")
    addUser(dataDir, ALICE)
    config = tmp_path / "twistmail.toml"
    config.write_text("[submission]\nmax_messages_per_hour = 2\n")

    def run(name: str) -> tuple[ServerProcess, int]:
        port = freePort()
        process = ServerProcess(
            twistdCommand("--config", str(config), "--data-dir", dataDir, "--hostname",
                          "mx.example.test", "--submission", f"tcp:{port}:interface=127.0.0.1",
                          *[a for p in ("smtp", "submissions", "pop3", "pop3s", "imap", "imaps")
                            for a in (f"--{p}", "none")]),
            logPath=str(tmp_path / f"{name}.log"), cwd=str(tmp_path)).start()
        process.waitReady(port, None)
        return process, port

    first, port = run("first")
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
            s.login(ALICE, "secret")
            s.sendmail(ALICE, [ALICE], MSG)
            s.sendmail(ALICE, [ALICE], MSG)
            assert s.mail(ALICE)[0] == 451
    finally:
        first.stop()
    assert "Traceback" not in first.log, first.describe()

    out = cli("--config", str(config), "queue", "senders", dataDir=dataDir).stdout.splitlines()
    assert out[1].split() == [ALICE, "user", "2/2", "2/500"], out

    second, port = run("second")
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
            s.login(ALICE, "secret")
            assert s.mail(ALICE)[0] == 451
    finally:
        second.stop()
