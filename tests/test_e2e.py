"""End to end: the real ``twistd -n twistmail`` process, the real admin CLI, stdlib clients.

Each test starts its own server on free loopback ports and a fresh data
directory.  Nothing here sleeps to synchronise: readiness is the greeting on
the port, and anything asynchronous is polled with a deadline.
"""

from __future__ import annotations

import errno
import os
import poplib
import re
import secrets
import signal
import smtplib
import socket
import stat
import time
from dataclasses import dataclass

import pytest
from serverproc import ServerProcess, greeting, listenerArgs, runTwistd, twistdCommand, waitUntil
from support import cli, freePort, maildirFiles

pytestmark = pytest.mark.e2e

HOSTNAME = "mx.example.test"
ALICE = "alice@example.test"
BOB = "bob@example.test"
SENDER = "x@remote.test"
CLIENT_HELO = "client.remote.test"


def newPassword(who: str) -> str:
    return f"{who}-Pw-{secrets.token_hex(8)}"


@dataclass
class E2EServer:
    dataDir: str
    smtpPort: int
    pop3Port: int
    imapPort: int
    process: ServerProcess
    passwords: dict[str, str]

    @property
    def log(self) -> str:
        return self.process.log

    def smtp(self) -> smtplib.SMTP:
        return smtplib.SMTP("127.0.0.1", self.smtpPort, local_hostname=CLIENT_HELO, timeout=30)

    def pop3(self, address: str, password: str | None = None) -> poplib.POP3:
        client = poplib.POP3("127.0.0.1", self.pop3Port, timeout=30)
        client.user(address)
        client.pass_(password if password is not None else self.passwords[address])
        return client


def launch(tmp_path, dataDir: str, name: str = "server",
           extra: tuple = ()) -> tuple[ServerProcess, int, int, int]:
    smtpPort, pop3Port, imapPort = freePort(), freePort(), freePort()
    process = ServerProcess(
        twistdCommand("--data-dir", dataDir, "--hostname", HOSTNAME,
                      *listenerArgs(smtpPort, pop3Port, imapPort), *extra),
        logPath=str(tmp_path / f"{name}.log"), cwd=str(tmp_path)).start()
    try:
        banners = process.waitReady(smtpPort, pop3Port, imapPort)
    except BaseException:
        process.stop()
        raise
    assert banners["smtp"].startswith(f"220 {HOSTNAME} ".encode()), banners
    return process, smtpPort, pop3Port, imapPort


def addUserWithCLI(dataDir: str, address: str, password: str) -> None:
    proc = cli("user", "add", address, dataDir=dataDir, stdin=password + "\n")
    assert f"user {address} added" in proc.stdout


@pytest.fixture
def mailserver(tmp_path):
    """twistd with example.test, alice and bob created through the real admin CLI."""
    dataDir = str(tmp_path / "data")
    proc = cli("domain", "add", "example.test", dataDir=dataDir)
    assert "domain example.test added" in proc.stdout
    passwords = {ALICE: newPassword("alice"), BOB: newPassword("bob")}
    for address, password in passwords.items():
        addUserWithCLI(dataDir, address, password)
    process, smtpPort, pop3Port, imapPort = launch(tmp_path, dataDir)
    server = E2EServer(dataDir, smtpPort, pop3Port, imapPort, process, passwords)
    try:
        yield server
    finally:
        try:
            process.stop()
        finally:
            # pytest shows teardown output only when the test failed.
            print(process.describe())


def sendOne(server: E2EServer, message: bytes, recipients=(ALICE,), sender=SENDER,
            mailOptions=()) -> str:
    """One SMTP transaction; returns the queue id from the 250 reply."""
    with server.smtp() as client:
        code, reply = client.ehlo()
        assert code == 250, reply
        code, reply = client.mail(sender, list(mailOptions))
        assert code == 250, reply
        for rcpt in recipients:
            code, reply = client.rcpt(rcpt)
            assert code == 250, (rcpt, reply)
        code, reply = client.data(message)
        assert code == 250, reply
        client.quit()
    m = re.fullmatch(rb"2\.0\.0 Ok: queued as ([0-9A-F]+)", reply)
    assert m, reply
    return m.group(1).decode()


