"""Anti-spam in the real ``twistd -n twistmail``, SMTP on the wire: a DNS block list served
by tests/dnsserver.py, greylisting across a restart, and a real Rspamd
(tests/rspamdproc.py) in ``[filters] inbound``.

The clients connect from 127.0.0.1, which no default trusts (``[relay]
trusted_networks = []``), so every check applies to them.
"""

from __future__ import annotations

import smtplib

import pytest
import rspamdproc
from dnsserver import A, startDNS
from serverproc import ServerProcess, twistdCommand, waitUntil
from support import addUser, freePort, storedMessages
from test_e2e import ALICE, BOB, HOSTNAME, SENDER, launch, listenerArgs

MESSAGE = b"From: x@remote.test\r\nTo: alice@example.test\r\nSubject: hi\r\n\r\n"


def configure(tmp_path, configText: str) -> tuple[str, str]:
    """(data dir with alice and bob, a --config file holding C{configText})."""
    dataDir = str(tmp_path / "data")
    if not (tmp_path / "data").exists():
        addUser(dataDir, ALICE)
        addUser(dataDir, BOB)
    config = tmp_path / "twistmail.toml"
    config.write_text(configText)
    return dataDir, str(config)


def serve(tmp_path, configText: str, name: str = "server"):
    """(the server, its SMTP port, the data dir) for twistd with C{configText} as --config."""
    dataDir, config = configure(tmp_path, configText)
    server, smtpPort, _, _ = launch(tmp_path, dataDir, name=name, extra=("--config", config))
    return server, smtpPort, dataDir


def test_a_client_on_the_dns_block_list_is_refused_at_connect(tmp_path):
    dns = startDNS({"1.0.0.127.bl.test": [A("127.0.0.2")], "bl.test": []})
    try:
        dataDir, config = configure(tmp_path, f'[antispam]\ndnsbl = ["bl.test"]\n'
                                              f'[relay]\nnameservers = ["{dns.nameserver}"]\n')
        port, pop3Port = freePort(), freePort()
        server = ServerProcess(twistdCommand("--data-dir", dataDir, "--hostname", HOSTNAME,
                                             *listenerArgs(port, pop3Port), "--config", config),
                               logPath=str(tmp_path / "server.log")).start()
        try:
            server.waitReady(None, pop3Port)  # SMTP greets this client with 554, not 220
            try:
                smtplib.SMTP("127.0.0.1", port, timeout=30).close()
                refused = None
            except smtplib.SMTPConnectError as e:
                refused = e
        finally:
            server.stop()
    finally:
        dns.stop()
    assert refused is not None, f"greeted with 220\n{server.describe()}"
    assert refused.smtp_code == 554, server.describe()
    assert refused.smtp_error == \
        f"{HOSTNAME} 5.7.1 Service unavailable; client [127.0.0.1] blocked using bl.test".encode()
    assert ("1.0.0.127.bl.test", "A") in dns.queries


def rcpt(port: int, recipient: str) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("client.remote.test")
        client.mail(SENDER)
        return client.rcpt(recipient)


def test_greylisting_asks_for_a_retry_passes_it_after_the_delay_and_remembers_it(tmp_path):
    configText = "[antispam]\ngreylist = true\ngreylist_delay = 1\n"
    server, port, dataDir = serve(tmp_path, configText)
    try:
        code, reply = rcpt(port, ALICE)
        assert (code, reply[:6]) == (450, b"4.2.0 "), reply
        # The retry a real MTA makes later: polled until the 1 s delay has passed.
        waitUntil(lambda: rcpt(port, ALICE)[0] == 250, 10, "the retry to pass", interval=0.25)
    finally:
        server.stop()
    server, port, _ = serve(tmp_path, configText, name="restarted")
    try:
        assert rcpt(port, ALICE)[0] == 250  # the passed triplet survived the restart
        assert rcpt(port, BOB)[0] == 450  # a new one is still greylisted
    finally:
        server.stop()


@pytest.fixture(scope="module")
def rspamd():
    assert rspamdproc.available(), "rspamd is not installed: apt-get install rspamd"
    with rspamdproc.Rspamd(freePort()) as rs:
        yield rs


def test_rspamd_rejects_gtube_after_data_and_marks_add_header_as_spam(tmp_path, rspamd):
    server, port, dataDir = serve(tmp_path, f'[filters]\ninbound = ["rspamd"]\n'
                                            f'[filters.rspamd]\nurl = "{rspamd.url}"\n')
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            with pytest.raises(smtplib.SMTPDataError) as info:
                client.sendmail(SENDER, [ALICE], MESSAGE + rspamdproc.GTUBE.encode() + b"\r\n")
            client.sendmail(SENDER, [ALICE],
                            MESSAGE + rspamdproc.GTUBE_ADD_HEADER.encode() + b"\r\n")
    finally:
        server.stop()
    assert (info.value.smtp_code, info.value.smtp_error) == (554, b"5.7.1 Gtube pattern")
    [stored] = storedMessages(dataDir, ALICE)
    assert b"\r\nX-Spam: Yes\r\n" in stored
    assert rspamdproc.GTUBE_ADD_HEADER.encode() in stored
    assert f"by {HOSTNAME} (twistmail)".encode() in stored
