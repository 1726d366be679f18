"""The filter engine: every verdict at every hook, timeouts, failures, headers, Junk.

All over StringTransport with twistmail.testing's harness and a task.Clock:
no sockets, no reactor, milliseconds per test.
"""

from __future__ import annotations

import pytest
from twisted.internet import defer
from twisted.logger import globalLogPublisher
from zope.interface.verify import verifyObject

from twistmail.delivery.local import LocalDelivery
from twistmail.delivery.pipeline import DeliveryPipeline
from twistmail.filters.base import Filter
from twistmail.filters.chain import ConfiguredFilter
from twistmail.interfaces import IDeliveryTarget, IMailStore
from twistmail.model import Verdict
from twistmail.testing import MemoryStore, RecordingDeliveryTarget, SMTPHarness

ALICE = "alice@example.test"
MSG = b"From: x@remote.test\r\nTo: alice@example.test\r\nSubject: hi\r\n\r\nhello\r\n"
HOOKS = ("connect", "helo", "mailFrom", "rcptTo", "endOfData")


class Fixed(Filter):
    """Answers C{verdict} at C{hook}, accepts elsewhere; records what it saw."""

    def __init__(self, hook: str, verdict, name: str = "fixed") -> None:
        self.name = name
        self.calls: list = []
        for each in HOOKS:
            setattr(self, each, self._answer(each, verdict if each == hook else None))

    def _answer(self, hook, verdict):
        def answer(session, *args):
            self.calls.append((hook, session, *args))
            return verdict() if callable(verdict) else verdict
        return answer


@pytest.fixture
def logged():
    events: list = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def conversation(harness, message=MSG) -> list[bytes]:
    """Greeting, EHLO, MAIL, RCPT, DATA and the message: each reply's last line."""
    c = harness.connect()
    replies = [c.greeting]
    for line in (b"EHLO client.example", b"MAIL FROM:<x@remote.test>", b"RCPT TO:<alice@example.test>",
                 b"DATA"):
        replies.append(c.command(line))
    replies.append(c.data(message))
    return replies


def test_the_delivery_targets_and_fakes_provide_their_interfaces():
    assert verifyObject(IDeliveryTarget, RecordingDeliveryTarget())
    assert verifyObject(IDeliveryTarget, LocalDelivery(MemoryStore()))
    assert verifyObject(IDeliveryTarget, DeliveryPipeline(LocalDelivery(MemoryStore()), None))
    assert verifyObject(IMailStore, MemoryStore())


def test_no_filters_delivers_as_before():
    h = SMTPHarness()
    replies = conversation(h)
    assert replies[0].startswith(b"220 mx.example.test ESMTP")
    assert replies[-1].startswith(b"250 2.0.0 Ok: queued as ")
    [d] = h.delivered
    assert d.envelope.recipients == (ALICE,) and d.envelope.folder == "INBOX"
    assert d.data.startswith(b"Received: from client.example ([192.0.2.1])")
    assert d.data.endswith(MSG)


@pytest.mark.parametrize("hook, index", [("helo", 1), ("mailFrom", 2), ("rcptTo", 3),
                                         ("endOfData", 5)])
@pytest.mark.parametrize("verdict, expected", [
    (Verdict.reject("5.7.1 Go away"), b"550 5.7.1 Go away"),
    (Verdict.reject("5.7.0 Not you", 554), b"554 5.7.0 Not you"),
    (Verdict.tempfail("4.7.1 Later"), b"451 4.7.1 Later"),
])
def test_reject_and_tempfail_answer_that_command(hook, index, verdict, expected):
    h = SMTPHarness([Fixed(hook, verdict)])
    replies = conversation(h)
    assert replies[index].startswith(expected), replies
    assert h.delivered == []


def test_reject_at_connect_answers_554_then_only_quit():
    """RFC 5321 §3.1: 554 instead of 220, 503 to anything but QUIT."""
    h = SMTPHarness([Fixed("connect", Verdict.reject("5.7.1 Listed at dnsbl.example"))])
    c = h.connect()
    assert c.greeting == b"554 mx.example.test 5.7.1 Listed at dnsbl.example"
    assert c.command(b"EHLO client.example").startswith(b"503 5.5.1")
    assert c.command(b"MAIL FROM:<x@remote.test>").startswith(b"503 5.5.1")
    assert c.command(b"QUIT").startswith(b"221 ")
    assert c.transport.disconnecting and h.delivered == []