def retrieveAll(server: E2EServer, address: str) -> list[tuple[bytes, int]]:
    """RETR every message over POP3: (message with CRLF line ends, octets), leaving them there."""
    client = server.pop3(address)
    try:
        count, _ = client.stat()
        out = []
        for i in range(1, count + 1):
            _, lines, octets = client.retr(i)
            out.append((b"".join(line + b"\r\n" for line in lines), octets))
        return out
    finally:
        client.quit()


def storedMessages(dataDir: str, address: str) -> list[bytes]:
    local, domain = address.split("@")
    base = os.path.join(dataDir, "mail", domain, local)
    out = []
    for sub in ("new", "cur"):
        for name in maildirFiles(dataDir, address, sub):
            with open(os.path.join(base, sub, name), "rb") as f:
                out.append(f.read())
    return out


def splitReceived(stored: bytes, message: bytes) -> bytes:
    """The part the server put in front of C{message} (which must follow byte for byte)."""
    assert stored.endswith(message), f"stored message does not end with the sent bytes:\n{stored!r}"
    return stored[:len(stored) - len(message)]


RECEIVED = re.compile(
    rb"Received: from " + re.escape(CLIENT_HELO.encode()) + rb" \(\[127\.0\.0\.1\]\)\r\n"
    rb"\tby " + re.escape(HOSTNAME.encode()) + rb" \(twistmail\) with ESMTP id (?P<id>[0-9A-F]+)"
    rb"(?:\r\n\tfor <(?P<for>[^>\r\n]+)>)?; [^\r\n]+\r\n")


def test_send_with_smtplib_and_retrieve_with_poplib_byte_exact(mailserver):
    token = secrets.token_hex(6).encode()
    message = (
        b"From: Remote Sender <x@remote.test>\r\n"
        b"To: Alice <alice@example.test>\r\n"
        b"Subject: e2e " + token + b"\r\n"
        b"Message-ID: <" + token + b"@remote.test>\r\n"
        b"MIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n"
        b"\r\n"
        b"First line.\r\n"
        b".a line that starts with a dot\r\n"
        b"..and one with two\r\n"
        b".\r\n"
        b"   trailing blanks and a tab\t  \r\n"
        b"Gr\xc3\xbc\xc3\x9fe, 8-bit UTF-8\r\n"
        b"\r\n"
        b"\r\n"
        b"last line\r\n"
    )
    queueId = sendOne(mailserver, message, mailOptions=["BODY=8BITMIME"])

    stored = storedMessages(mailserver.dataDir, ALICE)
    assert len(stored) == 1
    retrieved = retrieveAll(mailserver, ALICE)
    assert len(retrieved) == 1
    data, octets = retrieved[0]
    assert data == stored[0], "POP3 RETR differs from the stored file"
    assert octets == len(stored[0])

    header = splitReceived(data, message)
    m = RECEIVED.fullmatch(header)
    assert m, f"expected exactly one Received: header before the message, got {header!r}"
    assert m.group("id").decode() == queueId
    assert m.group("for") == ALICE.encode()
    # bob got nothing
    assert storedMessages(mailserver.dataDir, BOB) == []


