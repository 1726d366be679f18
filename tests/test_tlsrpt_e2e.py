"""TLS-RPT through the server makeService builds: reports in the data directory, and a
finished day's report mailed to the rua address published in DNS, once, across a restart.

DNS and the receiving MX are the loopback Internet of tests/relayenv.py, with
``_smtp._tls`` TXT records added for this module.
"""

from __future__ import annotations

import email
import email.policy
import gzip
import json
import os
import time

import pytest
import relayenv
from dnsserver import TXT
from relayenv import Internet
from serverproc import waitUntil
from support import startServer

from twistmail.mtasts import Policy
from twistmail.relay.tlsrpt import TLSReports

POLICY = Policy("enforce", ("mx.remote.test",), 86400, "id1")
RUA = "tlsrpt@remote.test"


@pytest.fixture
def net(monkeypatch):
    for domain in ("remote.test", "backup.test"):
        monkeypatch.setitem(relayenv.ZONE, f"_smtp._tls.{domain}",
                            [TXT(f"v=TLSRPTv1; rua=mailto:{RUA}")])
    internet = Internet()
    yield internet
    internet.stop()


def yesterdaysReport(dataDir: str, domain: str) -> dict:
    """Write yesterday's report for C{domain} where the server keeps them; its JSON."""
    reports = TLSReports("mx.example.test", now=lambda: time.time() - 86400)
    reports.record(domain, POLICY, "validation-failure", "mx.remote.test", "127.0.0.1")
    reports.record(domain, POLICY, None, "mx.remote.test", "127.0.0.1")
    [path] = reports.flush(os.path.join(dataDir, "tlsrpt"))
    with open(path) as f:
        return json.load(f)


def reportMails(sink) -> dict:
    """{TLS-Report-Domain: [(envelope sender, recipients, parsed message)]} the sink got."""
    out: dict = {}
    for received in sink.messages:
        message = email.message_from_bytes(received.data, policy=email.policy.default)
        out.setdefault(message["TLS-Report-Domain"], []).append(
            (received.sender, received.recipients, message))
    return out


def test_the_service_wired_by_makeService_writes_reports_into_the_data_dir(net, dataDir):
    server = startServer(dataDir, relay=net.relayConfig())
    try:
        reports = server.service.getServiceNamed("tls reports")._reports
        reports.record("remote.test", POLICY, None, "mx.remote.test", "127.0.0.1")
    finally:
        server.stop()
    path = os.path.join(dataDir, "tlsrpt", f"{reports.today()}_remote.test.json")
    with open(path) as f:
        assert json.load(f)["policies"][0]["summary"]["total-successful-session-count"] == 1


def test_a_finished_day_is_mailed_to_the_rua_mx_once_across_a_restart(net, dataDir):
    report = yesterdaysReport(dataDir, "remote.test")
    server = startServer(dataDir, relay=net.relayConfig(tlsrpt_mail=True))
    try:
        waitUntil(lambda: "remote.test" in reportMails(net.sink), 15, "the report mail")
    finally:
        server.stop()
    [(sender, recipients, message)] = reportMails(net.sink)["remote.test"]
    assert (sender, recipients) == ("", [RUA])
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "tlsrpt"
    assert message["TLS-Report-Submitter"] == "mx.example.test"
    [attachment] = [p for p in message.iter_parts()
                    if p.get_content_type() == "application/tlsrpt+gzip"]
    assert attachment.get_filename().startswith("mx.example.test!remote.test!")
    assert json.loads(gzip.decompress(attachment.get_content())) == report

    # After a restart, only the report not mailed yet goes out.
    yesterdaysReport(dataDir, "backup.test")
    server = startServer(dataDir, relay=net.relayConfig(tlsrpt_mail=True))
    try:
        waitUntil(lambda: "backup.test" in reportMails(net.sink), 15, "the second report mail")
    finally:
        server.stop()
    mails = reportMails(net.sink)
    assert sorted(mails) == ["backup.test", "remote.test"]
    assert [len(m) for m in mails.values()] == [1, 1]


def test_reports_are_not_mailed_by_default(net, dataDir):
    server = startServer(dataDir, relay=net.relayConfig())
    try:
        assert server.service.getServiceNamed("tls reports")._mailer is None
    finally:
        server.stop()