def test_tempfail_at_connect_answers_421_and_closes():
    h = SMTPHarness([Fixed("connect", Verdict.tempfail("4.7.1 Busy"))])
    c = h.connect()
    assert c.greeting == b"421 mx.example.test 4.7.1 Busy"
    assert c.transport.disconnecting


@pytest.mark.parametrize("hook", HOOKS)
def test_quarantine_at_any_hook_files_into_junk(hook, logged):
    h = SMTPHarness([Fixed(hook, Verdict.quarantine([("X-Spam", "yes")]))])
    replies = conversation(h)
    assert replies[-1].startswith(b"250 2.0.0")
    [d] = h.delivered
    assert d.envelope.folder == "Junk"
    assert b"\r\nX-Spam: yes\r\n" in d.data
    results = [e["result"] for e in logged if e.get("log_format", "").startswith("smtp id=")]
    assert results == ["delivered to Junk (quarantined by fixed)"]


@pytest.mark.parametrize("hook", HOOKS)
def test_discard_at_any_hook_answers_250_and_stores_nothing(hook, logged):
    h = SMTPHarness([Fixed(hook, Verdict.discard())])
    replies = conversation(h)
    assert replies[-1].startswith(b"250 2.0.0 Ok: queued as ")
    assert h.delivered == []
    results = [e["result"] for e in logged if e.get("log_format", "").startswith("smtp id=")]
    assert results == ["discarded by fixed"]


@pytest.mark.parametrize("hook", HOOKS)
def test_headers_added_at_any_hook_follow_our_received(hook):
    h = SMTPHarness([Fixed(hook, Verdict.accept([("X-Checked", f"at {hook}")]))])
    conversation(h)
    [d] = h.delivered
    received, rest = d.data.split(b"\r\nX-Checked: ", 1)
    assert received.startswith(b"Received: ") and b"\r\n" in received  # folded, ours
    assert rest.startswith(f"at {hook}\r\n".encode())
    assert rest.endswith(MSG)


def test_first_refusal_wins_and_later_filters_are_not_asked():
    first = Fixed("rcptTo", Verdict.reject("5.7.1 First"), "first")
    second = Fixed("rcptTo", Verdict.reject("5.7.1 Second"), "second")
    replies = conversation(SMTPHarness([first, second]))
    assert replies[3].startswith(b"550 5.7.1 First")
    assert [c[0] for c in second.calls] == ["connect", "helo", "mailFrom"]


def test_headers_of_earlier_filters_are_visible_to_later_ones():
    seen = {}

    class Reader(Filter):
        name = "reader"

        def endOfData(self, session, message):
            seen["header"] = message.headers["X-First"]
            with message.open() as f:
                seen["data"] = f.read()
            seen["size"] = message.size
            seen["inMemory"] = message.inMemory
            return Verdict.accept([("X-Second", "after")])

    h = SMTPHarness([Fixed("endOfData", Verdict.accept([("X-First", "one")])), Reader()])
    conversation(h)
    assert seen["header"] == "one"
    assert b"\r\nX-First: one\r\n" in seen["data"] and seen["data"].endswith(MSG)
    assert seen["size"] == len(seen["data"])
    assert seen["inMemory"]  # a small message: a filter may read it on the reactor thread
    [d] = h.delivered
    assert d.data.index(b"X-First: one") < d.data.index(b"X-Second: after") < d.data.index(MSG)


def test_session_info_at_each_hook():
    f = Fixed("none", None)
    conversation(SMTPHarness([f]))
    byHook = {call[0]: call for call in f.calls}
    assert byHook["connect"][1].client == "192.0.2.1" and byHook["connect"][1].role == "inbound"
    assert byHook["helo"][1].helo == "client.example"
    assert byHook["mailFrom"][1].sender == "x@remote.test" and byHook["mailFrom"][1].id
    assert byHook["rcptTo"][2] == ALICE and byHook["rcptTo"][1].recipients == ()
    session, message = byHook["endOfData"][1:]
    assert session.recipients == (ALICE,) and message.headers["Subject"] == "hi"


class Hanging(Filter):
    name = "hanging"

    def endOfData(self, session, message):
        return defer.Deferred()  # never fires


@pytest.mark.parametrize("onFailure, expected", [("tempfail", b"451 4.7.1 "),
                                                 ("accept", b"250 2.0.0 ")])