def test_user_added_while_running_receives_mail_without_restart(mailserver):
    carol = "carol@example.test"
    password = newPassword("carol")
    with mailserver.smtp() as client:
        client.ehlo()
        assert client.mail(SENDER)[0] == 250
        code, reply = client.rcpt(carol)
        assert (code, reply[:5]) == (550, b"5.1.1"), reply

        addUserWithCLI(mailserver.dataDir, carol, password)

        def accepted():
            code, reply = client.rcpt(carol)
            assert code in (250, 550), reply
            return code == 250

        # The server re-reads accounts.json at most once a second.
        waitUntil(accepted, 10, f"RCPT TO:<{carol}> to be accepted after 'user add'",
                  interval=0.1, describe=mailserver.process.describe)
        message = b"Subject: welcome\r\n\r\nhello carol\r\n"
        code, reply = client.data(message)
        assert code == 250, reply
        client.quit()

    mailserver.passwords[carol] = password
    retrieved = retrieveAll(mailserver, carol)
    assert len(retrieved) == 1
    splitReceived(retrieved[0][0], message)


TRANSACTION = re.compile(
    r"smtp id=(?P<id>\S+) client=(?P<client>\S+) from=<(?P<sender>[^>]*)> to=(?P<to>\S+) "
    r"relay=(?P<relay>\S+) size=(?P<size>\d+) result=(?P<result>.+)$", re.MULTILINE)


def test_log_has_one_transaction_line_per_message(mailserver):
    first = b"Subject: one\r\n\r\nfirst message\r\n"
    second = b"Subject: two\r\n\r\nsecond message, two recipients\r\n"
    id1 = sendOne(mailserver, first, [ALICE])
    with mailserver.smtp() as client:
        client.ehlo()
        assert client.mail("y@remote.test")[0] == 250
        assert client.rcpt(ALICE)[0] == 250
        assert client.rcpt("nobody@example.test")[0] == 550
        assert client.rcpt(BOB)[0] == 250
        code, reply = client.data(second)
        assert code == 250, reply
        id2 = reply.decode().rsplit(" ", 1)[1]
        client.quit()

    lines = mailserver.process.waitForLog(
        lambda log: (found := [m.groupdict() for m in TRANSACTION.finditer(log)]) and
        len(found) >= 2 and found, "two SMTP transaction lines")
    assert len(lines) == 2, lines

    sizes: dict[str, set[int]] = {}
    for data in storedMessages(mailserver.dataDir, ALICE) + storedMessages(mailserver.dataDir, BOB):
        m = RECEIVED.match(data)
        assert m, data
        sizes.setdefault(m.group("id").decode(), set()).add(len(data))
    assert sizes.keys() == {id1, id2}
    assert len(sizes[id2]) == 1, "alice and bob must get identical copies"
    [size1], [size2] = sizes[id1], sizes[id2]

    assert lines[0] == {"id": id1, "client": "127.0.0.1", "sender": SENDER, "to": ALICE,
                        "relay": "-", "size": str(size1), "result": "delivered"}
    assert lines[1] == {"id": id2, "client": "127.0.0.1", "sender": "y@remote.test",
                        "to": f"{ALICE},{BOB}", "relay": "-", "size": str(size2),
                        "result": "delivered"}
    assert re.search(r"smtp reject client=127\.0\.0\.1 from=<y@remote\.test> "
                     r"rcpt=<nobody@example\.test> result=user unknown", mailserver.log)


def test_pop3_login_failure_is_logged_without_the_password(mailserver):
    wrong = "Wr0ng-" + secrets.token_hex(8)
    with pytest.raises(poplib.error_proto) as excinfo:
        mailserver.pop3(ALICE, wrong)
    assert excinfo.value.args[0] == b"-ERR [AUTH] Authentication failed"

    mailserver.pop3(ALICE).quit()  # the right password still works

    log = mailserver.process.waitForLog(
        lambda log: "result=ok" in log and log, "the successful POP3 login")
    failed = re.findall(r"pop3 login user=alice@example\.test client=127\.0\.0\.1 result=failed$",
                        log, re.MULTILINE)
    assert len(failed) == 1, log
    assert wrong not in log
    assert mailserver.passwords[ALICE] not in log
    with open(os.path.join(mailserver.dataDir, "accounts.json")) as f:
        accounts = f.read()
    assert mailserver.passwords[ALICE] not in accounts
    assert "$argon2id$" in accounts


