"""REQUIRETLS (RFC 8689) in the relay's SMTP client: a message that asks for it goes
only over TLS verified for the next hop's name, to a hop that offers REQUIRETLS,
or it is returned; never a byte of it in clear text.  Against the scripted sink
on loopback (tests/smtpsink.py), with the sender tests' helpers."""

from __future__ import annotations

import pytest
from certs import makeCerts
from serverproc import waitUntil
from smtpsink import Script, startSink
from test_relay_sender import certs, policy, send, settings, smarthostSettings, stsSettings  # noqa: F401
from twisted.internet import reactor

from twistmail.relay.mx import Hop
from twistmail.relay.queue import QueueEntry, Recipient
from twistmail.relay.sender import FAILED, IMPLICIT, SENT, RelaySender
from twistmail.requiretls import saysTLSOptional

OFFERS = ("REQUIRETLS",)


def mailLines(sink) -> list[str]:
    return [line for who, line in sink.transcript if who == "C" and line.startswith("MAIL")]


@pytest.fixture
def sinks():
    """sinks(script) -> a started sink, stopped after the test."""
    started = []

    def start(script=None, **kw):
        started.append(startSink(script=script, **kw))
        return started[-1]

    yield start
    for sink in started:
        sink.stop()


def enforced(port=None) -> list[Hop]:
    """One MX host, named by MX records, that an MTA-STS policy in enforce mode lists."""
    return [Hop("localhost", ("127.0.0.1",), viaMX=True, policy=policy("enforce"))]


def sendRequired(sink, certs, tmp_path, hops=None, **kw):  # noqa: F811
    sender = RelaySender(reactor, stsSettings(sink.port, certs, tmp_path))
    return send(sender, hops or enforced(), requiretls=True, **kw)["bob@remote.test"]


def test_delivered_over_verified_tls_with_the_parameter_passed_on(certs, sinks, tmp_path):  # noqa: F811
    sink = sinks(Script(tlsOptions=certs.serverOptions(), tlsExtensions=OFFERS))
    result = sendRequired(sink, certs, tmp_path)
    assert result.kind == SENT
    assert sink.messages[0].tls
    assert mailLines(sink) == ["MAIL FROM:<a@example.test> REQUIRETLS"]


def test_without_starttls_nothing_is_sent_and_the_message_returned(certs, sinks, tmp_path):  # noqa: F811
    sink = sinks()  # no STARTTLS: what an attacker stripping it looks like
    result = sendRequired(sink, certs, tmp_path)
    assert result.kind == FAILED and result.status == "5.7.10", result.reply
    assert result.reply.startswith("550 5.7.10 REQUIRETLS: ")
    assert mailLines(sink) == [] and sink.dataSeen == [] and sink.connections == 1


def test_an_unverifiable_certificate_returns_the_message(certs, sinks, tmp_path):  # noqa: F811
    other = makeCerts("localhost")  # the right name, from a CA we do not trust
    sink = sinks(Script(tlsOptions=other.serverOptions(), tlsExtensions=OFFERS))
    result = sendRequired(sink, certs, tmp_path)
    assert result.kind == FAILED and result.status == "5.7.10", result.reply
    assert sink.dataSeen == [] and sink.connections == 1  # no retry in clear


def test_a_host_without_requiretls_is_quit_before_mail(certs, sinks, tmp_path):  # noqa: F811
    sink = sinks(Script(tlsOptions=certs.serverOptions()))
    result = sendRequired(sink, certs, tmp_path)
    assert result.kind == FAILED and result.status == "5.7.30", result.reply
    assert "does not offer REQUIRETLS" in result.reply
    assert mailLines(sink) == [] and sink.dataSeen == []
    waitUntil(lambda: ("C", "QUIT") in sink.transcript, 10, "QUIT")  # RFC 8689 §4.2.1


def test_the_next_mx_is_tried_when_one_falls_short(certs, sinks, tmp_path):  # noqa: F811
    weak = sinks(Script(tlsOptions=certs.serverOptions()))
    strong = sinks(Script(tlsOptions=certs.serverOptions(), tlsExtensions=OFFERS),
                   port=weak.port, interfaces=("127.0.0.3",))
    hops = [Hop("localhost", ("127.0.0.1",), 10, viaMX=True, policy=policy("enforce")),
            Hop("localhost", ("127.0.0.3",), 20, viaMX=True, policy=policy("enforce"))]
    assert sendRequired(weak, certs, tmp_path, hops).kind == SENT
    assert weak.dataSeen == [] and len(strong.messages) == 1


