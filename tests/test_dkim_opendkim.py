"""Our DKIM signatures checked by an independent verifier: ``opendkim-testmsg``
(libopendkim, Debian's opendkim-tools), each signature on its own.

libopendkim looks keys up through /etc/resolv.conf and has no option naming a
DNS server or a port, so it runs in private user, mount and network namespaces
where tests/dnsserver.py answers on 127.0.0.1:53 (see tests/resolvns.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from test_dkimsign import MESSAGE

from twistmail import dkimkeys
from twistmail.dkimkeys import KeyRing
from twistmail.dkimsigner import Signer

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def signed(tmp_path_factory):
    """(zone file, the message with both signatures, with only the Ed25519 one, only the RSA one)."""
    tmp = tmp_path_factory.mktemp("opendkim")
    data = str(tmp / "data")
    keys = dkimkeys.generate(data, "example.test", "s1")
    zone = tmp / "zone.json"
    zone.write_text(json.dumps({owner: [text] for owner, text in keys.records()}))
    both = Signer(KeyRing(data)).sign(MESSAGE)
    ed, rsa = both.split(b"DKIM-Signature:")[1:]
    rsa, body = rsa.split(b"\r\nFrom:", 1)
    body = b"From:" + body
    return str(zone), both, b"DKIM-Signature:" + ed + body, b"DKIM-Signature:" + rsa + b"\r\n" + body


def opendkim(zone: str, message: bytes) -> subprocess.CompletedProcess:
    # Root needs no user namespace (some hosts turn those off); anyone else does.
    user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    return subprocess.run(["unshare", *user, "--mount", "--net", sys.executable,
                           os.path.join(HERE, "resolvns.py"), zone, "--", "opendkim-testmsg"],
                          input=message, capture_output=True, timeout=60)


def test_opendkim_verifies_the_ed25519_and_the_rsa_signature_each(signed):
    zone, both, ed, rsa = signed
    assert b"a=ed25519-sha256" in ed and b"a=rsa-sha256" not in ed
    assert b"a=rsa-sha256" in rsa and b"a=ed25519-sha256" not in rsa
    for message in (both, ed, rsa):
        result = opendkim(zone, message)
        assert (result.returncode, result.stderr) == (0, b"")


@pytest.mark.parametrize("change", ["body", "second From", "no key in DNS"])
def test_opendkim_fails_a_changed_message_or_a_missing_key(signed, tmp_path, change):
    zone, _, ed, rsa = signed
    for message in (ed, rsa):
        if change == "body":
            message = message.replace(b"see you.", b"send money.")
        elif change == "second From":
            message = b"From: ceo@example.test\r\n" + message
        else:
            zone = str(tmp_path / "empty.json")
            with open(zone, "w") as f:
                f.write("{}")
        result = opendkim(zone, message)
        assert result.returncode != 0 and b"dkim_" in result.stderr, result
