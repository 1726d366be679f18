"""TLS-RPT (RFC 8460) reports written from what the relay sender records."""

from __future__ import annotations

import json

from twistmail.mtasts import Policy
from twistmail.relay import tlsrpt
from twistmail.relay.tlsrpt import TLSReports

POLICY = Policy("enforce", ("mx.example.test",), 86400, "id1")


def test_one_json_report_per_domain_and_day(tmp_path):
    reports = TLSReports("relay.test", now=lambda: 86400 * 3 + 5)
    reports.record("Example.test", POLICY, None, "mx.example.test", "127.0.0.1")
    reports.record("example.test", POLICY, "starttls-not-supported", "mx.example.test", "127.0.0.1")
    reports.record("example.test", POLICY, "starttls-not-supported", "mx.example.test", "127.0.0.1")
    [path] = reports.flush(str(tmp_path))
    assert path.endswith("1970-01-04_example.test.json")
    data = json.loads(open(path).read())
    [policy] = data["policies"]
    assert policy["policy"]["policy-domain"] == "example.test"
    assert policy["summary"] == {"total-successful-session-count": 1,
                                 "total-failure-session-count": 2}
    assert policy["failure-details"] == [{
        "result-type": "starttls-not-supported", "receiving-mx-hostname": "mx.example.test",
        "receiving-ip": "127.0.0.1", "failed-session-count": 2}]


def test_the_table_is_bounded(monkeypatch):
    monkeypatch.setattr(tlsrpt, "MAX_DOMAINS", 3)
    reports = TLSReports("relay.test", now=lambda: 0)
    for i in range(10):
        reports.record(f"d{i}.test", POLICY, "validation-failure", "mx", "127.0.0.1")
    assert len(reports._days) == 3


def test_a_domain_that_is_not_a_host_name_is_never_a_path(tmp_path):
    reports = TLSReports("relay.test", now=lambda: 0)
    reports.record("../../etc", POLICY, "validation-failure", "mx", "127.0.0.1")
    assert reports.flush(str(tmp_path)) == []
