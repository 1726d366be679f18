# -*- test-case-name: tests.test_rspamd -*-
"""The ``rspamd`` filter: ask Rspamd about each message at the end of DATA.

Rspamd's HTTP protocol (``POST /checkv2``): the envelope in request headers
(``IP``, ``Helo``, ``From``, one ``Rcpt`` per recipient, ``Queue-Id``,
``User`` when authenticated, ``Password`` when configured), the message as
the body, streamed from the spool file; a JSON answer, read up to
L{MAX_RESPONSE} octets.  Twisted's C{Agent} carries it: nothing blocks.

Actions become verdicts as the Rspamd milter (rspamd_proxy) makes them for
Postfix, except "rewrite subject":

* ``reject`` -> ``554 5.7.1`` with Rspamd's SMTP message ("Spam message
  rejected" without one);
* ``soft reject`` and ``greylist`` -> ``451 4.7.1`` ("Try again later");
* ``add header`` -> accepted with ``X-Spam: Yes``;
* ``rewrite subject`` -> quarantined (the Junk folder) with ``X-Spam: Yes``:
  a verdict can add header fields but not replace the Subject, and filing
  into Junk is what the rewritten subject was for;
* ``no action`` -> accepted.

Every accepted message gets ``X-Spamd-Result`` (score, threshold and
symbols, as Rspamd's milter_headers module writes it).  Rspamd unreachable,
an HTTP error, an oversized or malformed answer: L{RspamdError}, a filter
failure that the pipeline answers with ``[filters.rspamd] on_failure``.
"""

from __future__ import annotations

import json
import re
from urllib.parse import urlsplit

from twisted.internet import defer
from twisted.logger import Logger
from twisted.plugin import IPlugin
from twisted.web.client import Agent, FileBodyProducer
from twisted.web.http_headers import Headers
from zope.interface import implementer

from twistmail._httpbody import LimitedBody
from twistmail._logtext import loggableText
from twistmail._netaddr import parseHost
from twistmail.filters.base import Filter
from twistmail.interfaces import IMessageFilterFactory
from twistmail.model import Verdict

log = Logger()

DEFAULT_URL = "http://127.0.0.1:11333"
#: The largest answer read: a reply lists symbols and their options, a few KiB.
MAX_RESPONSE = 1024 * 1024
#: Symbols named in X-Spamd-Result at most, and the longest reply text taken from Rspamd.
MAX_SYMBOLS, MAX_TEXT = 100, 200
CONNECT_TIMEOUT = 10
#: Rspamd's actions that mean spam (its "is_spam").
SPAM = {"reject", "add header", "rewrite subject"}
_SYMBOL = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]+")


class RspamdError(Exception):
    """Rspamd gave no usable answer."""


def smtpText(text, default: str) -> str:
    """Rspamd's message made safe for an SMTP reply line: printable ASCII, bounded."""
    text = _UNPRINTABLE.sub(" ", text if isinstance(text, str) else "").strip()
    return text[:MAX_TEXT] or default


def spamdResult(reply: dict, spam: bool) -> str:
    """The X-Spamd-Result value: ``default: True [score / required]`` and the symbols,
    one per folded line (RFC 5322 §2.2.3)."""
    score, required = _number(reply.get("score")), _number(reply.get("required_score"))
    parts = [f"default: {spam} [{score:.2f} / {required:.2f}]"]
    symbols = reply.get("symbols")
    if isinstance(symbols, dict):
        for name in sorted(symbols)[:MAX_SYMBOLS]:
            details = symbols[name] if isinstance(symbols[name], dict) else {}
            if _SYMBOL.fullmatch(name):
                parts.append(f"{name}({_number(details.get('score')):.2f})")
    return ";\r\n\t".join(parts)


def _number(value) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def verdictFor(reply) -> Verdict:
    """The verdict for Rspamd's parsed answer."""
    if not isinstance(reply, dict) or not isinstance(reply.get("action"), str):
        raise RspamdError("rspamd's answer names no action")
    action = reply["action"]
    messages = reply.get("messages")
    message = messages.get("smtp_message") if isinstance(messages, dict) else None
    if action == "reject":
        return Verdict.reject("5.7.1 " + smtpText(message, "Spam message rejected"), 554)
    if action in ("soft reject", "greylist"):
        return Verdict.tempfail("4.7.1 " + smtpText(message, "Try again later"), 451)
    if action not in ("add header", "rewrite subject", "no action"):
        raise RspamdError(f"rspamd's answer has an unknown action {loggableText(action, 64)!r}")
    spam = action in SPAM
    headers = ((("X-Spam", "Yes"),) if spam else ()) + (("X-Spamd-Result", spamdResult(reply, spam)),)
    if action == "rewrite subject":
        return Verdict.quarantine(headers)
    return Verdict.accept(headers)