def test_a_filter_over_its_timeout_gets_its_on_failure(onFailure, expected, logged):
    h = SMTPHarness([ConfiguredFilter("hanging", Hanging(), timeout=5, onFailure=onFailure)])
    c = h.connect()
    for line in (b"EHLO c", b"MAIL FROM:<x@remote.test>", b"RCPT TO:<alice@example.test>", b"DATA"):
        c.command(line)
    assert c.data(MSG) == b""  # waiting for the filter
    h.clock.advance(4.9)
    assert c.output() == b""
    h.clock.advance(0.2)
    assert c.output().startswith(expected)
    assert len(h.delivered) == (1 if onFailure == "accept" else 0)
    [line] = [e for e in logged if e.get("filter") == "hanging" and "timeout" in e["log_format"]]
    assert line["onFailure"] == onFailure


class Broken(Filter):
    name = "broken"

    def mailFrom(self, session):
        raise RuntimeError("secret internals")


@pytest.mark.parametrize("onFailure, expected", [("tempfail", b"451 4.7.1 "),
                                                 ("accept", b"250 2.1.0 ")])
def test_a_filter_that_raises_gets_its_on_failure_and_no_traceback_is_sent(onFailure, expected,
                                                                          logged):
    h = SMTPHarness([ConfiguredFilter("broken", Broken(), onFailure=onFailure)])
    c = h.connect()
    c.command(b"EHLO c")
    reply = c.command(b"MAIL FROM:<x@remote.test>")
    assert reply.startswith(expected) and b"secret" not in reply
    failures = [e for e in logged if e.get("filter") == "broken" and "log_failure" in e]
    assert len(failures) == 1 and failures[0]["log_failure"].check(RuntimeError)


def test_quarantine_files_into_the_junk_folder_of_the_store():
    store = MemoryStore()
    h = SMTPHarness([Fixed("endOfData", Verdict.quarantine())], delivery=LocalDelivery(store))
    assert conversation(h)[-1].startswith(b"250 ")
    assert store.folder(ALICE, "INBOX") == []
    [copy] = store.folder(ALICE, "Junk")
    assert copy.endswith(MSG)


@pytest.mark.parametrize("answer", ["yes please", Verdict.accept([("Not a name", "x")])])
def test_a_bad_answer_is_a_filter_failure(answer, logged):
    h = SMTPHarness([Fixed("rcptTo", answer, "sloppy")])
    assert conversation(h)[3].startswith(b"451 4.7.1 ")
    assert [e["filter"] for e in logged if "log_failure" in e] == ["sloppy"]


AR_OURS = b"Authentication-Results: mx.example.test; spf=pass smtp.mailfrom=x@remote.test\r\n"
AR_OURS_FOLDED = b"Authentication-Results: (forged) MX.Example.Test 1;\r\n\tdkim=pass\r\n"
AR_THEIRS = b"Authentication-Results: other.example; dkim=pass\r\n"


@pytest.mark.parametrize("spoolOnDisk", [False, True])
def test_incoming_authentication_results_claiming_our_name_are_removed(tmp_path, spoolOnDisk):
    """RFC 8601 §5, on the MX port, before any filter sees the message; a message
    larger than the in-memory spool is rewritten through the thread runner."""
    seen = {}

    class Reader(Filter):
        name = "reader"

        def endOfData(self, session, message):
            seen["ar"] = message.headers.get_all("Authentication-Results")

    body = b"x" * 1500 * 1024 + b"\r\n" if spoolOnDisk else b"hello\r\n"
    message = AR_OURS + AR_THEIRS + AR_OURS_FOLDED + MSG + body
    h = SMTPHarness([Reader()], spoolDir=str(tmp_path))
    assert conversation(h, message)[-1].startswith(b"250 ")
    assert seen["ar"] == ["other.example; dkim=pass"]
    [d] = h.delivered
    assert d.data.endswith(AR_THEIRS + MSG + body)
    assert b"mx.example.test;" not in d.data.lower() and h.threadCalls == (1 if spoolOnDisk else 0)


def test_submission_keeps_authentication_results():
    h = SMTPHarness(role="submission")
    c = h.connect(authenticated=ALICE)
    c.command(b"EHLO c")
    c.command(b"MAIL FROM:<alice@example.test>")
    c.command(b"RCPT TO:<alice@example.test>")
    c.command(b"DATA")
    assert c.data(AR_OURS + MSG).startswith(b"250 ")
    assert AR_OURS in h.delivered[0].data