def test_second_server_on_the_same_data_dir_refuses_to_start(mailserver, tmp_path):
    smtpPort, pop3Port = freePort(), freePort()
    result = runTwistd(["--data-dir", mailserver.dataDir, "--hostname", HOSTNAME,
                        *listenerArgs(smtpPort, pop3Port)], cwd=str(tmp_path))
    assert result.returncode != 0, result.stdout
    lock = os.path.join(mailserver.dataDir, "twistmail.lock")
    assert f"{lock} is locked" in result.stdout
    assert "another twistmail server uses this data directory" in result.stdout
    assert "Traceback" not in result.stdout
    assert greeting(smtpPort) is None and greeting(pop3Port) is None
    # The first server is unaffected.
    assert greeting(mailserver.smtpPort).startswith(b"220 ")
    assert mailserver.process.proc.poll() is None


def test_bad_listener_on_the_command_line_is_a_one_line_error(tmp_path):
    dataDir = str(tmp_path / "data")
    result = runTwistd(["--data-dir", dataDir, "--submission", "tpc:587"], cwd=str(tmp_path))
    assert result.returncode != 0, result.stdout
    last = result.stdout.strip().splitlines()[-1]
    assert "command line: [listen] submission: bad endpoint 'tpc:587'" in last
    assert "<embedded default>" not in last and "Fix: " in last
    assert "Traceback" not in result.stdout
    assert not os.path.exists(dataDir), "a configuration error must not create the data directory"


def test_port_in_use_is_a_one_line_error_naming_the_address_and_fix(tmp_path):
    with socket.socket() as occupier:
        occupier.bind(("127.0.0.1", 0))
        occupier.listen()
        port = occupier.getsockname()[1]
        result = runTwistd(["--data-dir", str(tmp_path / "data"),
                            *listenerArgs(port, freePort())], cwd=str(tmp_path))
    assert result.returncode != 0, result.stdout
    assert f"127.0.0.1:{port}" in result.stdout
    assert "Address already in use" in result.stdout
    assert "Traceback" not in result.stdout
    assert "Fix: " in result.stdout
    assert f"listening on tcp:{port}" not in result.stdout, "logged 'listening' but never listened"


