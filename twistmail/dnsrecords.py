# -*- test-case-name: tests.test_dns_cli -*-
"""The DNS records a domain needs to send and receive through us, and a check of them.

Used by ``twistmail dns`` (all of them, for one domain) and ``twistmail
check-config`` (MTA-STS and client SRV records, for every hosted domain).
Each record is a zone-file line, ``owner. IN TYPE rdata``, so what is printed
is what is checked.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from twistmail import dkimkeys

#: What we print for DMARC (RFC 7489 §6.3).  quarantine, not reject: while a new
#: domain's senders (forwarders, mailing lists, a forgotten web app) are found,
#: a failing message lands in Junk rather than bouncing; go to p=reject once the
#: aggregate reports (rua) show every legitimate source aligned.
DMARC_POLICY = "quarantine"


@dataclass(frozen=True)
class Record:
    owner: str  # with the trailing dot
    type: str
    rdata: str  # zone-file syntax

    @classmethod
    def parse(cls, line: str) -> Record:
        owner, _, rtype, rdata = line.split(" ", 3)
        return cls(owner, rtype, rdata)

    def __str__(self) -> str:
        return f"{self.owner} IN {self.type} {self.rdata}"


def txtText(rdata: str) -> str:
    """The text of a zone-file TXT rdata (``"a" "b"`` -> ``ab``, RFC 7208 §3.3)."""
    return "".join(part for i, part in enumerate(rdata.split('"')) if i % 2)


def clientRecords(config, domains: Iterable[str]) -> list[str]:
    """The SRV records (RFC 6186, RFC 8314), and the autoconfig names with a web listener."""
    from twistmail.web import autoconfig

    clients = autoconfig.fromConfig(config)
    if clients is None:
        clients = autoconfig.ClientSettings(config.hostname, tuple(autoconfig.services(config)))
        webPort = None
    else:
        ports = [autoconfig.listenerPort(d) for d in config.listeners("https")]
        webPort = next((p for p in ports if p is not None), None)
    return autoconfig.dnsRecords(clients, domains, webPort)


def mtaStsRecords(config, domains: Iterable[str]) -> list[str]:
    """With ``[mta_sts] mode`` set: the policy's TXT and the policy host, per domain."""
    section = config["mta_sts"]
    if not section["mode"]:
        return []
    from twistmail.web import mtasts

    text = mtasts.policyText(section["mode"], section["mx"], section["max_age"])
    return mtasts.dnsRecords(text, domains, config.hostname)


def required(config, domain: str) -> list[tuple[str, list[Record]]]:
    """(what for, records) for C{domain}, in the order a sysadmin publishes them."""
    host = config.hostname.rstrip(".") + "."
    owner = f"{domain}."
    groups = [
        ("MX: where mail for the domain goes (RFC 5321 §5.1)",
         [Record(owner, "MX", f"10 {host}")]),
        # Stalwart prints the same: "mx" follows the MX record when addresses change;
        # -all says nobody else sends for the domain (RFC 7208 §5.1).
        ("SPF: who may send for the domain, and for our HELO name (RFC 7208)",
         [Record(owner, "TXT", '"v=spf1 mx -all"'), Record(host, "TXT", '"v=spf1 a -all"')]),
    ]
    sets = dkimkeys.listSets(config.dataDir, domain)
    groups.append(("DKIM: the public keys of twistmail dkim (RFC 6376, RFC 8463)"
                   if sets else f"DKIM: no keys; run: twistmail dkim generate {domain}",
                   [Record.parse(dkimkeys.zoneTXT(o, t)) for s in sets for o, t in s.records()]))
    groups.append(("DMARC: what receivers do with mail that fails (RFC 7489)",
                   [Record(f"_dmarc.{owner}", "TXT",
                           f'"v=DMARC1; p={DMARC_POLICY}; rua=mailto:postmaster@{domain}"')]))
    mtaSts = mtaStsRecords(config, [domain])
    groups.append(("MTA-STS: senders must use TLS to our MX (RFC 8461)" if mtaSts else
                   "MTA-STS: off ([mta_sts] mode)", [Record.parse(r) for r in mtaSts]))
    groups.append(("TLS-RPT: where senders report TLS failures (RFC 8460)",
                   [Record(f"_smtp._tls.{owner}", "TXT",
                           f'"v=TLSRPTv1; rua=mailto:postmaster@{domain}"')]))
    groups.append(("Client setup: the servers mail clients use (RFC 6186, RFC 8314)",
                   [Record.parse(r) for r in clientRecords(config, [domain])]))
    return groups


# -- --check ---------------------------------------------------------------------

OK, MISSING, DIFFERENT, ERROR = "OK", "missing", "different", "error"


def _normal(rtype: str, text: str) -> str:
    text = " ".join(text.lower().split())
    if rtype == "TXT":
        return "".join(text.split())  # "v=spf1 mx -all" vs "v=spf1  mx -all"; DKIM "k=rsa;p="
    return text


def _found(rtype: str, rdata) -> str:
    if rtype == "TXT":
        return b"".join(rdata.strings).decode("utf-8", "replace")
    return rdata.to_text()


def _tag(text: str) -> str:
    """``v=spf1`` of an SPF record: TXT records of one kind share the first tag."""
    return text.split(";", 1)[0].split(" ", 1)[0].strip().lower()


def check(record: Record, lookup) -> tuple[str, str]:
    """(status, what DNS has) for one expected record.

    @param lookup: C{lookup(name, rdtype) -> list of dnspython rdata}, raising
        L{twistmail.relay.mx.DNSFailure} (like C{DnsPythonMXResolver.resolveSync}).
    """
    from twistmail.relay.mx import DNSFailure

    want = txtText(record.rdata) if record.type == "TXT" else record.rdata
    try:
        answers = [_found(record.type, r) for r in lookup(record.owner, record.type)]
    except DNSFailure as e:
        if e.temporary:
            return ERROR, e.text.rsplit(": ", 1)[-1]  # "SERVFAIL, try again", "timed out, ..."
        answers = []
    if record.type == "TXT":
        answers = [a for a in answers if _tag(a) == _tag(want)]
    if any(_normal(record.type, a) == _normal(record.type, want) for a in answers):
        return OK, want
    if not answers:
        return MISSING, "-"
    return DIFFERENT, " | ".join(sorted(answers))


def checkAll(groups, lookup) -> tuple[list[tuple[str, str, str, str]], bool]:
    """Table rows (name, type, status, found) and whether every record is OK."""
    rows, good = [], True
    for _, records in groups:
        for record in records:
            status, found = check(record, lookup)
            good = good and status == OK
            rows.append((record.owner, record.type, status,
                         found if len(found) <= 60 else found[:57] + "..."))
    return rows, good
