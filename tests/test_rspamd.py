"""The rspamd filter against a real Rspamd from Debian (tests/rspamdproc.py), and against a
small fake for what a real one will not do (oversized or failed answers)."""

from __future__ import annotations

import email.parser
import email.policy
import io
import json

import pytest
import rspamdproc
from rspamdproc import GTUBE, GTUBE_ADD_HEADER, GTUBE_REWRITE_SUBJECT
from support import freePort, onReactor
from twisted.internet import defer, reactor
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.web import resource, server
from zope.interface.verify import verifyObject

from twistmail import config
from twistmail._pluginload import find
from twistmail.filters.rspamd import RspamdError
from twistmail.interfaces import IMessageFilter, IMessageFilterFactory
from twistmail.model import FilterContext, FilterMessage, SessionInfo, Verdict

SESSION = SessionInfo("inbound", "192.0.2.1", helo="client.example.net", tls=True,
                      id="4AbCdEf", sender="alice@example.net",
                      recipients=("bob@example.org", "carol@example.org"))


@pytest.fixture(scope="module")
def rspamd():
    assert rspamdproc.available(), "rspamd is not installed: apt-get install rspamd"
    with rspamdproc.Rspamd(freePort()) as rs:
        yield rs


def makeFilter(**options):
    factory = find(IMessageFilterFactory, "rspamd", "[filters] inbound", "filter")
    context = FilterContext("mx.example.org", "/nonexistent", None, reactor, config.load(None))
    return factory.makeFilter(options, context)


def message(body: str, *headers: str) -> FilterMessage:
    data = ("From: Alice <alice@example.net>\r\nTo: bob@example.org\r\nSubject: hello\r\n"
            "Message-ID: <1@example.net>\r\nDate: Fri, 04 Dec 2026 08:00:00 +0000\r\n"
            + "".join(h + "\r\n" for h in headers) + "\r\n" + body + "\r\n").encode()
    parsed = email.parser.BytesHeaderParser(policy=email.policy.default).parsebytes(data)
    return FilterMessage(parsed, len(data), lambda: io.BytesIO(data))


def check(filt, msg: FilterMessage, session: SessionInfo = SESSION) -> Verdict:
    return onReactor(lambda: defer.maybeDeferred(filt.endOfData, session, msg))


def header(verdict: Verdict, name: str) -> str | None:
    values = [value for key, value in verdict.headers if key == name]
    assert len(values) <= 1
    return values[0] if values else None


def test_the_builtin_plugin_provides_the_interfaces():
    factory = find(IMessageFilterFactory, "rspamd", "[filters] inbound", "filter")
    assert verifyObject(IMessageFilterFactory, factory)
    assert verifyObject(IMessageFilter, makeFilter())


def test_reject_is_refused_with_554_and_rspamds_message(rspamd):
    verdict = check(makeFilter(url=rspamd.url), message(GTUBE))
    assert verdict == Verdict.reject("5.7.1 Gtube pattern", 554)


def test_add_header_is_accepted_marked_as_spam(rspamd):
    verdict = check(makeFilter(url=rspamd.url), message(GTUBE_ADD_HEADER))
    assert verdict.action == "accept"
    assert header(verdict, "X-Spam") == "Yes"
    assert header(verdict, "X-Spamd-Result").startswith("default: True [6.00 / 15.00]")
    assert "GTUBE(0.00)" in header(verdict, "X-Spamd-Result")


def test_rewrite_subject_goes_to_junk_marked_as_spam(rspamd):
    verdict = check(makeFilter(url=rspamd.url), message(GTUBE_REWRITE_SUBJECT))
    assert verdict.action == "quarantine"
    assert header(verdict, "X-Spam") == "Yes"
    assert header(verdict, "X-Spamd-Result").startswith("default: True")


@pytest.mark.parametrize("action", ["soft reject", "greylist"])
def test_soft_reject_and_greylist_are_told_to_retry_with_451(rspamd, action):
    verdict = check(makeFilter(url=rspamd.url), message("hello", f"X-Test-Action: {action}"))
    assert verdict == Verdict.tempfail(f"4.7.1 test {action}", 451)


def test_no_action_is_accepted_with_the_result_header_only(rspamd):
    verdict = check(makeFilter(url=rspamd.url), message("Hello Bob, lunch on Friday?"))
    assert verdict.action == "accept"
    assert header(verdict, "X-Spam") is None
    assert header(verdict, "X-Spamd-Result").startswith("default: False [0.00 / 15.00]")


def test_unreachable_rspamd_is_a_filter_failure():
    with pytest.raises(RspamdError, match="rspamd"):
        check(makeFilter(url=f"http://127.0.0.1:{freePort()}"), message("hello"))


