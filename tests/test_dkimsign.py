"""DKIM signing: keys made by ``twistmail dkim``, both signatures (Ed25519, RSA) verify
against the key records served by a loopback DNS server, and tampering breaks them."""

from __future__ import annotations

import dataclasses
import email
import email.policy
import io
import os
import shutil

import dkim
import pytest
from dnsserver import TXT, startDNS
from twisted.internet import defer

from twistmail import dkimkeys
from twistmail.dkimkeys import KeyRing
from twistmail.dkimsigner import Signer, fromDomain, headerList
from twistmail.filters import dkimprocess
from twistmail.filters.dkimsign import DKIMSignFilter, DKIMSignFilterFactory
from twistmail.model import ACCEPT, FilterMessage, SessionInfo
from twistmail.relay.mx import DnsPythonMXResolver

MESSAGE = (b"From: Alice <alice@example.test>\r\nTo: bob@remote.test\r\n"
           b"Subject: hello\r\nDate: Fri, 04 Dec 2026 08:00:00 +0000\r\n"
           b"Message-ID: <1@example.test>\r\n\r\nHello Bob,\r\nsee you.\r\n")
SUBMITTED = SessionInfo("submission", "127.0.0.1", "client", True, "alice@example.test", "q1",
                        "alice@example.test", ("bob@remote.test",))


@pytest.fixture(scope="module")
def keyData(tmp_path_factory):
    """One data dir with a key set for example.test (RSA generation is slow: once)."""
    data = str(tmp_path_factory.mktemp("dkimdata"))
    keys = dkimkeys.generate(data, "example.test", "s1")
    return data, keys


@pytest.fixture
def data(keyData, tmp_path):
    copy = str(tmp_path / "data")
    shutil.copytree(keyData[0], copy)
    return copy


@pytest.fixture(scope="module")
def published(keyData):
    """The key records on a loopback DNS server, and dkimpy's lookup through our resolver."""
    _, keys = keyData
    server = startDNS({owner: [TXT(*_chunks(text))] for owner, text in keys.records()})
    resolver = DnsPythonMXResolver([("127.0.0.1", server.port)], 5, defer.maybeDeferred)

    def dnsfunc(name, timeout=5):
        records = resolver.resolveSync(name.decode().rstrip("."), "TXT")
        return b"".join(b"".join(r.strings) for r in records)

    yield dnsfunc
    server.stop()


def _chunks(text: str) -> list[str]:
    return [text[i:i + 255] for i in range(0, len(text), 255)]


def verifyEach(message: bytes, dnsfunc) -> list[bool]:
    """Each DKIM-Signature checked on its own (dkimpy's verify(idx))."""
    d = dkim.DKIM(message)
    count = sum(1 for name, _ in d.headers if name.lower() == b"dkim-signature")
    results = []
    for i in range(count):
        try:
            results.append(d.verify(idx=i, dnsfunc=dnsfunc))
        except dkim.DKIMException:  # dkimpy raises for some failures (body hash)
            results.append(False)
    return results


def test_both_signatures_verify_ed25519_and_rsa(data, published):
    signed = Signer(KeyRing(data)).sign(MESSAGE)
    parsed = email.message_from_bytes(signed, policy=email.policy.compat32)
    sigs = [dict(t.strip().split("=", 1) for t in "".join(v.split()).split(";") if t)
            for v in parsed.get_all("DKIM-Signature")]
    assert [(s["a"], s["s"], s["d"], s["c"]) for s in sigs] == [
        ("ed25519-sha256", "s1-ed25519", "example.test", "relaxed/relaxed"),
        ("rsa-sha256", "s1-rsa", "example.test", "relaxed/relaxed")]
    # RFC 6376 §5.4.1 fields present, From once more than present (over-signed).
    assert sigs[0]["h"].split(":") == ["from", "to", "subject", "date", "message-id", "from"]
    assert verifyEach(signed, published) == [True, True]


def test_a_modified_body_fails_both(data, published):
    signed = Signer(KeyRing(data)).sign(MESSAGE)
    assert verifyEach(signed.replace(b"see you.", b"send money."), published) == [False, False]


def test_a_second_from_fails_both(data, published):
    """RFC 6376 §8.15: a From added after signing (display spoofing) breaks the signature."""
    signed = Signer(KeyRing(data)).sign(MESSAGE)
    head, _, body = signed.partition(b"\r\n\r\n")
    for forged in (b"From: ceo@example.test\r\n" + signed,  # on top: what a reader shows
                   head + b"\r\nFrom: ceo@example.test\r\n\r\n" + body):
        assert verifyEach(forged, published) == [False, False]


