"""MTA-STS on the sending side, end to end (RFC 8461 §5): the server makeService builds
fetches the recipient domain's policy and will not deliver under ``mode: enforce``
without verified TLS to a listed MX.

    sts.test   MX 10 mx.sts.test -> 127.0.0.1 (the sink)
    _mta-sts.sts.test TXT "v=STSv1; id=one"; mta-sts.sts.test -> 127.0.0.1 (policy server)
"""

from __future__ import annotations

import json
import os

import pytest
from certs import makeCerts
from dnsserver import MX, A, startDNS
from hostile import errors, logged  # noqa: F401 - logged is a fixture
from relayenv import ZONE, Internet, queueIds
from serverproc import waitUntil
from stsserver import POLICY, TXT, startPolicyServer
from support import startServer
from test_relay_e2e import relay, submit  # noqa: F401 - relay is a fixture
from twisted.logger import formatEvent

STS_ZONE = {
    "sts.test": [MX(10, "mx.sts.test")],
    "mx.sts.test": [A("127.0.0.1")],
    "_mta-sts.sts.test": [TXT("v=STSv1; id=one")],
    "mta-sts.sts.test": [A("127.0.0.1")],
}


class StsInternet(Internet):
    """relayenv's Internet plus sts.test, its policy server and certificates."""

    def __init__(self, tmp_path) -> None:
        super().__init__()
        self.dns.stop()
        self.dns = startDNS({**ZONE, **STS_ZONE}, servfail={"broken.test"})
        self.mxCerts = makeCerts("mx.sts.test")
        policyCerts = makeCerts("mta-sts.sts.test")
        self.caFile = tmp_path / "ca.pem"
        self.caFile.write_bytes(self.mxCerts.caPEM + policyCerts.caPEM)
        self.policy = startPolicyServer(policyCerts)

    def relayConfig(self, **overrides) -> dict:
        return super().relayConfig(**{"mta_sts_port": self.policy.port,
                                      "mta_sts_ca_file": str(self.caFile), **overrides})

    def stop(self) -> None:
        self.policy.stop()
        super().stop()


@pytest.fixture
def net(tmp_path):
    internet = StsInternet(tmp_path)
    yield internet
    internet.stop()


def lastReply(dataDir: str, queueId: str) -> str:
    try:
        with open(os.path.join(dataDir, "queue", queueId + ".json")) as f:
            return json.load(f)["recipients"][0]["last_reply"]
    except FileNotFoundError:
        return ""


def test_enforce_without_starttls_stays_queued_not_sent_in_clear(net, relay, dataDir, logged):  # noqa: F811
    server = relay()  # the sink offers no STARTTLS: what an attacker stripping it looks like
    queueId = submit(server.smtpPort, ["bob@sts.test"])
    reply = waitUntil(lambda: lastReply(dataDir, queueId), 15, "a deferred attempt",
                      describe=lambda: "\n".join(map(formatEvent, logged)))
    assert reply.startswith("451 4.7.5 ") and "MTA-STS" in reply
    assert net.sink.messages == [] and net.sink.connections >= 1
    assert not any(line.startswith("MAIL") for _, line in net.sink.transcript)
    assert queueIds(dataDir) == [queueId]
    assert net.policy.resource.requests == [b"mta-sts.sts.test"]


def test_enforce_with_a_certificate_for_another_name_stays_queued(net, relay, dataDir, tmp_path):  # noqa: F811
    other = makeCerts("other.test")  # from a CA we trust, for a name that is not the MX's
    net.sink.script.tlsOptions = other.serverOptions()
    caFile = tmp_path / "ca-other.pem"
    caFile.write_bytes(net.caFile.read_bytes() + other.caPEM)
    server = relay(mta_sts_ca_file=str(caFile))
    queueId = submit(server.smtpPort, ["bob@sts.test"])
    reply = waitUntil(lambda: lastReply(dataDir, queueId), 15, "a deferred attempt")
    assert reply.startswith("451 4.7.5 ") and "MTA-STS" in reply
    assert net.sink.messages == []


def test_enforce_with_a_listed_mx_that_is_not_in_the_policy_stays_queued(net, relay, dataDir):  # noqa: F811
    net.policy.resource.body = POLICY.replace(b"mx.sts.test", b"other.sts.test")
    net.sink.script.tlsOptions = net.mxCerts.serverOptions()
    server = relay()
    queueId = submit(server.smtpPort, ["bob@sts.test"])
    reply = waitUntil(lambda: lastReply(dataDir, queueId), 15, "a deferred attempt")
    assert reply.startswith("451 4.7.5 ") and "lists none of its MX hosts" in reply
    assert net.sink.connections == 0


def test_enforce_with_valid_tls_delivers(net, relay, dataDir, logged):  # noqa: F811
    net.sink.script.tlsOptions = net.mxCerts.serverOptions()
    server = relay()
    submit(server.smtpPort, ["bob@sts.test"])
    waitUntil(lambda: net.sink.messages, 15, "delivery over verified TLS")
    assert net.sink.messages[0].tls
    assert net.policy.resource.requests == [b"mta-sts.sts.test"]
    waitUntil(lambda: not queueIds(dataDir), 15, "the queue to empty")
    assert any("mta-sts domain=sts.test result=enforce id=one" in formatEvent(e) for e in logged)
    assert errors(logged) == []


def test_testing_mode_delivers_over_bad_tls_and_reports_the_failure(net, relay, dataDir, logged):  # noqa: F811
    net.policy.resource.body = POLICY.replace(b"enforce", b"testing")
    untrusted = makeCerts("mx.sts.test")  # right name, a CA we do not trust
    net.sink.script.tlsOptions = untrusted.serverOptions()
    server = relay()
    submit(server.smtpPort, ["bob@sts.test"])
    waitUntil(lambda: net.sink.messages, 15, "delivery in testing mode")
    assert net.sink.messages[0].tls  # opportunistic, as without a policy
    assert net.sink.connections == 2  # the verified attempt failed, then the usual one
    lines = [formatEvent(e) for e in logged]
    assert any("mta-sts domain=sts.test result=testing" in line for line in lines)
    failed = [line for line in lines if "relay id=" in line and "domain=sts.test" in line
              and "result=deferred" in line]
    assert failed, lines  # the failed verified attempt is in the log (and TLS-RPT when on)
    assert errors(logged) == []


def test_mta_sts_off_delivers_as_before(net, relay, dataDir):  # noqa: F811
    server = relay(mta_sts=False)
    submit(server.smtpPort, ["bob@sts.test"])
    waitUntil(lambda: net.sink.messages, 15, "delivery without MTA-STS")
    assert net.policy.resource.requests == []


def test_a_ca_file_without_certificates_stops_the_start_naming_the_key(net, dataDir, tmp_path):
    bad = tmp_path / "not-a-ca.pem"
    bad.write_text("hello\n")
    with pytest.raises(SystemExit) as e:  # twistd prints it as one line and exits
        startServer(dataDir, relay=net.relayConfig(mta_sts_ca_file=str(bad)))
    assert "[relay] mta_sts_ca_file" in str(e.value) and "Fix:" in str(e.value)
