"""``twistmail dns DOMAIN``: every record to publish; ``--check`` asks a DNS server on loopback."""

from __future__ import annotations

import pytest
from dnsserver import CNAME, MX, SRV, TXT, startDNS
from support import addUser, cli

from twistmail import dkimkeys
from twistmail.web import mtasts

LISTEN = ('smtp = ["tcp:25"]\nsubmissions = ["tcp:465"]\nsubmission = ["tcp:587"]\n'
          'imaps = ["tcp:993"]\nimap = []\npop3 = []\npop3s = []\nhttps = ["tcp:443"]\n')
MTA_STS = '[mta_sts]\nmode = "enforce"\nmx = ["mx.example.test"]\n'


@pytest.fixture
def setup(dataDir, tmp_path):
    """A config for mx.example.test hosting example.test, with MTA-STS and DKIM keys."""
    addUser(dataDir, "alice@example.test")
    keys = dkimkeys.generate(dataDir, "example.test", "s1")
    path = tmp_path / "twistmail.toml"
    path.write_text(f'[server]\ndata_dir = "{dataDir}"\nhostname = "mx.example.test"\n'
                    f"[listen]\n{LISTEN}{MTA_STS}")
    return dataDir, str(path), keys


def dnsCLI(setup, *args, check=True):
    dataDir, path, _ = setup
    return cli("--config", path, "dns", *args, dataDir=dataDir, check=check)


def expectedLines(keys) -> list[str]:
    policy = mtasts.policyText("enforce", ["mx.example.test"], 604800)
    return [
        "example.test. IN MX 10 mx.example.test.",
        'example.test. IN TXT "v=spf1 mx -all"',
        'mx.example.test. IN TXT "v=spf1 a -all"',
        *(dkimkeys.zoneTXT(owner, text) for owner, text in keys.records()),
        '_dmarc.example.test. IN TXT "v=DMARC1; p=quarantine; rua=mailto:postmaster@example.test"',
        f'_mta-sts.example.test. IN TXT "v=STSv1; id={mtasts.policyId(policy)}"',
        "mta-sts.example.test. IN CNAME mx.example.test.",
        '_smtp._tls.example.test. IN TXT "v=TLSRPTv1; rua=mailto:postmaster@example.test"',
        "_imaps._tcp.example.test. IN SRV 0 1 993 mx.example.test.",
        "_imap._tcp.example.test. IN SRV 0 0 0 .",
        "_pop3s._tcp.example.test. IN SRV 0 0 0 .",
        "_pop3._tcp.example.test. IN SRV 0 0 0 .",
        "_submissions._tcp.example.test. IN SRV 0 1 465 mx.example.test.",
        "_submission._tcp.example.test. IN SRV 10 1 587 mx.example.test.",
        "autoconfig.example.test. IN CNAME mx.example.test.",
        "autodiscover.example.test. IN CNAME mx.example.test.",
        "_autodiscover._tcp.example.test. IN SRV 0 1 443 mx.example.test.",
    ]


def test_prints_every_record_to_publish(setup):
    out = dnsCLI(setup, "example.test").stdout
    records = [line for line in out.splitlines() if not line.startswith(";")]
    assert records == expectedLines(setup[2])
    assert "; DMARC: what receivers do with mail that fails (RFC 7489)" in out


def test_without_keys_it_says_how_to_make_them(setup):
    dataDir = setup[0]
    dkimkeys.remove(dataDir, "example.test", "s1")
    out = dnsCLI(setup, "example.test").stdout
    assert "; DKIM: no keys; run: twistmail dkim generate example.test" in out
    assert "_domainkey" not in out


def zoneFor(keys, *, skip=(), change=()) -> dict:
    """The zone as published from expectedLines, minus C{skip} owners, with C{change} ones wrong."""
    zone: dict = {}
    for line in expectedLines(keys):
        owner, _, rtype, rdata = line.split(" ", 3)
        owner = owner.rstrip(".")
        if owner in skip:
            continue
        if rtype == "TXT":
            text = "".join(p for i, p in enumerate(rdata.split('"')) if i % 2)
            if owner in change:
                text = text.replace("-all", "~all")
            record = TXT(*[text[i:i + 255] for i in range(0, len(text), 255)])
        elif rtype == "MX":
            pref, host = rdata.split()
            record = MX(int(pref), host.rstrip("."))
        elif rtype == "CNAME":
            record = CNAME(rdata.rstrip("."))
        else:
            prio, weight, port, target = rdata.split()
            record = SRV(int(prio), int(weight), int(port), target.rstrip("."))
        zone.setdefault(owner, []).append(record)
    zone["example.test"].append(TXT("google-site-verification=abc"))  # other TXT: ignored
    return zone


def checkAgainst(setup, zone: dict, **dnsOptions):
    """``twistmail dns example.test --check`` against a loopback server serving C{zone}."""
    server = startDNS(zone, **dnsOptions)
    try:
        return dnsCLI(setup, "example.test", "--check", "--nameserver", server.nameserver,
                      check=False)
    finally:
        server.stop()


def test_check_marks_everything_ok(setup):
    proc = checkAgainst(setup, zoneFor(setup[2]))
    assert proc.returncode == 0
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["NAME", "TYPE", "STATUS", "IN", "DNS"]
    assert [line.split()[2] for line in lines[1:-1]] == ["OK"] * len(expectedLines(setup[2]))
    assert lines[-1] == f"all {len(expectedLines(setup[2]))} records OK"


def test_check_marks_missing_and_different_and_fails(setup):
    proc = checkAgainst(setup, zoneFor(setup[2], skip={
        "_dmarc.example.test", "s1-rsa._domainkey.example.test", "_imaps._tcp.example.test"},
        change={"example.test"}))
    assert proc.returncode == 1
    rows = {(r.split()[0], r.split()[1]): r.split(None, 3)[2:] for r in proc.stdout.splitlines()[1:]}
    assert rows[("example.test.", "TXT")] == ["different", "v=spf1 mx ~all"]
    assert rows[("_dmarc.example.test.", "TXT")] == ["missing", "-"]
    assert rows[("s1-rsa._domainkey.example.test.", "TXT")] == ["missing", "-"]
    assert rows[("s1-ed25519._domainkey.example.test.", "TXT")][0] == "OK"
    assert rows[("_imaps._tcp.example.test.", "SRV")] == ["missing", "-"]
    assert rows[("example.test.", "MX")][0] == "OK"
    assert "twistmail: error: 4 of 18 records are not as they should be" in proc.stderr


def test_a_dns_server_failure_is_an_error_not_ok(setup):
    proc = checkAgainst(setup, {}, servfail={"example.test", "_dmarc.example.test"})
    assert proc.returncode == 1
    assert "SERVFAIL" in proc.stdout and " error " in proc.stdout


@pytest.mark.parametrize("args, message", [
    (("../x",), "is not a domain name"),
    (("example.test", "--check", "--nameserver", "dns.example:53"), "give an IP address"),
])
def test_bad_arguments_are_refused(setup, args, message):
    proc = dnsCLI(setup, *args, check=False)
    assert proc.returncode == 1 and message in proc.stderr