def test_no_keys_for_the_from_domain_no_signature(data):
    message = MESSAGE.replace(b"alice@example.test", b"alice@other.test")
    assert Signer(KeyRing(data)).sign(message) == message


def test_a_subdomain_is_signed_by_its_parent_domain_keys(data, published):
    message = MESSAGE.replace(b"alice@example.test", b"alice@news.example.test")
    signed = Signer(KeyRing(data)).sign(message)
    assert signed.count(b"DKIM-Signature:") == 2 and b"d=example.test;" in signed
    assert verifyEach(signed, published) == [True, True]


@pytest.mark.parametrize("head", [
    b"To: bob@remote.test\r\n",  # no From
    b"From: a@example.test\r\nFrom: b@example.test\r\n",  # two
    b"From: a@example.test, b@example.test\r\n",  # two mailboxes: which domain is a guess
    b"From: undisclosed\r\n",
])
def test_no_single_from_address_no_signature(data, head):
    message = head + b"Subject: x\r\n\r\nbody\r\n"
    assert fromDomain(message) is None
    assert Signer(KeyRing(data)).sign(message) == message


def test_folded_from_and_lf_only_message(data, published):
    message = MESSAGE.replace(b"From: Alice <", b"From: Alice\r\n <").replace(b"\r\n", b"\n")
    assert fromDomain(message.replace(b"\n", b"\r\n")) == "example.test"
    signed = Signer(KeyRing(data)).sign(message)
    assert signed.count(b"DKIM-Signature:") == 2 and b"\r\n" not in signed
    assert verifyEach(signed.replace(b"\n", b"\r\n"), published) == [True, True]


def test_header_list_counts_each_field_and_oversigns_from():
    message = b"From: a@x.test\r\nReceived: x\r\nTo: b\r\nTo: c\r\nX-Other: y\r\n\r\nFrom: body\r\n"
    assert headerList(message) == [b"from", b"to", b"to", b"from"]


def test_the_oldest_set_signs_and_a_new_key_is_used_within_seconds(data):
    now = [100.0]
    ring = KeyRing(data, refresh=2.0, clock=lambda: now[0])
    assert ring.signing("other.test") is None
    dkimkeys.generate(data, "other.test", "k1")
    assert ring.signing("other.test") is None  # cached for up to 2 seconds
    now[0] += 2.5
    first = ring.signing("other.test")
    assert first is not None and first.name == "k1"
    # A second set (rotation) does not sign until the first is removed.
    dkimkeys.generate(data, "other.test", "k2")
    now[0] += 2.5
    assert ring.signing("other.test").name == "k1"
    dkimkeys.remove(data, "other.test", "k1")
    now[0] += 2.5
    assert ring.signing("other.test").name == "k2"


def test_unchanged_keys_are_not_read_again(data, monkeypatch):
    now = [0.0]
    ring = KeyRing(data, refresh=1.0, clock=lambda: now[0])
    assert ring.signing("example.test").name == "s1"
    reads = []
    monkeypatch.setattr(dkimkeys, "listSets", lambda *a: reads.append(a) or [])
    for _ in range(3):
        now[0] += 5
        assert ring.signing("example.test").name == "s1"  # one stat, no read
    assert reads == []


def test_the_cache_is_bounded(data):
    ring = KeyRing(data, maxCached=3)
    for i in range(10):
        ring.signing(f"d{i}.test")
    assert len(ring._cache) == 3


# -- the filter ------------------------------------------------------------------


def _message(data: bytes) -> FilterMessage:
    return FilterMessage(email.message_from_bytes(data, policy=email.policy.default), len(data),
                         lambda: io.BytesIO(data))


def _filter(data: str) -> DKIMSignFilter:
    return DKIMSignFilter(Signer(KeyRing(data), run=defer.maybeDeferred))


def test_filter_adds_both_signatures_on_submission(data, published):
    from twisted.logger import formatEvent, globalLogPublisher

    seen = []
    globalLogPublisher.addObserver(seen.append)
    try:
        verdict = _filter(data).endOfData(SUBMITTED, _message(MESSAGE)).result
    finally:
        globalLogPublisher.removeObserver(seen.append)
    assert "dkim-sign id=q1 user=alice@example.test result=signed d=example.test " \
           "s=s1-ed25519,s1-rsa" in [formatEvent(e) for e in seen]
    assert verdict.action == ACCEPT
    assert [name for name, _ in verdict.headers] == ["DKIM-Signature", "DKIM-Signature"]
    signed = b"".join(f"{n}: {v}\r\n".encode() for n, v in verdict.headers) + MESSAGE
    assert verifyEach(signed, published) == [True, True]


