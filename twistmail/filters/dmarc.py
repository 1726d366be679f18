# -*- test-case-name: tests.test_verify_filter -*-
"""DMARC (RFC 7489): policy discovery, identifier alignment and the resulting disposition.

The organizational domain comes from the Public Suffix List bundled with the
``publicsuffixlist`` package (no network at run time; a package upgrade
updates the list).  Records are parsed leniently as §6.3 asks: unknown tags
and bad values of optional tags are ignored in favour of defaults; only a
missing or invalid ``p=`` (or invalid ``sp=``) without a usable ``rua=`` makes
the record unusable (§6.6.3).
"""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence
from dataclasses import dataclass

from publicsuffixlist import PublicSuffixList

from twistmail.filters.lookups import Lookups

POLICIES = ("none", "quarantine", "reject")
#: §6.6.4: a message not sampled by pct= gets the next policy down.
_DOWNGRADE = {"reject": "quarantine", "quarantine": "none", "none": "none"}
#: From domains whose policy a message with several From addresses is checked against.
MAX_FROM_DOMAINS = 5


@dataclass(frozen=True)
class Record:
    p: str
    sp: str
    adkim: str = "r"
    aspf: str = "r"
    pct: int = 100


@dataclass(frozen=True)
class DMARCResult:
    result: str  # pass, fail, none, permerror, temperror
    domain: str = ""  # header.from
    policy: str = ""  # the published policy that applied ("" when none)
    disposition: str = "none"  # what to do: none, quarantine, reject
    reason: str = ""


@functools.cache
def _psl() -> PublicSuffixList:
    return PublicSuffixList()  # the bundled list: parsed once, a few ms


#: Organizational domains kept (L{organizationalDomain}): each alignment check asks twice.
ORG_DOMAIN_CACHE = 4096


@functools.lru_cache(maxsize=ORG_DOMAIN_CACHE)
def organizationalDomain(domain: str) -> str:
    """RFC 7489 §3.2: the public suffix plus one label (the domain itself if shorter)."""
    domain = domain.lower().rstrip(".")
    return _psl().privatesuffix(domain) or domain


def aligned(a: str, b: str, mode: str) -> bool:
    """§3.1.1/§3.1.2: strict is the same name; relaxed the same organizational domain."""
    a, b = a.lower().rstrip("."), b.lower().rstrip(".")
    if mode == "s":
        return a == b
    return organizationalDomain(a) == organizationalDomain(b)


def parseRecord(text: str) -> Record | None:
    """The record, or None when it does not give a usable policy (§6.3, §6.6.3)."""
    tags: dict[str, str] = {}
    for part in text.split(";"):
        name, eq, value = part.partition("=")
        if eq:
            tags.setdefault(name.strip().lower(), value.strip())
    p, sp = tags.get("p", "").lower(), tags.get("sp", "").lower()
    if p not in POLICIES or (sp and sp not in POLICIES):
        # §6.6.3: with a valid rua the receiver acts as if p=none was published.
        if any(":" in uri and uri.split(":", 1)[0].isalpha() and " " not in uri.strip()
               for uri in tags.get("rua", "").split(",")):
            p, sp = "none", ""
        else:
            return None
    pct = tags.get("pct", "100")
    return Record(p=p, sp=sp or p,
                  adkim="s" if tags.get("adkim", "").lower() == "s" else "r",
                  aspf="s" if tags.get("aspf", "").lower() == "s" else "r",
                  pct=int(pct) if pct.isdigit() and int(pct) <= 100 else 100)


def _recordsAt(lookups: Lookups, domain: str) -> list[str]:
    # §6.6.3 step 2: records not starting with v=DMARC1 are discarded.
    texts = [b"".join(r.strings).decode("utf-8", "replace")
             for r in lookups.records(f"_dmarc.{domain}", "TXT")]
    return [t for t in texts if t.replace(" ", "").startswith("v=DMARC1")
            and t.replace(" ", "")[8:9] in ("", ";")]


def discover(lookups: Lookups, fromDomain: str) -> tuple[str, Record | None, str]:
    """(status, record, policy) for C{fromDomain}: status is "found", "none" or "permerror".

    §6.6.3: _dmarc.<From domain>, then _dmarc.<organizational domain>; the
    policy is C{sp} when the record came from the organizational domain of a
    subdomain.  Blocking; a temporary L{DNSFailure} propagates.
    """
    texts = _recordsAt(lookups, fromDomain)
    orgDomain = organizationalDomain(fromDomain)
    subdomain = False
    if not texts and orgDomain != fromDomain:
        texts, subdomain = _recordsAt(lookups, orgDomain), True
    if not texts:
        return "none", None, ""
    if len(texts) > 1:
        return "permerror", None, ""  # §6.6.3 step 4: several records -> no DMARC processing
    record = parseRecord(texts[0])
    if record is None:
        return "none", None, ""
    return "found", record, record.sp if subdomain else record.p


def evaluate(fromDomain: str, record: Record, policy: str, spf, dkims: Sequence,
             rng: random.Random) -> DMARCResult:
    """The DMARC result for one From domain, from the SPF and DKIM results (§3.1, §6.6.2).

    C{spf} is the MAIL FROM identity's result (HELO for ``<>``); C{dkims} has
    ``.result``/``.domain``.  No pass and a temporary error among the checks is
    ``temperror``: a DNS hiccup never rejects mail.
    """
    if spf is not None and spf.result == "pass" and aligned(spf.domain, fromDomain, record.aspf):
        return DMARCResult("pass", fromDomain, policy)
    if any(d.result == "pass" and aligned(d.domain, fromDomain, record.adkim) for d in dkims):
        return DMARCResult("pass", fromDomain, policy)
    if (spf is not None and spf.result == "temperror") or any(d.result == "temperror"
                                                               for d in dkims):
        return DMARCResult("temperror", fromDomain, policy, reason="a check could not finish")
    disposition = policy
    if rng.random() * 100 >= record.pct:  # §6.6.4: not sampled
        disposition = _DOWNGRADE[policy]
    return DMARCResult("fail", fromDomain, policy, disposition)
