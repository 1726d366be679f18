"""A little Internet on loopback for relay tests: DNS zones, receiving SMTP servers, a relay.

Every MX host is a loopback address (Linux routes all of 127.0.0.0/8 to lo)
and every receiving server listens on the same port, which the relay under
test uses as its ``[relay] smtp_port``::

    remote.test   MX 10 mx.remote.test      -> 127.0.0.1   (the sink)
    backup.test   MX 10 mx1.backup.test     -> 127.0.0.2   (nothing listens: down)
                  MX 20 mx2.backup.test     -> 127.0.0.3   (the sink)
    v6.test       MX 10 mx.v6.test          -> ::1 (down), 127.0.0.1 (the sink)
    dead.test     MX 10 mx.dead.test        -> 127.0.0.2   (down)
    nomail.test   MX 0 .                    (RFC 7505 null MX)
    smarthost.test                          -> 127.0.0.1
    broken.test   SERVFAIL
"""

from __future__ import annotations

import email
import email.policy
import os

from dnsserver import AAAA, MX, A, startDNS
from smtpsink import startSink
from support import freePort, maildirFiles

ZONE = {
    "remote.test": [MX(10, "mx.remote.test")],
    "mx.remote.test": [A("127.0.0.1")],
    "backup.test": [MX(10, "mx1.backup.test"), MX(20, "mx2.backup.test")],
    "mx1.backup.test": [A("127.0.0.2")],
    "mx2.backup.test": [A("127.0.0.3")],
    "v6.test": [MX(10, "mx.v6.test")],
    "mx.v6.test": [AAAA("::1"), A("127.0.0.1")],
    "dead.test": [MX(10, "mx.dead.test")],
    "mx.dead.test": [A("127.0.0.2")],
    "nomail.test": [MX(0, "")],
    "smarthost.test": [A("127.0.0.1")],
    "xn--bcher-kva.test": [MX(10, "mx.remote.test")],  # bücher.test (IDNA A-label)
}


class Internet:
    def __init__(self) -> None:
        self.dns = startDNS(ZONE, servfail={"broken.test"})
        self.port = freePort()
        self.sink = startSink(self.port, interfaces=("127.0.0.1", "127.0.0.3"))

    def relayConfig(self, **overrides) -> dict:
        """[relay] settings for a server that uses this DNS and these sinks."""
        relay = {"nameservers": [self.dns.nameserver], "smtp_port": self.port,
                 "trusted_networks": ["127.0.0.0/8"], "retry_min": 1, "retry_max": 2,
                 "dns_timeout": 2, "connect_timeout": 2, "command_timeout": 10}
        relay.update(overrides)
        return relay

    def stop(self) -> None:
        self.sink.stop()
        self.dns.stop()


def mailbox(dataDir: str, address: str) -> list:
    """The messages in C{address}'s INBOX new/, parsed."""
    local, domain = address.split("@")
    new = os.path.join(dataDir, "mail", domain, local, "new")
    out = []
    for name in maildirFiles(dataDir, address):
        with open(os.path.join(new, name), "rb") as f:
            out.append(email.message_from_bytes(f.read(), policy=email.policy.default))
    return out


def dsnRecipients(message) -> list[dict]:
    """The per-recipient blocks of a DSN, unfolded."""
    assert message.get_content_type() == "multipart/report", message.get_content_type()
    assert message.get_param("report-type") == "delivery-status"
    [status] = [p for p in message.iter_parts() if p.get_content_type() == "message/delivery-status"]
    return [{k: " ".join(v.split()) for k, v in block.items()}
            for block in status.get_payload()[1:]]


def queueIds(dataDir: str) -> list[str]:
    from twistmail.relay.queue import listIds

    return sorted(listIds(os.path.join(dataDir, "queue")))