# -- against a fake: what the request carries, and answers a real rspamd does not give --


class Fake(resource.Resource):
    isLeaf = True

    def __init__(self, answer: bytes, code: int = 200) -> None:
        super().__init__()
        self.answer, self.code, self.requests = answer, code, []

    def render_POST(self, request):
        self.requests.append((request.path, request.requestHeaders, request.content.read()))
        request.setResponseCode(self.code)
        return self.answer


@pytest.fixture
def fake():
    site = server.Site(Fake(b'{"action": "no action", "score": 1.5, "required_score": 15}'))
    port = onReactor(lambda: reactor.listenTCP(0, site, interface="127.0.0.1"))
    yield site.resource, f"http://127.0.0.1:{port.getHost().port}"
    onReactor(port.stopListening)


def test_the_envelope_goes_in_headers_and_the_message_as_the_body(fake):
    resource_, url = fake
    msg = message("hello")
    authenticated = SessionInfo("submission", "2001:db8::1", helo="laptop", id="Q1",
                                authenticated="alice@example.net", sender="",
                                recipients=("bob@example.org", "carol@example.org"))
    check(makeFilter(url=url, password="s3cret"), msg, authenticated)
    path, headers, body = resource_.requests[0]
    assert path == b"/checkv2"
    assert body == msg.open().read()
    assert headers.getRawHeaders("IP") == ["2001:db8::1"]
    assert headers.getRawHeaders("Helo") == ["laptop"]
    assert headers.getRawHeaders("From") == ["<>"]
    assert headers.getRawHeaders("Rcpt") == ["bob@example.org", "carol@example.org"]
    assert headers.getRawHeaders("Queue-Id") == ["Q1"]
    assert headers.getRawHeaders("User") == ["alice@example.net"]
    assert headers.getRawHeaders("Password") == ["s3cret"]
    check(makeFilter(url=url), msg)
    _, headers, _ = resource_.requests[1]
    assert headers.getRawHeaders("Password") is None and headers.getRawHeaders("User") is None


@pytest.mark.parametrize("answer, code, problem", [
    (b"x" * (2 * 1024 * 1024), 200, "larger than"),
    (b"busy", 503, "503"),
    (b"not json", 200, "not JSON"),
    (b'{"action": "explode"}', 200, "explode"),
    (b'{"score": 3}', 200, "action"),
])
def test_an_oversized_failed_or_malformed_answer_is_a_filter_failure(fake, answer, code, problem):
    resource_, url = fake
    resource_.answer, resource_.code = answer, code
    with pytest.raises(RspamdError, match=problem):
        check(makeFilter(url=url), message("hello"))


def test_rspamds_message_cannot_forge_an_smtp_reply(fake):
    resource_, url = fake
    resource_.answer = json.dumps({"action": "reject", "messages": {
        "smtp_message": "spam\r\n250 2.0.0 accepted" + "x" * 1000}}).encode()
    verdict = check(makeFilter(url=url), message("hello"))
    assert verdict.code == 554 and "\r" not in verdict.text and "\n" not in verdict.text
    assert len(verdict.text) < 300


@pytest.mark.parametrize("options, where", [
    ({"url": "ftp://127.0.0.1"}, "url"),
    ({"url": 11333}, "url"),
    ({"password": 5}, "password"),
    ({"colour": "blue"}, "colour"),
])
def test_bad_options_name_the_key_and_the_fix(options, where):
    with pytest.raises(config.ConfigError, match=rf"\[filters\.rspamd\] {where}.*Fix"):
        makeFilter(**options)


def test_a_silent_rspamd_is_hung_up_on_when_the_pipeline_gives_up(fake):
    """The pipeline's [filters.rspamd] timeout cancels the check: the connection closes."""
    resource_, url = fake
    arrived = defer.Deferred()
    resource_.render_POST = lambda request: (arrived.callback(request), server.NOT_DONE_YET)[1]
    filt = makeFilter(url=url)
    d = onReactor(lambda: defer.succeed(filt.endOfData(SESSION, message("hello"))))
    request = onReactor(lambda: arrived)
    lost = onReactor(lambda: defer.succeed(request.notifyFinish()))
    failures = []
    onReactor(lambda: defer.succeed(d.addErrback(failures.append).cancel()))
    with pytest.raises((ConnectionDone, ConnectionLost)):
        onReactor(lambda: lost.addTimeout(10, reactor))  # a TimeoutError fails the test
    assert failures and failures[0].check(RspamdError, defer.CancelledError)