def test_submission_message_id_and_date_are_there_for_configured_filters():
    """The built-in rules run first: a DKIM signer configured after them signs them."""
    seen = {}

    class Signer(Filter):
        name = "signer"

        def endOfData(self, session, message):
            seen.update(messageId=message.headers["Message-ID"], date=message.headers["Date"])

    h = SMTPHarness([Signer()], role="submission")
    c = h.connect(authenticated=ALICE)
    for line in (b"EHLO c", b"MAIL FROM:<alice@example.test>", b"RCPT TO:<bob@example.test>",
                 b"DATA"):
        c.command(line)
    assert c.data(b"Subject: no id\r\n\r\nhi\r\n").startswith(b"250 ")
    assert seen["messageId"].endswith("@mx.example.test>") and seen["date"]


def test_a_header_section_over_the_limit_is_cut_for_filters_not_for_delivery():
    seen = {}

    class Reader(Filter):
        name = "reader"

        def endOfData(self, session, message):
            seen["count"] = len(message.headers.get_all("X-Filler"))

    filler = b"".join(b"X-Filler: %07d\r\n" % i for i in range(80_000))  # 1.5 MiB of header
    h = SMTPHarness([Reader()], smtp={"max_message_size": 4 * 1024 * 1024})
    assert conversation(h, filler + MSG)[-1].startswith(b"250 ")
    assert 50_000 < seen["count"] < 80_000
    assert h.threadCalls == 1  # parsed off the reactor thread
    assert h.delivered[0].data.endswith(filler + MSG)


class Slow(Filter):
    """Answers C{hook} when the test fires C{self.pending}."""

    name = "slow"

    def __init__(self, hook: str) -> None:
        self.pending = defer.Deferred()
        setattr(self, hook, lambda *args: self.pending)


def test_commands_sent_before_a_slow_greeting_wait_for_it():
    """Nothing is read as a command while the connect hook is pending; then in order."""
    slow = Slow("connect")
    h = SMTPHarness([slow])
    c = h.connect()
    assert c.greeting == b""
    assert c.command(b"EHLO early.example") == b""
    slow.pending.callback(None)
    lines = c.output().split(b"\r\n")
    assert lines[0].startswith(b"220 mx.example.test ESMTP") and lines[-1].startswith(b"250 ")


def test_a_client_gone_while_a_filter_decides_is_no_error(logged):
    slow = Slow("endOfData")
    h = SMTPHarness([slow])
    c = h.connect()
    for line in (b"EHLO c", b"MAIL FROM:<x@remote.test>", b"RCPT TO:<alice@example.test>", b"DATA"):
        c.command(line)
    assert c.data(MSG) == b""
    c.close()
    slow.pending.callback(Verdict.accept())
    assert len(h.delivered) == 1  # complete at its end: delivered (the sender may retry it)
    assert [e for e in logged if "log_failure" in e] == []


@pytest.mark.parametrize("backend", ["maildir", "mbox"])
def test_quarantine_creates_the_junk_folder_on_the_real_backends(backend, tmp_path):
    """LocalDelivery files into envelope.folder; a missing Junk is created (Maildir, mbox)."""
    from support import onReactor

    from twistmail import _pluginload
    from twistmail.delivery.spool import MessageSource
    from twistmail.interfaces import IMailStoreFactory
    from twistmail.model import Envelope

    store = _pluginload.find(IMailStoreFactory, backend, "[storage] backend").makeStore(
        {}, str(tmp_path))
    envelope = Envelope(sender="x@remote.test", recipients=(ALICE,), folder="Junk")
    onReactor(LocalDelivery(store).deliver, envelope, MessageSource.fromBytes(MSG))

    def junk():
        account = store.account(ALICE)
        return account.listFolders().addCallback(
            lambda names: account.openFolder("Junk").addCallback(
                lambda box: (names, box.readMessages(box.uids()))))

    names, read = onReactor(junk)
    assert "Junk" in names
    assert onReactor(lambda: read) == [MSG]


def test_a_header_the_email_package_cannot_parse_is_still_given_to_filters():
    """Python's parser raises on an RFC 2231 section number of 5,000 digits; the filters get
    the raw fields instead, and the message is not refused because of our parser."""
    from twistmail.filters.message import parseHeaders

    section = (b"From: a@example.org\r\nContent-Type: text/plain; name*" + b"9" * 5000 +
               b"*=x\r\n\r\n")
    headers = parseHeaders(section)
    assert headers.get_all("From") == ["a@example.org"]
    assert headers["Content-Type"].startswith("text/plain")