def test_filter_does_not_sign_unauthenticated_inbound_mail(data):
    inbound = SessionInfo("inbound", "192.0.2.1", "forger", sender="alice@example.test")
    assert _filter(data).endOfData(inbound, _message(MESSAGE)) is None


def test_filter_with_a_broken_key_sends_unsigned(data):
    with open(os.path.join(data, "dkim", "example.test", "s1", "rsa.pem"), "wb") as f:
        f.write(b"garbage")
    verdict = _filter(data).endOfData(SUBMITTED, _message(MESSAGE)).result
    assert verdict.action == ACCEPT and verdict.headers == ()


def test_factory_is_the_registered_plugin_and_refuses_options():
    from twistmail import _pluginload
    from twistmail.config import ConfigError
    from twistmail.interfaces import IMessageFilterFactory
    from twistmail.model import FilterContext

    factory = _pluginload.find(IMessageFilterFactory, "dkim-sign", "[filters] submission")
    assert isinstance(factory, DKIMSignFilterFactory)
    with pytest.raises(ConfigError, match=r"\[filters.dkim-sign\] selector: unknown option"):
        factory.makeFilter({"selector": "x"}, FilterContext("mx.test", "/nonexistent", None, None))


def test_at_most_two_messages_are_hashed_at_once(data):
    """Each signing holds a whole message in memory: the others wait on disk."""
    started = []
    signer = Signer(KeyRing(data), run=lambda f, *a: started.append(defer.Deferred()) or started[-1])
    results = [signer.signLater(MESSAGE) for _ in range(5)]
    assert len(started) == 2
    started[0].callback(b"signed")
    assert results[0].result == b"signed" and len(started) == 3


# -- signing in a child process ----------------------------------------------------


def _inMemory(data: bytes) -> FilterMessage:
    return dataclasses.replace(_message(data), inMemory=True)


@pytest.fixture
def inProcesses(data):
    """The filter as the factory builds it, with one signing process, counting the
    messages signed in a thread instead."""
    from support import onReactor
    from twisted.internet import reactor

    threaded = []

    def run(f, *args):
        threaded.append(f)
        return defer.maybeDeferred(f, *args)

    processes = dkimprocess.DKIMProcesses(reactor, 1, 30)
    yield DKIMSignFilter(Signer(KeyRing(data), run), processes, data), threaded
    onReactor(processes.stop)


def test_a_message_in_memory_is_signed_by_the_child(inProcesses, published):
    from support import onReactor

    filter, threaded = inProcesses
    verdict = onReactor(lambda: filter.endOfData(SUBMITTED, _inMemory(MESSAGE)))
    signed = b"".join(f"{n}: {v}\r\n".encode() for n, v in verdict.headers) + MESSAGE
    assert verifyEach(signed, published) == [True, True] and threaded == []
    # On disk: in a thread, as before.
    verdict = onReactor(lambda: filter.endOfData(SUBMITTED, _message(MESSAGE)))
    assert len(verdict.headers) == 2 and len(threaded) == 1


def test_a_message_the_child_cannot_sign_is_tried_in_a_thread(inProcesses, data):
    """A broken key: the child fails, the thread fails the same way, and the message goes
    unsigned, as without a child."""
    from support import onReactor

    filter, threaded = inProcesses
    with open(os.path.join(data, "dkim", "example.test", "s1", "rsa.pem"), "wb") as f:
        f.write(b"garbage")
    verdict = onReactor(lambda: filter.endOfData(SUBMITTED, _inMemory(MESSAGE)))
    assert verdict.action == ACCEPT and verdict.headers == () and len(threaded) == 1


@pytest.mark.parametrize("value", [-1, "1", 1.5, True])
def test_processes_option_must_be_a_count(value):
    from twistmail.config import ConfigError
    from twistmail.model import FilterContext

    with pytest.raises(ConfigError, match=r"\[filters.dkim-sign\] processes: .*Fix: "):
        DKIMSignFilterFactory().makeFilter({"processes": value},
                                           FilterContext("mx.test", "/nonexistent", None, None))
