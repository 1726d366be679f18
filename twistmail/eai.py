# -*- test-case-name: tests.test_eai -*-
"""Internationalised email addresses (EAI, RFC 6530-6532): the one canonical form in
which an address is stored, compared and routed.

* **Domains** become IDNA 2008 A-labels (the ``idna`` package, with the UTS #46
  mapping, so ``Bücher.Example`` and ``xn--bcher-kva.example`` are one domain).  A-labels
  are what DNS carries (RFC 5890 §2.3.2.1), they keep every domain in accounts.json
  and every directory name under the data directory an LDH name, and an address
  with an ASCII local part stays deliverable to a hop without SMTPUTF8.
* **Local parts** are NFC-normalised (RFC 6532 §3.1), lower-cased and normalised
  again (lower-casing can decompose: ``İ``).
* **Mixed scripts** in one label or local part (a Cyrillic ``а`` among Latin letters)
  are refused: no legitimate name needs them and they make look-alike addresses.
  Han, Hiragana, Katakana and Hangul count as one script (Japanese and Korean mix them).
"""

from __future__ import annotations

import unicodedata

import idna

#: RFC 5321 §4.5.3.1.1: a local part is at most 64 octets (UTF-8 octets, RFC 6531 §3.3).
MAX_LOCAL = 64
_EAST_ASIAN = frozenset({"CJK", "HIRAGANA", "KATAKANA", "KATAKANA-HIRAGANA", "HANGUL",
                         "IDEOGRAPHIC"})


class AddressError(ValueError):
    """An address that cannot be stored, compared or routed; the message says why."""


def decodePath(raw: bytes) -> str:
    """An SMTP path's octets as text: strict UTF-8 (RFC 6531 §3.3 uses RFC 3629),
    NFC-normalised; no control characters (C0, DEL, C1)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise AddressError("not valid UTF-8") from None
    if any(unicodedata.category(c) in ("Cc", "Cs") for c in text):
        raise AddressError("control character")
    return unicodedata.normalize("NFC", text)


def asciiDomain(domain: str) -> str:
    """The A-label form of C{domain}, lower-cased, no trailing dot; an ASCII name is
    only lower-cased (its syntax is the caller's check)."""
    domain = domain.rstrip(".")
    if domain.isascii():
        return domain.lower()
    for label in domain.split("."):
        _oneScript(label, "domain label")
    try:
        return idna.encode(domain, uts46=True).decode("ascii").lower()
    except (idna.IDNAError, UnicodeError) as e:
        raise AddressError(f"not an IDNA 2008 domain name ({e})") from None


def canonicalLocal(local: str) -> str:
    """NFC, lower-cased, NFC again; at most L{MAX_LOCAL} octets, one script."""
    local = unicodedata.normalize("NFC", unicodedata.normalize("NFC", local).lower())
    if not local.isascii():
        if len(local.encode("utf-8")) > MAX_LOCAL:
            raise AddressError(f"local part longer than {MAX_LOCAL} octets")
        _oneScript(local, "local part")
    return local


def canonicalAddress(address: str) -> str:
    """C{local@domain} in canonical form (split at the last @)."""
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        raise AddressError("not local@domain")
    return f"{canonicalLocal(local)}@{asciiDomain(domain)}"


def _script(c: str) -> str | None:
    """The script of a letter, from its Unicode name's first word; None for the
    characters every script shares (digits, punctuation, combining marks)."""
    if not unicodedata.category(c).startswith("L"):
        return None
    word = unicodedata.name(c, "?").split(" ", 1)[0]
    return "CJK" if word in _EAST_ASIAN else word


def _oneScript(text: str, what: str) -> None:
    scripts = {s for s in map(_script, text) if s}
    if len(scripts) > 1:
        raise AddressError(f"{what} mixes scripts ({', '.join(sorted(scripts))})")
