"""Our signer against our verifier: what `twistmail dkim generate` makes and the
dkim-sign filter signs passes spf-dkim-dmarc through DNS on loopback, and the
From-spoofing trick on a signed message (a second From on top) is refused."""

from __future__ import annotations

from dnsserver import TXT, A, startDNS
from mailauth import authResults, makeVerifier, message, runHook, session

from twistmail import dkimkeys
from twistmail.dkimkeys import KeyRing
from twistmail.dkimsigner import Signer


def test_our_signatures_pass_the_inbound_verifier(tmp_path):
    data = str(tmp_path / "data")
    keys = dkimkeys.generate(data, "good.example", "s1")
    zone = {o: [TXT(*[t[i:i + 255] for i in range(0, len(t), 255)])] for o, t in keys.records()}
    zone.update({"good.example": [TXT("v=spf1 ip4:192.0.2.10 -all")],
                 "mail.good.example": [A("192.0.2.10"), TXT("v=spf1 a -all")],
                 "_dmarc.good.example": [TXT("v=DMARC1; p=reject")]})
    server = startDNS(zone)
    try:
        signed = Signer(KeyRing(data)).sign(message())
        ar = authResults(runHook(makeVerifier(server), session(), signed))
        forged = b"From: ceo@good.example\r\n" + signed
        refused = runHook(makeVerifier(server), session(), forged)
    finally:
        server.stop()
    assert "dkim=pass header.d=good.example header.s=s1-ed25519" in ar
    assert "dkim=pass header.d=good.example header.s=s1-rsa" in ar
    assert "dmarc=pass" in ar
    assert (refused.action, refused.code) == ("reject", 550)
    assert refused.text.startswith("5.7.1 ") and "2 From header fields" in refused.text
