# -*- test-case-name: tests.test_dns_cli -*-
"""``twistmail dns DOMAIN [--check]``: the records to publish, and whether DNS has them."""

from __future__ import annotations

import ipaddress

from twistmail import config as configmod
from twistmail import dkimkeys, dnsrecords
from twistmail.cli.output import table


class RecordsCLIError(Exception):
    """Printed as 'twistmail: error: ...' with exit status 1."""

    def __init__(self, message: str, output: str = "") -> None:
        super().__init__(message)
        self.output = output  # printed before the error (the --check table)


def register(sub) -> None:
    p = sub.add_parser("dns", help="the DNS records a domain needs (MX, SPF, DKIM, DMARC, "
                       "MTA-STS, TLS-RPT, SRV); --check looks them up")
    p.add_argument("domain")
    p.add_argument("--check", action="store_true", help="look each record up and mark it OK, "
                   "missing or different; exit status 1 unless all are OK")
    p.add_argument("--nameserver", metavar="ADDRESS[:PORT]", help="ask this server (default: "
                   "[relay] nameservers, else /etc/resolv.conf)")


def run(args, config: configmod.Config) -> str:
    domain = dkimkeys.checkDomain(args.domain)  # DKIMKeyError: printed by the caller
    groups = dnsrecords.required(config, domain)
    if not args.check:
        lines = []
        for title, records in groups:
            lines.append(f"; {title}")
            lines += [str(r) for r in records]
        return "\n".join(lines)
    from twistmail.relay.mx import DnsPythonMXResolver

    relay = config["relay"]
    if args.nameserver:
        try:
            servers = [configmod.hostPort(args.nameserver, 53)]
            ipaddress.ip_address(servers[0][0])
        except ValueError:
            raise RecordsCLIError(f"--nameserver {args.nameserver!r}: give an IP address, "
                                  "with :PORT if not 53 (like 127.0.0.1:5353)") from None
    else:
        servers = [configmod.hostPort(ns, 53) for ns in relay["nameservers"]]
    resolver = DnsPythonMXResolver(servers, relay["dns_timeout"], run=None)
    rows, good = dnsrecords.checkAll(groups, resolver.resolveSync)
    output = table(["NAME", "TYPE", "STATUS", "IN DNS"], rows)
    if not good:
        bad = sum(r[2] != dnsrecords.OK for r in rows)
        raise RecordsCLIError(f"{bad} of {len(rows)} records are not as they should be; publish "
                              f"them as twistmail dns {domain} prints them", output)
    return output + f"\nall {len(rows)} records OK"
