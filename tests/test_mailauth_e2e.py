"""Issue 11 end to end: twistmail A signs and relays, twistmail B verifies, through DNS.

The zone is what ``twistmail dns a.test`` prints for A (MX, SPF for the domain
and for A's HELO name, both DKIM selectors of ``twistmail dkim generate``,
DMARC, here with p=reject), plus addresses for the MX hosts, all 127.0.0.1,
served by tests/dnsserver.py.  A relays to b.test's MX through that DNS with
``[relay] smtp_port`` = B's port; B checks loopback clients
(``[filters.spf-dkim-dmarc] check_local = true``).  The message B stored is
checked again by an independent verifier, ``opendkim-testmsg`` (libopendkim),
through tests/resolvns.py.
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import os
import smtplib

import pytest
from dnsserver import MX, TXT, A, startDNS
from serverproc import waitUntil
from support import addUser, cli, startServer, storedMessages
from test_dkim_opendkim import opendkim

from twistmail.dnsrecords import Record, txtText

ALICE, BOB = "alice@a.test", "bob@b.test"
HOST_A, HOST_B = "mx.a.test", "mx.b.test"
MESSAGE = (b"From: Alice <alice@a.test>\r\nTo: bob@b.test\r\nSubject: signed and relayed\r\n"
           b"\r\nHello Bob, this passed SPF, DKIM and DMARC.\r\n")


def publishedZone(configPath: str, dataDir: str) -> tuple[dict, dict]:
    """(zone for dnsserver, {owner: [TXT text]} for resolvns) from ``twistmail dns a.test``."""
    out = cli("--config", configPath, "dns", "a.test", dataDir=dataDir).stdout
    records = [Record.parse(line) for line in out.splitlines()
               if line and not line.startswith(";")]
    zone: dict = {HOST_A: [A("127.0.0.1")], HOST_B: [A("127.0.0.1")],
                  "b.test": [MX(10, HOST_B)]}
    texts: dict = {}
    for r in records:
        owner = r.owner.rstrip(".")
        if r.type == "MX":
            preference, exchange = r.rdata.split()
            zone.setdefault(owner, []).append(MX(int(preference), exchange.rstrip(".")))
        elif r.type == "TXT":
            text = txtText(r.rdata)
            if owner == "_dmarc.a.test":
                assert "p=quarantine" in text  # what we advise; this test publishes p=reject
                text = "v=DMARC1; p=reject"
            zone.setdefault(owner, []).append(TXT(*(text[i:i + 255]
                                                    for i in range(0, len(text), 255))))
            texts.setdefault(owner, []).append(text)
    return zone, texts


@pytest.fixture
def internet(tmp_path):
    """(A, B, B's data dir, the DNS server, the TXT records for resolvns)."""
    dataA, dataB = str(tmp_path / "a"), str(tmp_path / "b")
    addUser(dataA, ALICE)
    addUser(dataB, BOB)
    cli("dkim", "generate", "a.test", "--selector", "s1", dataDir=dataA)
    configA = tmp_path / "a.toml"
    configA.write_text(f'[server]\ndata_dir = "{dataA}"\nhostname = "{HOST_A}"\n')
    zone, texts = publishedZone(str(configA), dataA)
    assert {"s1-ed25519._domainkey.a.test", "s1-rsa._domainkey.a.test", "a.test",
            HOST_A, "_dmarc.a.test"} <= set(texts)
    dns = startDNS(zone)
    configB = tmp_path / "b.toml"
    configB.write_text("[filters.spf-dkim-dmarc]\ncheck_local = true\n")
    servers = []
    try:
        b = startServer(dataB, configFile=str(configB), server={"hostname": HOST_B},
                        relay={"nameservers": [dns.nameserver], "dns_timeout": 2})
        servers.append(b)
        a = startServer(dataA, server={"hostname": HOST_A},
                        relay={"nameservers": [dns.nameserver], "smtp_port": b.smtpPort,
                               "retry_min": 1, "retry_max": 2, "dns_timeout": 2,
                               "connect_timeout": 2, "command_timeout": 10})
        servers.append(a)
        yield a, b, dataB, dns, texts
    finally:
        for server in servers:
            server.stop()
        dns.stop()


def test_signed_relayed_mail_passes_spf_dkim_and_dmarc_at_the_receiver(internet, tmp_path):
    a, b, dataB, dns, texts = internet
    with smtplib.SMTP("127.0.0.1", a.ports["submission"], timeout=30) as client:
        client.ehlo("laptop.a.test")
        client.login(ALICE, "secret")
        client.sendmail(ALICE, [BOB], MESSAGE)
    [stored] = waitUntil(lambda: storedMessages(dataB, BOB), 20, "the message at B")
    headers = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(stored)
    found = headers.get_all("Authentication-Results") or []
    assert len(found) == 1, stored
    results = " ".join(found[0].split())
    assert results.startswith(f"{HOST_B}; spf=pass smtp.mailfrom={ALICE}; "
                              f"spf=pass smtp.helo={HOST_A}; "), results
    assert "dkim=pass header.d=a.test header.s=s1-ed25519 header.a=ed25519-sha256" in results
    assert "dkim=pass header.d=a.test header.s=s1-rsa header.a=rsa-sha256" in results
    assert results.endswith("dmarc=pass (p=reject) header.from=a.test"), results
    assert len(headers.get_all("DKIM-Signature")) == 2
    zoneFile = tmp_path / "dkim-zone.json"
    zoneFile.write_text(json.dumps({o: t for o, t in texts.items() if "_domainkey" in o}))
    verified = opendkim(str(zoneFile), stored)
    assert (verified.returncode, verified.stderr) == (0, b""), verified


def test_a_forged_from_of_a_p_reject_domain_is_refused_by_the_receiver(internet):
    _, b, dataB, _, _ = internet
    forged = MESSAGE.replace(b"signed and relayed", b"urgent: wire the money")
    with smtplib.SMTP("127.0.0.1", b.smtpPort, timeout=30) as client:
        client.ehlo(HOST_A)
        with pytest.raises(smtplib.SMTPDataError) as info:
            client.sendmail("mallory@evil.test", [BOB], forged)
    assert info.value.smtp_code == 550
    assert info.value.smtp_error.startswith(b"5.7.1 ")
    assert b"a.test publishes the DMARC policy p=reject" in info.value.smtp_error
    assert storedMessages(dataB, BOB) == []


def _dkimProcesses() -> set:
    """PIDs of this process's children that verify DKIM (twistmail.filters.dkimprocess)."""
    found = set()
    for task in os.listdir(f"/proc/{os.getpid()}/task"):
        with open(f"/proc/{os.getpid()}/task/{task}/children") as f:
            for pid in f.read().split():
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as c:
                        if b"twistmail.filters.dkimprocess" in c.read():
                            found.add(int(pid))
                except FileNotFoundError:
                    pass
    return found


def test_once_the_answers_are_kept_a_dkim_process_verifies_the_next_message(internet):
    """The first message from a.test is verified in the DNS pool; its answers are then
    kept, and the next one is verified by a child process, with the same results."""
    a, b, dataB, dns, _ = internet
    before = _dkimProcesses()
    started = []
    for n in (1, 2):
        with smtplib.SMTP("127.0.0.1", a.ports["submission"], timeout=30) as client:
            client.login(ALICE, "secret")
            client.sendmail(ALICE, [BOB], MESSAGE)
        stored = waitUntil(lambda n=n: (lambda found: found if len(found) == n else None)(
            storedMessages(dataB, BOB)), 20, f"message {n} at B")
        started.append(_dkimProcesses() - before)
    # The first message starts A's signing process; B verifies it in its DNS pool.  The
    # second starts B's verifying process.
    assert len(started[0]) == 1 and len(started[1]) == 2, started
    for message in stored:
        headers = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(message)
        results = " ".join(headers["Authentication-Results"].split())
        assert "dkim=pass header.d=a.test header.s=s1-ed25519" in results, results
        assert "dkim=pass header.d=a.test header.s=s1-rsa" in results, results
        assert results.endswith("dmarc=pass (p=reject) header.from=a.test"), results