class RspamdFilter(Filter):
    """One /checkv2 request per message, at the end of DATA."""

    name = "rspamd"

    def __init__(self, url: str, password: str, agent) -> None:
        self.url = url.rstrip("/").encode("ascii") + b"/checkv2"
        self.password = password
        self.agent = agent

    def requestHeaders(self, session) -> Headers:
        """The envelope, in the headers of Rspamd's protocol."""
        headers = Headers({b"Content-Type": [b"message/rfc822"]})
        address = parseHost(session.client)
        if address is not None:
            headers.addRawHeader("IP", str(address))
        if session.helo:
            headers.addRawHeader("Helo", session.helo)
        if session.sender is not None:
            headers.addRawHeader("From", session.sender or "<>")
        for recipient in session.recipients:
            headers.addRawHeader("Rcpt", recipient)
        if session.id:
            headers.addRawHeader("Queue-Id", session.id)
        if session.authenticated:
            headers.addRawHeader("User", session.authenticated)
        if self.password:
            headers.addRawHeader("Password", self.password)
        return headers

    def endOfData(self, session, message):
        body = message.open()
        d = self.agent.request(b"POST", self.url, self.requestHeaders(session),
                               FileBodyProducer(body))

        def closed(result):
            body.close()
            return result

        d.addBoth(closed)
        d.addCallbacks(self._read, self._unreachable)
        d.addCallback(self._verdict, session)
        return d

    def _unreachable(self, failure):
        if failure.check(RspamdError):
            return failure
        raise RspamdError(f"rspamd at {self.url.decode()} did not answer: {failure.value}")

    def _read(self, response) -> defer.Deferred:
        body = LimitedBody(MAX_RESPONSE, RspamdError, "rspamd's answer")
        response.deliverBody(body)
        finished = body.done
        if response.code != 200:
            def failed(body: bytes):
                raise RspamdError(f"rspamd answered {response.code}: "
                                  f"{loggableText(body.decode('utf-8', 'replace'), 200)}")
            finished.addCallback(failed)
        return finished

    def _verdict(self, body: bytes, session) -> Verdict:
        try:
            reply = json.loads(body)
        except ValueError:
            raise RspamdError("rspamd's answer is not JSON") from None
        verdict = verdictFor(reply)
        log.info("rspamd id={id} client={client} action={action} score={score} result={result}",
                 id=session.id, client=session.client, action=reply["action"],
                 score=_number(reply.get("score")), result=verdict.action)
        return verdict


@implementer(IPlugin, IMessageFilterFactory)
class RspamdFilterFactory:
    name = "rspamd"
    description = "ask Rspamd (HTTP /checkv2) at the end of DATA; its action becomes the verdict"

    def makeFilter(self, options: dict, context) -> RspamdFilter:
        from twistmail.config import ConfigError

        def bad(key: str, problem: str, fix: str) -> ConfigError:
            return ConfigError(f"[filters.rspamd] {key}: {problem}. Fix: {fix}")

        for key in options:
            if key not in ("url", "password"):
                raise bad(key, "unknown option", "use url, password (and timeout, on_failure)")
        url = options.get("url", DEFAULT_URL)
        if not isinstance(url, str) or urlsplit(url).scheme not in ("http", "https") \
                or not urlsplit(url).hostname or not url.isascii():
            raise bad("url", f"{url!r} is not an http:// or https:// URL",
                      f'write e.g. url = "{DEFAULT_URL}"')
        password = options.get("password", "")
        if not isinstance(password, str) or not password.isprintable():
            raise bad("password", "expected a string", 'write e.g. password = "secret", or omit it')
        agent = Agent(context.reactor, connectTimeout=CONNECT_TIMEOUT)
        return RspamdFilter(url, password, agent)