@pytest.mark.parametrize("mode", [None, "testing"])
def test_an_mx_host_not_vouched_for_by_mta_sts_enforce_is_never_tried(certs, sinks, tmp_path,  # noqa: F811
                                                                       mode):
    """We do not validate DNSSEC, so only an enforce policy vouches for an MX host name."""
    sink = sinks(Script(tlsOptions=certs.serverOptions(), tlsExtensions=OFFERS))
    hop = Hop("localhost", ("127.0.0.1",), viaMX=True, policy=mode and policy(mode))
    result = sendRequired(sink, certs, tmp_path, [hop])
    assert result.kind == FAILED and result.status == "5.7.10"
    assert "MTA-STS" in result.reply and "DNSSEC" in result.reply
    assert sink.connections == 0


def test_the_domain_itself_without_mx_needs_no_policy(certs, sinks, tmp_path):  # noqa: F811
    """RFC 5321 §5.1's implicit MX: no MX answer to vouch for, the certificate does."""
    sink = sinks(Script(tlsOptions=certs.serverOptions(), tlsExtensions=OFFERS))
    assert sendRequired(sink, certs, tmp_path, [Hop("localhost", ("127.0.0.1",))]).kind == SENT
    assert mailLines(sink) == ["MAIL FROM:<a@example.test> REQUIRETLS"]


def test_a_report_from_the_null_sender_passes_it_on_where_offered(certs, sinks, tmp_path):  # noqa: F811
    sink = sinks(Script(tlsOptions=certs.serverOptions(), tlsExtensions=OFFERS))
    assert sendRequired(sink, certs, tmp_path, mailFrom="").kind == SENT
    assert mailLines(sink) == ["MAIL FROM:<> REQUIRETLS"]


def test_a_report_from_the_null_sender_is_not_lost_where_it_is_not(certs, sinks, tmp_path):  # noqa: F811
    """RFC 8689 §5: REQUIRETLS does not make a report from <> be discarded."""
    sink = sinks()
    sender = RelaySender(reactor, settings(sink.port))
    result = send(sender, [Hop("localhost", ("127.0.0.1",), viaMX=True)], mailFrom="",
                  requiretls=True)["bob@remote.test"]
    assert result.kind == SENT and mailLines(sink) == ["MAIL FROM:<>"]


def test_tls_required_no_overrides_an_mta_sts_policy(certs, sinks, tmp_path):  # noqa: F811
    sink = sinks()  # no STARTTLS, under an enforce policy: held back but for the header
    sender = RelaySender(reactor, stsSettings(sink.port, certs, tmp_path))
    result = send(sender, enforced(), tls_optional=True)["bob@remote.test"]
    assert result.kind == SENT and len(sink.messages) == 1


def test_smarthost_with_opportunistic_tls_is_held_to_verified_tls(certs, sinks, tmp_path):  # noqa: F811
    sink = sinks(Script(users={"relayuser": "s3cret pass"}, authNeedsTLS=False))
    sender = RelaySender(reactor, smarthostSettings(sink.port, certs, tmp_path,
                                                    tls="opportunistic"))
    result = send(sender, [Hop("localhost", ("127.0.0.1",))], requiretls=True)["bob@remote.test"]
    assert result.kind == FAILED and result.status == "5.7.10"
    assert sink.dataSeen == [] and not [line for _, line in sink.transcript
                                        if line.startswith("AUTH")]


def test_smarthost_over_smtps_delivers_with_the_parameter(certs, sinks, tmp_path):  # noqa: F811
    sink = sinks(Script(users={"relayuser": "s3cret pass"}, tlsExtensions=OFFERS),
                 implicitTLS=certs.serverOptions())
    sender = RelaySender(reactor, smarthostSettings(sink.port, certs, tmp_path, tls=IMPLICIT))
    result = send(sender, [Hop("localhost", ("127.0.0.1",))], requiretls=True)["bob@remote.test"]
    assert result.kind == SENT and sink.messages[0].user == "relayuser"
    assert mailLines(sink) == ["MAIL FROM:<a@example.test> REQUIRETLS"]


def test_the_flag_is_kept_in_the_queue_file():
    entry = QueueEntry("0123456789ABCDEF", "a@example.test", [Recipient("b@remote.test")], 1.0,
                       "smtp", extra={"requiretls": True, "tls_optional": True})
    again = QueueEntry.fromJSON(entry.toJSON(), "test")
    assert again.requiresTLS() and not again.tlsOptional()  # RFC 8689 §4.1: the parameter wins
    assert not QueueEntry.fromJSON(QueueEntry("0123456789ABCDEF", "", [], 1.0, "smtp").toJSON(),
                                   "test").requiresTLS()


@pytest.mark.parametrize("section, says", [
    (b"Subject: x\r\nTLS-Required: No\r\n", True),
    (b"tls-required:no\r\n", True),
    (b"TLS-Required:\r\n  no \r\nSubject: x\r\n", True),
    (b"TLS-Required: Yes\r\n", False),
    (b"X-TLS-Required: No\r\n", False),
    (b"Subject: TLS-Required: No\r\n", False),
])
def test_the_tls_required_header_field(section, says):
    assert saysTLSOptional(section) is says
