"""MTA-STS (RFC 8461): TXT record and policy parsing, MX pattern matching."""

from __future__ import annotations

import pytest

from twistmail.mtasts import (
    ENFORCE,
    MAX_POLICY_BYTES,
    NONE,
    Policy,
    PolicyError,
    mxMatches,
    parsePolicy,
    parseRecord,
)

GOOD = b"version: STSv1\r\nmode: enforce\r\nmx: mx1.example.test\r\nmx: *.mail.example.test\r\n" \
       b"max_age: 86400\r\n"


def test_a_valid_policy():
    policy = parsePolicy(GOOD, "abc")
    assert policy == Policy(ENFORCE, ("mx1.example.test", "*.mail.example.test"), 86400, "abc")


def test_lf_line_endings_and_unknown_keys_are_accepted():
    policy = parsePolicy(GOOD.replace(b"\r\n", b"\n") + b"future_key: x\n")
    assert policy.mode == ENFORCE and policy.maxAge == 86400


def test_mode_none_needs_no_mx():
    assert parsePolicy(b"version: STSv1\nmode: none\nmax_age: 0\n").mode == NONE


@pytest.mark.parametrize("body", [
    b"",
    b"<html>hello</html>",
    GOOD.replace(b"STSv1", b"STSv2"),
    GOOD.replace(b"enforce", b"Enforce"),
    GOOD.replace(b"86400", b"31557601"),
    GOOD.replace(b"86400", b"-1"),
    GOOD.replace(b"86400", b"99999999999999999999"),
    GOOD.replace(b"mx1.example.test", b"mx1.example.test."),
    GOOD.replace(b"mx1.example.test", b"*.*.example.test"),
    GOOD.replace(b"mx1.example.test", b"mx1 .example.test"),
    b"version: STSv1\nmode: enforce\nmax_age: 86400\n",  # no mx
    b"\xff\xfe" + GOOD,
    GOOD + b"x" * MAX_POLICY_BYTES,
])
def test_invalid_policies_are_refused(body):
    with pytest.raises(PolicyError):
        parsePolicy(body)


def test_record_id():
    assert parseRecord(["v=STSv1; id=20160831085700Z;"]) == "20160831085700Z"
    assert parseRecord(["v=spf1 -all"]) is None
    assert parseRecord([]) is None


@pytest.mark.parametrize("texts", [
    ["v=STSv1; id=a", "v=STSv1; id=b"],
    ["v=STSv1;"],
    ["v=STSv1; id=has-dash"],
    ["v=STSv1; id=" + "a" * 33],
    ["v=STSv1x; id=a"],
])
def test_invalid_records_are_refused(texts):
    with pytest.raises(PolicyError):
        parseRecord(texts)


@pytest.mark.parametrize("pattern, host, expected", [
    ("mx.example.test", "mx.example.test", True),
    ("mx.example.test", "MX.Example.Test.", True),
    ("mx.example.test", "mx2.example.test", False),
    ("*.example.test", "mx.example.test", True),
    ("*.example.test", "example.test", False),
    ("*.example.test", "a.b.example.test", False),  # one label only (RFC 8461 §4.1)
    ("*.example.test", ".example.test", False),
])
def test_mx_patterns(pattern, host, expected):
    assert mxMatches(pattern, host) is expected
