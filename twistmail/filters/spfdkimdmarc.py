# -*- test-case-name: tests.test_verify_filter -*-
"""The "spf-dkim-dmarc" filter: inbound SPF, DKIM and DMARC, one Authentication-Results header.

At the end of DATA, two jobs run in the shared resolver's DNS pool at once:
SPF (the MAIL FROM identity, and the HELO identity too unless ``spf_helo`` is
off), and the message job (read the spooled file, verify DKIM signatures,
find the DMARC record of the From domain).  Both stop making lookups once the
message's ``time_limit`` is spent.  The reactor then combines them:

* DMARC fail under ``p=reject`` -> ``550 5.7.1`` naming the policy (or Junk
  with ``reject_on_dmarc = false``); under ``p=quarantine`` -> Junk;
* any other outcome -> accepted with the header, including every
  ``temperror``: a DNS problem never rejects mail (RFC 7489 §6.6.2);
* a From header field that is missing, repeated or holds several addresses
  (the DKIM replay / From-spoofing trick, RFC 7489 §6.6.1) is ``dmarc=permerror``
  and gets the strictest policy any of its domains publishes.

Authenticated sessions are not checked (they are our own users submitting),
nor, unless ``check_local`` is on, clients on loopback or in ``[relay]
trusted_networks``: programs on this host and the networks allowed to relay
through us are ours, as OpenDMARC's ``IgnoreHosts`` (127.0.0.1 by default) and
Rspamd's ``check_local = false`` treat them.
"""

from __future__ import annotations

import email.utils
import random
import re
from dataclasses import dataclass

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from twistmail._dnsname import isHostName
from twistmail._logtext import loggable
from twistmail._netaddr import Networks, isLoopback
from twistmail.filters import authresults, dkimverify, dmarc, spfcheck
from twistmail.filters.authresults import Result
from twistmail.filters.base import Filter
from twistmail.filters.lookups import Lookups
from twistmail.interfaces import IMessageFilterFactory
from twistmail.model import FilterContext, Verdict
from twistmail.relay.mx import DNSFailure

NAME = "spf-dkim-dmarc"
log = Logger()


@dataclass(frozen=True)
class Option:
    type: type
    default: object
    minimum: float | None = None


#: The [filters.spf-dkim-dmarc] keys (README.rst and etc/twistmail.toml document each).
OPTIONS = {
    "spf_helo": Option(bool, True),
    "max_signatures": Option(int, 5, 1),
    "dkim_minimum_bits": Option(int, 1024, 1024),
    "reject_on_dmarc": Option(bool, True),
    "time_limit": Option(float, 20.0, 1),
    "check_local": Option(bool, False),
}


def settings(options: dict) -> dict:
    """C{options} checked against L{OPTIONS}, with defaults for the rest.

    @raise twistmail.config.ConfigError: naming the key and the fix.
    """
    from twistmail.config import ConfigError

    where = f"[filters.{NAME}]"
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ConfigError(f"{where} {', '.join(unknown)}: unknown option. Fix: use one of "
                          f"{', '.join(OPTIONS)}")
    checked = {}
    for key, option in OPTIONS.items():
        value = options.get(key, option.default)
        default = str(option.default).lower() if option.type is bool else option.default
        if option.type is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not option.type:
            raise ConfigError(f"{where} {key}: expected {option.type.__name__}, got {value!r}. "
                              f"Fix: write e.g. {key} = {default}")
        if option.minimum is not None and value < option.minimum:
            raise ConfigError(f"{where} {key}: {value} is below the minimum {option.minimum}. "
                              f"Fix: use at least {option.minimum}")
        checked[key] = value
    return checked


#: A From field of a header section, with its folded continuation lines (RFC 5322 §2.2.3).
_FROM_FIELD = re.compile(rb"^from[ \t]*:([^\r\n]*(?:\r?\n[ \t][^\r\n]*)*)", re.IGNORECASE | re.MULTILINE)


def fromValues(raw: bytes) -> list[str]:
    """The values of the From fields in the header section of C{raw}, unfolded.

    Read from the octets: the email package's header registry costs a third
    of a millisecond for one address, and its decoding of encoded words
    (RFC 2047) is nothing DMARC looks at.
    """
    end = min((i for i in (raw.find(b"\r\n\r\n"), raw.find(b"\n\n")) if i >= 0),
              default=len(raw))
    return [re.sub(rb"\r?\n", b"", m.group(1)).decode("utf-8", "surrogateescape")
            for m in _FROM_FIELD.finditer(raw, 0, end + 1)]


def fromDomains(values: list[str]) -> tuple[list[str], str]:
    """(the From domains, the problem with the From field or "") of the From field values.

    RFC 7489 §6.6.1: DMARC evaluates exactly one From address.
    """
    try:
        addresses = email.utils.getaddresses(values)
    except Exception:  # the email package on a header nobody anticipated
        return [], "unparseable From header field"
    domains = []
    for _, address in addresses:
        domain = address.rpartition("@")[2].strip().rstrip(".").lower()
        if isHostName(domain, minLabels=2) and domain not in domains:
            domains.append(domain)
    if len(values) != 1:
        return domains, f"{len(values)} From header fields"
    if len(addresses) != 1:
        return domains, "several addresses in From"
    if not domains:
        return domains, "no domain name in From"
    return domains, ""