BAD_CONFIGS = {
    "wrong-type": ('[smtp]\nmax_message_size = "big"\n',
                   "[smtp] max_message_size: expected an integer, got 'big'. "
                   "Fix: write e.g. max_message_size = 26214400"),
    "unknown-key": ("[smtp]\nmax_mesage_size = 1024\n",
                    "[smtp] max_mesage_size: unknown key. Fix: use one of "),
    "unknown-section": ("[smpt]\ntimeout = 3\n", "[smpt]: unknown section. Fix: use one of "),
    "below-minimum": ("[pop3]\ntimeout = 0\n",
                      "[pop3] timeout: 0 is below the minimum 1. Fix: use a value of at least 1"),
    "toml-syntax": ('[server\nhostname = "x"\n', "syntax: "),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_file_names_file_key_and_fix(tmp_path, case):
    text, expected = BAD_CONFIGS[case]
    path = tmp_path / "twistmail.toml"
    path.write_text(f'[server]\ndata_dir = "data"\n\n{text}' if case != "toml-syntax" else text)
    result = runTwistd(["--config", str(path)], cwd=str(tmp_path))
    assert result.returncode != 0, result.stdout
    last = result.stdout.strip().splitlines()[-1]
    assert f"{path}: {expected}" in last, result.stdout
    assert "Fix: " in last
    assert "Traceback" not in result.stdout
    assert not (tmp_path / "data").exists()


def test_missing_config_file(tmp_path):
    path = tmp_path / "nonexistent.toml"
    result = runTwistd(["--config", str(path)], cwd=str(tmp_path))
    assert result.returncode != 0, result.stdout
    assert (f"{path}: file: not found. Fix: pass an existing file to --config"
            in result.stdout.strip().splitlines()[-1])


def listeningAddresses(port: int) -> set[str]:
    """Local IPv4 addresses with a TCP socket LISTENing on C{port} (from /proc/net/tcp)."""
    found = set()
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            address, portHex = fields[1].split(":")
            if fields[3] == "0A" and int(portHex, 16) == port:
                found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return found


def requireFreePort(port: int) -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise
            pytest.fail(f"127.0.0.1:{port} is in use by another program, so the embedded default "
                        f"(SMTP 2525, POP3 2110) cannot be tested; stop whatever listens on port "
                        f"{port} (see: ss -ltnp 'sport = :{port}') and run the tests again")


def test_embedded_default_listens_on_loopback_2525_2110_and_2143(tmp_path):
    from twistmail.config import DEFAULT_PORTS

    for port in DEFAULT_PORTS.values():
        requireFreePort(port)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    process = ServerProcess(twistdCommand(), logPath=str(tmp_path / "default.log"),
                            cwd=str(cwd)).start()
    try:
        banners = process.waitReady(2525, 2110, 2143)
        assert banners["smtp"].startswith(b"220 ")
        assert banners["pop3"].startswith(b"+OK")
        assert banners["imap"].startswith(b"* OK [CAPABILITY IMAP4rev1")
        for port in DEFAULT_PORTS.values():
            assert listeningAddresses(port) == {"127.0.0.1"}, process.describe()
        dataDir = cwd / "twistmail-data"
        assert dataDir.is_dir(), process.describe()
        assert (dataDir / "twistmail.lock").exists()
        assert stat.S_IMODE(dataDir.stat().st_mode) & 0o077 == 0, \
            "the data directory holds password hashes: it must not be group/world accessible"
    finally:
        process.stop()
        print(process.describe())


#: twistd shuts down on SIGTERM and then re-raises the signal so its parent sees why it
#: ended (twisted.scripts.twistd.runApp, app._exitWithSignal): -SIGTERM is a clean stop.
CLEAN_EXIT = (0, -signal.SIGTERM)


def test_sigterm_stops_cleanly_and_mail_survives_a_restart(mailserver, tmp_path):
    message = b"Subject: durable\r\n\r\nstill here after a restart\r\n"
    sendOne(mailserver, message)
    assert mailserver.process.stop() in CLEAN_EXIT, mailserver.process.describe()
    assert "Server Shut Down." in mailserver.log
    assert "Traceback" not in mailserver.log

    process, smtpPort, pop3Port, imapPort = launch(tmp_path, mailserver.dataDir, name="restarted")
    try:
        restarted = E2EServer(mailserver.dataDir, smtpPort, pop3Port, imapPort, process,
                              mailserver.passwords)
        retrieved = retrieveAll(restarted, ALICE)
        assert len(retrieved) == 1
        splitReceived(retrieved[0][0], message)
    finally:
        assert process.stop() in CLEAN_EXIT, process.describe()


def test_migrate_to_mbox_and_serve_it(mailserver, tmp_path):
    """Stop, migrate with the CLI, start on mbox (found as a plugin): the same mail, same UIDL."""
    message = b"Subject: moving house\r\n\r\nFrom the old house\r\n"
    sendOne(mailserver, message)
    client = mailserver.pop3(ALICE)
    uidl = client.uidl(1).split()[-1]
    client.quit()
    assert mailserver.process.stop() in CLEAN_EXIT, mailserver.process.describe()

    out = cli("migrate", "--to", "mbox", "--all", dataDir=mailserver.dataDir).stdout
    assert f"{ALICE}: " in out and out.rstrip().endswith('[storage]\nbackend = "mbox"')
    config = tmp_path / "mbox.toml"
    config.write_text('[storage]\nbackend = "mbox"\n')
    process, smtpPort, pop3Port, imapPort = launch(tmp_path, mailserver.dataDir, name="mbox",
                                                   extra=("--config", str(config)))
    try:
        server = E2EServer(mailserver.dataDir, smtpPort, pop3Port, imapPort, process,
                           mailserver.passwords)
        sendOne(server, b"Subject: after the move\r\n\r\nhello\r\n")
        client = server.pop3(ALICE)
        assert client.uidl(1).split()[-1] == uidl
        client.quit()
        retrieved = retrieveAll(server, ALICE)
        assert len(retrieved) == 2
        splitReceived(retrieved[0][0], message)
        with open(os.path.join(mailserver.dataDir, "mbox", "example.test", "alice", "INBOX"),
                  "rb") as f:
            assert f.read().count(b"\nFrom MAILER-DAEMON ") == 1  # two messages, mboxrd
    finally:
        assert process.stop() in CLEAN_EXIT, process.describe()
    assert "Traceback" not in process.log


def test_imap_end_to_end_with_idle_push(mailserver):
    """The real twistd: a client in IDLE hears of an SMTP delivery within a second, then reads it."""
    import imaplib

    client = imaplib.IMAP4("127.0.0.1", mailserver.imapPort, timeout=30)
    client.login(ALICE, mailserver.passwords[ALICE])
    assert client.select("INBOX") == ("OK", [b"0"])
    tag = client._new_tag()
    client.send(tag + b" IDLE\r\n")
    assert client.readline().startswith(b"+ ")
    message = b"Subject: pushed\r\n\r\nhello idle\r\n"
    started = time.monotonic()
    sendOne(mailserver, message)
    assert client.readline() == b"* 1 EXISTS\r\n"
    assert time.monotonic() - started < 1.5
    client.send(b"DONE\r\n")
    while not client.readline().startswith(tag):
        pass
    typ, data = client.fetch("1", "(BODY.PEEK[])")
    assert typ == "OK" and data[0][1].endswith(message)
    assert data[0][1] == storedMessages(mailserver.dataDir, ALICE)[0]
    client.logout()


def test_one_listener_on_the_command_line_binds_only_that_port(tmp_path):
    """`twistd -n twistmail --smtp ENDPOINT` alone does not also bind the embedded default's
    other ports; --pop3 none style options turn a protocol off."""
    endpoint = f"tcp:{freePort()}:interface=127.0.0.1"
    process = ServerProcess(twistdCommand("--data-dir", str(tmp_path / "data"), "--smtp", endpoint),
                            logPath=str(tmp_path / "one.log"), cwd=str(tmp_path)).start()
    try:
        process.waitReady(int(endpoint.split(":")[1]), None)
        assert re.findall(r"twistmail (\w+) listening on (\S+)", process.log) == \
            [("smtp", endpoint)], process.describe()
    finally:
        process.stop()


def test_haproxy_listener_in_the_real_server(tmp_path):
    """A listener marked haproxy: on the command line reads the PROXY header first and
    then greets (Twisted's own haproxy: endpoint would greet before the header)."""
    port = freePort()
    process = ServerProcess(
        twistdCommand("--data-dir", str(tmp_path / "data"), "--hostname", HOSTNAME,
                      "--smtp", f"haproxy:tcp:{port}:interface=127.0.0.1"),
        logPath=str(tmp_path / "proxy.log"), cwd=str(tmp_path)).start()
    try:
        process.waitForLog(lambda log: f"listening on haproxy:tcp:{port}" in log, "the listener")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 25\r\nHELO x\r\n"
                         b"MAIL FROM:<a@example.net>\r\nRCPT TO:<nobody@example.test>\r\n")
            data = b""
            while data.count(b"\r\n") < 4:
                data += sock.recv(4096)
        assert data.startswith(f"220 {HOSTNAME} ".encode()), data
        process.waitForLog(lambda log: "smtp reject client=192.0.2.7 " in log,
                           "the rejected recipient logged with the proxied client")
    finally:
        process.stop()
