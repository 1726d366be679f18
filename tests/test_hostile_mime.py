"""Hostile *messages*: mail anyone can send to a user, crafted against the IMAP server.

FETCH BODYSTRUCTURE/ENVELOPE and SEARCH parse the stored message with the
stdlib ``email`` package, which raises on some malformed input and is
quadratic on some more.  One such message in a folder must not make FETCH
or SEARCH fail (a client retries forever, the user cannot read the folder)
nor cost the server minutes of CPU (worker threads hold the GIL).
"""

from __future__ import annotations

import time

import pytest
from hostile import errors, logged  # noqa: F401 - logged is a fixture
from imapwire import RawIMAP
from test_imap_server import msg, send

from twistmail.protocols.imap import response, search, structure

CRAFTED = {
    # RFC 2231: name*= and name*0= together made the stdlib sort None against 0 (TypeError)
    "rfc2231 mixed continuations": b"Content-Type: multipart/mixed; boundary*=x; boundary*0=y\r\n"
                                   b"Content-Disposition: attachment; filename*=a; filename*0=b\r\n",
    # a continuation number int() refuses (over 4300 digits): ValueError
    "rfc2231 huge continuation": b"Content-Type: text/plain; name*" + b"9" * 5000 + b"=x\r\n",
    # collapse_rfc2231_value: the idna codec refuses errors="replace" (UnicodeError)
    "rfc2231 idna charset": b"Content-Type: multipart/mixed; boundary*=idna''%ff%fe\r\n",
    # "(((((...": the stdlib address parser recurses once per comment level
    "nested comments in From": b"From: " + b"(" * 3000 + b"x@remote.test\r\n",
    # a charset name with a NUL: bytes.decode raises ValueError
    "NUL in charset": b"Content-Type: text/plain; charset=\"utf-8\x00\"\r\n",
    # a codec that refuses errors="replace": UnicodeError
    "idna charset": b"Content-Type: text/plain; charset=idna\r\n",
    # "a" is not base64: decode_header raises HeaderParseError
    "bad encoded word": b"Subject: =?utf-8?b?a?= =?utf-8?q?x?=\r\n",
}


@pytest.mark.parametrize("name", sorted(CRAFTED))
def test_crafted_message_can_be_fetched_and_searched(server, logged, name):  # noqa: F811
    """Each of these made FETCH BODYSTRUCTURE/ENVELOPE or SEARCH answer NO [SERVERBUG]
    for the message (or for every message fetched or searched with it)."""
    crafted = b"To: alice@example.test\r\n" + CRAFTED[name] + b"\r\nneedle in the body\r\n"
    send(server, crafted, msg(2, "needle"))
    client = RawIMAP(server.imapPort)
    client.login()
    client.ok("SELECT INBOX")
    untagged = client.ok("FETCH 1:2 (BODYSTRUCTURE ENVELOPE BODY.PEEK[1] BODY.PEEK[TEXT])")
    assert sum(line.startswith(b"* 1 FETCH (") for line in untagged) == 1
    for key, found in [("SUBJECT needle", b"2"), ("TEXT needle", b"1 2"), ("BODY needle", b"1"),
                       ("FROM s2@remote", b"2")]:
        assert client.ok("SEARCH " + key)[-1] == b"* SEARCH " + found, key
    client.close()
    assert errors(logged) == []


def _fetchAndSearch(data: bytes) -> float:
    """CPU seconds to compute BODYSTRUCTURE and ENVELOPE and to run SEARCH TEXT on C{data}.

    CPU time of this process, not wall time: other tests running in parallel
    (pytest-xdist) or other load on the machine must not make it fail."""
    start = time.process_time()
    root = structure.parse(data)
    response.encode(structure.bodyStructure(root, True))
    response.encode(structure.envelope(root))

    class Stored:
        flags, uid, size, internalDate = frozenset(), 1, len(data), 0

    candidate = search.Candidate(1, 1, Stored, False, data)
    search._Body("needle", withHeader=True).match(candidate)
    search._Header("subject", "needle").match(candidate)
    return time.process_time() - start


SLOW = {
    # email.message._parseparam recounts quotes at every ";": quadratic (was ~10 s)
    "semicolons in a parameter": b'Content-Type: multipart/mixed; boundary="' + b";" * 80_000 +
                                 b'"\r\n\r\nbody\r\n',
    # email.header.decode_header is quadratic in the number of encoded words (was ~15 s)
    "encoded words": b"Subject: " + b"=?utf-8?q?a?= " * 100_000 + b"\r\n\r\nbody\r\n",
    # MAX_PARTS stopped parsing, not the search for more delimiters (was ~5 s)
    "a hundred thousand parts": b"Content-Type: multipart/mixed; boundary=b\r\n\r\n" +
                                b"--b\r\n\r\nx\r\n" * 100_000 + b"--b--\r\n",
    # every nesting level scanned its body with a regex (was ~8 s)
    "deep nesting around a big body": b"".join(
        b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i) for i in range(40)) +
        b"\r\n" + b"x" * 10_000_000,
}


@pytest.mark.parametrize("name", sorted(SLOW))
def test_crafted_message_costs_linear_time(name):
    """Each of these took seconds to minutes of CPU (quadratic, or a slow scan per
    level) for every FETCH BODYSTRUCTURE or SEARCH; now well under a second."""
    assert _fetchAndSearch(SLOW[name]) < 3.0