class SpfDkimDmarc(Filter):
    """Verify inbound mail; see the module docstring."""

    name = NAME

    def __init__(self, options: dict, hostname: str, resolver,
                 rng: random.Random | None = None, trusted: tuple[str, ...] = ()) -> None:
        """@param trusted: [relay] trusted_networks: not verified, as loopback is not."""
        self._options = settings(options)
        self._trusted = None if self._options["check_local"] else Networks(trusted)
        self._hostname = hostname
        self._resolver = resolver
        self._rng = rng or random.SystemRandom()  # pct= sampling (RFC 7489 §6.6.4)
        dmarc.organizationalDomain("example.org")  # load the suffix list now, not per message

    def _isLocal(self, client: str) -> bool:
        """This host, or a trusted network: not verified unless check_local is on."""
        return self._trusted is not None and (isLoopback(client) or client in self._trusted)

    def endOfData(self, session, message):
        if session.authenticated or session.role != "inbound" or self._isLocal(session.client):
            return None
        lookups = Lookups(self._resolver.resolveSync, self._options["time_limit"])
        jobs = [self._resolver.run(self._spf, lookups, session),
                self._resolver.run(self._message, lookups, message)]
        d = defer.gatherResults(jobs, consumeErrors=True)
        d.addCallback(self._verdict, session)
        return d

    # -- in the DNS pool ----------------------------------------------------------

    def _spf(self, lookups: Lookups, session) -> list:
        identities = ["mailfrom"]
        if self._options["spf_helo"] and session.sender:
            identities.append("helo")  # RFC 7208 §2.3: checked on its own
        results = []
        for identity in identities:
            try:
                results.append(spfcheck.checkHost(lookups, session.client, session.sender or "",
                                                  session.helo, self._hostname, identity))
            except Exception:  # pyspf on input nobody anticipated: not a reject
                results.append(spfcheck.SPFResult("temperror", identity, "", ""))
        return results

    def _message(self, lookups: Lookups, message) -> tuple:
        with message.open() as f:
            raw = f.read()  # bounded by [smtp] max_message_size; dkimpy wants bytes
        dkims = dkimverify.verifyAll(raw, lookups, self._options["max_signatures"],
                                     self._options["dkim_minimum_bits"])
        domains, problem = fromDomains(fromValues(raw))
        policies = {}
        for domain in domains[:dmarc.MAX_FROM_DOMAINS]:
            try:
                policies[domain] = dmarc.discover(lookups, domain)
            except DNSFailure as e:
                policies[domain] = ("temperror", None, e.text)
        return dkims, domains, problem, policies

    # -- on the reactor -----------------------------------------------------------

    def _dmarc(self, spf, dkims, domains, problem, policies) -> dmarc.DMARCResult:
        if problem:
            found = [(d, policies[d][2]) for d in domains if policies.get(d, ("",))[0] == "found"]
            domain, strictest = max(found, key=lambda f: dmarc.POLICIES.index(f[1]),
                                    default=(domains[0] if domains else "", ""))
            return dmarc.DMARCResult("permerror", domain, strictest, strictest or "none", problem)
        domain = domains[0]
        status, record, policy = policies[domain]
        if status != "found":
            return dmarc.DMARCResult(status, domain, reason=policy if status == "temperror" else "")
        return dmarc.evaluate(domain, record, policy, spf, dkims, self._rng)

    def _verdict(self, results, session) -> Verdict:
        spfs, (dkims, domains, problem, policies) = results
        mailfrom = spfs[0]
        verdict = self._dmarc(mailfrom, dkims, domains, problem, policies)
        entries = [Result("spf", r.result, (("smtp.mailfrom", r.sender),) if r.identity == "mailfrom"
                          else (("smtp.helo", session.helo),)) for r in spfs]
        entries += [Result("dkim", d.result, (("header.d", d.domain), ("header.s", d.selector),
                                              ("header.a", d.algorithm), ("header.b", d.b)),
                           reason="" if d.result == "pass" else d.reason) for d in dkims] \
            or [Result("dkim", "none")]
        entries.append(Result("dmarc", verdict.result, (("header.from", verdict.domain),),
                              reason=verdict.reason if verdict.result == "permerror" else "",
                              comment=f"p={verdict.policy}" if verdict.policy else ""))
        headers = (authresults.header(self._hostname, entries),)
        action = verdict.disposition
        if action == "reject" and not self._options["reject_on_dmarc"]:
            action = "quarantine"
        log.info("spf-dkim-dmarc id={id} client={client} from={domain} spf={spf} dkim={dkim} "
                 "dmarc={dmarc} result={action}", id=loggable(session.id),
                 client=loggable(session.client), domain=loggable(verdict.domain or "-"),
                 spf=mailfrom.result, dkim=",".join(d.result for d in dkims) or "none",
                 dmarc=verdict.result, action=action if action != "none" else "accept")
        if action == "reject":
            why = f"{problem} and " if problem else ""
            return Verdict.reject(f"5.7.1 Message rejected: {why}{verdict.domain} publishes the "
                                  "DMARC policy p=reject, and this message does not pass DMARC",
                                  550)
        if action == "quarantine":
            return Verdict.quarantine(headers)
        return Verdict.accept(headers)


@implementer(IMessageFilterFactory)
class SpfDkimDmarcFactory:
    """Registered by L{twistmail.plugins.twistmail_builtin}."""

    name = NAME
    description = "inbound SPF, DKIM and DMARC verification; one Authentication-Results header"

    def makeFilter(self, options: dict, context: FilterContext) -> SpfDkimDmarc:
        trusted = context.config["relay"]["trusted_networks"] if context.config else ()
        return SpfDkimDmarc(options, context.hostname, context.resolver, trusted=tuple(trusted))
