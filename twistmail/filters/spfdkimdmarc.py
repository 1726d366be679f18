# -*- test-case-name: tests.test_verify_filter -*-
"""The "spf-dkim-dmarc" filter: inbound SPF, DKIM and DMARC, one Authentication-Results header.

When every answer the checks need is already kept by the shared resolver
(the usual case: mail comes again and again from the same domains) and the
message is small and in memory, the checks run at once on the reactor
thread, all but DKIM, which a child process verifies beside it
(L{twistmail.filters.dkimprocess}; in this thread with ``dkim_processes =
0``).  Otherwise two jobs run in the shared resolver's DNS pool at once:
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
import time
from dataclasses import dataclass

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from twistmail._dnsname import isHostName
from twistmail._logtext import loggable
from twistmail._netaddr import Networks, isLoopback
from twistmail.filters import authresults, dkimprocess, dkimverify, dmarc, spfcheck
from twistmail.filters.authresults import Result
from twistmail.filters.base import Filter
from twistmail.filters.lookups import CachedLookups, Lookups
from twistmail.interfaces import IMessageFilterFactory
from twistmail.model import FilterContext, Verdict
from twistmail.relay.mx import DNSFailure

NAME = "spf-dkim-dmarc"
log = Logger()

#: A message in memory of at most this many octets, whose lookups the cache answers, is
#: checked on the reactor thread: about half a millisecond of CPU, less than what two
#: jobs in the pool cost in thread hand-offs.  Larger ones are hashed in the pool.
INLINE_SIZE = 64 * 1024
#: SPF results kept (L{SpfDkimDmarc._keptSpf}), by client, sender and HELO name; as
#: many DMARC policies, by From field (L{SpfDkimDmarc._keptPolicies}).
KEPT_RESULTS = 10000


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
    "dkim_processes": Option(int, 1, 0),
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
                 rng: random.Random | None = None, trusted: tuple[str, ...] = (),
                 reactor=None) -> None:
        """@param trusted: [relay] trusted_networks: not verified, as loopback is not.
        @param reactor: runs the DKIM processes; without one DKIM is verified here."""
        self._options = settings(options)
        self._spfResults: dict[tuple, tuple[list, float]] = {}  # see _keptSpf
        self._policyResults: dict[tuple, tuple[tuple, float]] = {}  # see _keptPolicies
        self._processes = None
        if reactor is not None and self._options["dkim_processes"]:
            self._processes = dkimprocess.DKIMProcesses(reactor, self._options["dkim_processes"])
            reactor.addSystemEventTrigger("before", "shutdown", self._processes.stop)
        self._trusted = None if self._options["check_local"] else Networks(trusted)
        self._hostname = hostname
        self._resolver = resolver
        self._rng = rng or _SYSTEM_RANDOM
        dmarc.organizationalDomain("example.org")  # load the suffix list now, not per message

    def _isLocal(self, client: str) -> bool:
        """This host, or a trusted network: not verified unless check_local is on."""
        return self._trusted is not None and (isLoopback(client) or client in self._trusted)

    def endOfData(self, session, message):
        if session.authenticated or session.role != "inbound" or self._isLocal(session.client):
            return None
        if message.inMemory and message.size <= INLINE_SIZE:
            checked = self._atOnce(session, message)
            if checked is not None:
                return checked
        return self._inPool(session, message)

    def _inPool(self, session, message) -> defer.Deferred:
        lookups = Lookups(self._resolver.resolveSync, self._options["time_limit"])
        jobs = [self._resolver.run(self._spf, lookups, session),
                self._resolver.run(self._message, lookups, message)]
        d = defer.gatherResults(jobs, consumeErrors=True)
        d.addCallback(self._verdict, session)
        return d

    def _atOnce(self, session, message):
        """The checks on the reactor thread from kept answers, DKIM in a child process
        when there are any; None when an answer is not kept."""
        spf = self._keptSpf(session)
        if spf is None:
            return None
        cached = CachedLookups(self._resolver.resolveCached, self._options["time_limit"])
        with message.open() as f:
            raw = f.read()  # in memory, at most INLINE_SIZE
        policies = self._keptPolicies(raw)
        if policies is None:
            return None
        if self._processes is None:
            dkims = self._dkim(cached, raw)
            return None if cached.missed else self._verdict([spf, (dkims, *policies)], session)
        keys = {}
        for name in dkimverify.keyNames(raw, self._options["max_signatures"]):
            try:
                keys[name] = [b"".join(r.strings) for r in cached.records(name, "TXT")]
            except DNSFailure:
                return None
        then = (decide, (self._hostname, spf, *policies, session.helo))
        d = self._processes.verify(raw, keys, self._options["max_signatures"],
                                   self._options["dkim_minimum_bits"], then)

        def verified(decided):
            if decided == dkimprocess.MISSED:
                return self._inPool(session, message)
            return self._conclude(spf, policies[1], decided, session)

        def failed(failure):
            log.warn("spf-dkim-dmarc id={id}: DKIM verification process failed ({why}); "
                     "verifying in the DNS pool", id=loggable(session.id),
                     why=failure.getErrorMessage())
            return self._inPool(session, message)

        return d.addCallbacks(verified, failed)

    def _keptSpf(self, session) -> list | None:
        """The SPF results from kept answers; None when one is not kept.

        check_host() is a function of the client, the sender, the HELO name and
        DNS answers (RFC 7208 §4), so its result is kept with the session's
        three, until the first answer it was made of expires.
        """
        return self._kept(self._spfResults, (session.client, session.sender, session.helo),
                          lambda lookups: self._spf(lookups, session))

    def _keptPolicies(self, raw: bytes) -> tuple | None:
        """L{_policies} from kept answers, kept by the From field's text until the
        first DMARC answer expires; None when one is not kept."""
        values = tuple(fromValues(raw))
        return self._kept(self._policyResults, values,
                          lambda lookups: self._policies(lookups, raw, values))

    def _kept(self, memo: dict, key, make):
        """C{make(lookups)} from kept answers, remembered in C{memo} by C{key} until the
        first answer it was made of expires; None when an answer is not kept."""
        kept = memo.get(key)
        if kept is not None and kept[1] > time.time():
            return kept[0]
        cached = CachedLookups(self._resolver.resolveCached, self._options["time_limit"])
        value = make(cached)
        if cached.missed:
            return None
        if len(memo) >= KEPT_RESULTS:
            memo.clear()
        memo[key] = (value, cached.expires)
        return value

    # -- in the DNS pool (or on the reactor, from kept answers) -----------------------

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
        return (self._dkim(lookups, raw), *self._policies(lookups, raw))

    def _dkim(self, lookups: Lookups, raw: bytes) -> list:
        return dkimverify.verifyAll(raw, lookups, self._options["max_signatures"],
                                    self._options["dkim_minimum_bits"])

    def _policies(self, lookups: Lookups, raw: bytes, values: tuple | None = None) -> tuple:
        """(From domains, the problem with From or "", their DMARC records)."""
        domains, problem = fromDomains(list(fromValues(raw) if values is None else values))
        policies = {}
        for domain in domains[:dmarc.MAX_FROM_DOMAINS]:
            try:
                policies[domain] = dmarc.discover(lookups, domain)
            except DNSFailure as e:
                policies[domain] = ("temperror", None, e.text)
        return domains, problem, policies

    # -- on the reactor -----------------------------------------------------------

    def _verdict(self, results, session) -> Verdict:
        spfs, (dkims, domains, problem, policies) = results
        decided = decide(dkims, self._hostname, spfs, domains, problem, policies, session.helo,
                         self._rng)
        return self._conclude(spfs, problem, decided, session)

    def _conclude(self, spfs, problem: str, decided: tuple, session) -> Verdict:
        """The verdict, and its log line, for what L{decide} found."""
        dkims, verdict, header = decided
        action = verdict.disposition
        if action == "reject" and not self._options["reject_on_dmarc"]:
            action = "quarantine"
        fields = {"id": loggable(session.id), "client": loggable(session.client),
                  "domain": loggable(verdict.domain or "-"), "spf": spfs[0].result,
                  "dkim": ",".join(d.result for d in dkims) or "none", "dmarc": verdict.result,
                  "action": action if action != "none" else "accept"}
        # One field to format: Twisted's string.Formatter costs about a microsecond a
        # field on the reactor thread; the fields stay in the event for other observers.
        log.info("spf-dkim-dmarc {text}", text="id={id} client={client} from={domain} spf={spf} "
                 "dkim={dkim} dmarc={dmarc} result={action}".format_map(fields), **fields)
        if action == "reject":
            why = f"{problem} and " if problem else ""
            return Verdict.reject(f"5.7.1 Message rejected: {why}{verdict.domain} publishes the "
                                  "DMARC policy p=reject, and this message does not pass DMARC",
                                  550)
        if action == "quarantine":
            return Verdict.quarantine((header,))
        return Verdict.accept((header,))


def _dmarcResult(spf, dkims, domains, problem, policies, rng) -> dmarc.DMARCResult:
    if problem:
        found = [(d, policies[d][2]) for d in domains if policies.get(d, ("",))[0] == "found"]
        domain, strictest = max(found, key=lambda f: dmarc.POLICIES.index(f[1]),
                                default=(domains[0] if domains else "", ""))
        return dmarc.DMARCResult("permerror", domain, strictest, strictest or "none", problem)
    domain = domains[0]
    status, record, policy = policies[domain]
    if status != "found":
        return dmarc.DMARCResult(status, domain, reason=policy if status == "temperror" else "")
    return dmarc.evaluate(domain, record, policy, spf, dkims, rng)


def decide(dkims: list, hostname: str, spfs: list, domains: list, problem: str, policies: dict,
           helo: str, rng: random.Random | None = None) -> tuple:
    """(C{dkims}, the DMARC result, the Authentication-Results field) of one message.

    A function of its arguments alone, so the DKIM process runs it too, after
    verifying (L{twistmail.filters.dkimprocess}): the server then only logs.
    """
    verdict = _dmarcResult(spfs[0], dkims, domains, problem, policies, rng or _SYSTEM_RANDOM)
    entries = [Result("spf", r.result, (("smtp.mailfrom", r.sender),) if r.identity == "mailfrom"
                      else (("smtp.helo", helo),)) for r in spfs]
    entries += [Result("dkim", d.result, (("header.d", d.domain), ("header.s", d.selector),
                                          ("header.a", d.algorithm), ("header.b", d.b)),
                       reason="" if d.result == "pass" else d.reason) for d in dkims] \
        or [Result("dkim", "none")]
    entries.append(Result("dmarc", verdict.result, (("header.from", verdict.domain),),
                          reason=verdict.reason if verdict.result == "permerror" else "",
                          comment=f"p={verdict.policy}" if verdict.policy else ""))
    return dkims, verdict, authresults.header(hostname, entries)


_SYSTEM_RANDOM = random.SystemRandom()  # pct= sampling (RFC 7489 §6.6.4)


@implementer(IMessageFilterFactory)
class SpfDkimDmarcFactory:
    """Registered by L{twistmail.plugins.twistmail_builtin}."""

    name = NAME
    description = "inbound SPF, DKIM and DMARC verification; one Authentication-Results header"

    def makeFilter(self, options: dict, context: FilterContext) -> SpfDkimDmarc:
        trusted = context.config["relay"]["trusted_networks"] if context.config else ()
        return SpfDkimDmarc(options, context.hostname, context.resolver, trusted=tuple(trusted),
                            reactor=context.reactor)
