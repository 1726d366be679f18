# -*- test-case-name: tests.test_accounts -*-
"""Domains, users and aliases, kept in ``<data_dir>/accounts.json``.

The admin CLI edits the file (under an fcntl lock, written atomically); the
running server notices the change by stat()ing the file at most once per
``[accounts] reload_interval`` and re-reading it, so no restart is needed.
Passwords are stored only as argon2id hashes.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import time
import unicodedata
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from twistmail._dnsname import isHostName
from twistmail._fsutil import atomicWrite
from twistmail.eai import AddressError, asciiDomain, canonicalAddress, canonicalLocal

FORMAT = "twistmail-accounts"
VERSION = 1
MAX_ALIAS_DEPTH = 10

# Local parts become directory names: keep them to a conservative, case-folded
# set so no name can escape the data directory or clash after case folding.
_LOCALPART = re.compile(r"^[a-z0-9_](?:[a-z0-9_.-]{0,62}[a-z0-9_-])?$")
#: A UTF-8 local part (RFC 6531) is the same shape with letters, digits and combining
#: marks of any script added; it is stored as its canonical UTF-8 (L{twistmail.eai}),
#: readable to the admin as Dovecot and Postfix virtual(8) do.  Without '/', NUL,
#: controls, a leading dot or '..' it cannot leave the domain's directory, and the
#: canonical form (NFC, lower case) gives each account exactly one name.
_UTF8_CATEGORIES = ("Ll", "Lo", "Lm", "Mn", "Mc", "Nd")
_ASCII_LOCAL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_.-")


class AccountError(Exception):
    """A CLI-level mistake; the message says what to do instead."""


class NotLocal(Exception):
    """The address's domain is not one of ours."""


class UnknownUser(Exception):
    """The domain is ours but no user or alias matches."""


def splitAddress(address: str) -> tuple[str, str]:
    """Split at the last @ and case-fold (local parts are case-insensitive here, as in
    Postfix); a UTF-8 local part NFC-normalised, a domain as its IDNA A-label (L{canonicalAddress})."""
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        raise AccountError(f"{address!r} is not an address: write it as user@domain")
    try:
        return canonicalLocal(local), asciiDomain(domain)
    except AddressError as e:
        raise AccountError(f"{address!r}: {e}") from None


def accountKey(address: str) -> str:
    """How an account or alias is looked up: its canonical address, or the address
    lower-cased when it has none (a lookup then simply finds nothing)."""
    try:
        return canonicalAddress(address)
    except AddressError:
        return address.lower()


def _validLocal(local: str) -> bool:
    if local.isascii():
        return bool(_LOCALPART.match(local))
    return local[0] not in ".-" and local[-1] != "." and all(
        c in _ASCII_LOCAL_CHARS if c.isascii() else unicodedata.category(c) in _UTF8_CATEGORIES
        for c in local)


def validDomain(domain: str) -> str:
    try:
        domain = asciiDomain(domain)
    except AddressError as e:
        raise AccountError(f"{domain!r}: {e}") from None
    if not isHostName(domain):  # lower-cased above
        raise AccountError(f"{domain!r} is not a valid domain name (letters, digits, '-' and '.')")
    return domain


def validAddress(address: str, delimiter: str = "+") -> str:
    """Canonical form of an address that may name an account; raise AccountError otherwise."""
    local, domain = splitAddress(address)
    validDomain(domain)
    if not _validLocal(local) or ".." in local:
        raise AccountError(
            f"{address!r}: the local part may hold only letters, digits, '.', '_' and '-' "
            "(not at either end)")
    if delimiter and delimiter in local:
        raise AccountError(f"{address!r}: '{delimiter}' is the recipient delimiter (user+tag)")
    return f"{local}@{domain}"


class Accounts:
    """In-memory view of accounts.json with change detection."""

    def __init__(self, dataDir: str, reloadInterval: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = os.path.join(dataDir, "accounts.json")
        self._reloadInterval = reloadInterval
        self._clock = clock
        self._nextCheck = 0.0
        self._stamp: tuple | None = None
        self.domains: set[str] = set()
        self.users: dict[str, dict] = {}
        self.aliases: dict[str, list[str]] = {}
        self.reload()

    # -- reading ---------------------------------------------------------------

    def _statStamp(self) -> tuple | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def reload(self) -> None:
        """Re-read the file (a missing file is an empty account set)."""
        stamp = self._statStamp()
        data = {"domains": [], "users": {}, "aliases": {}}
        if stamp is not None:
            with open(self.path, "rb") as f:
                loaded = json.load(f)
            if loaded.get("format") != FORMAT or loaded.get("version") != VERSION:
                raise AccountError(
                    f"{self.path}: not a version {VERSION} twistmail accounts file; "
                    "restore it from backup or move it away")
            data = loaded
        self.domains = set(data["domains"])
        self.users = dict(data["users"])
        self.aliases = {k: list(v) for k, v in data["aliases"].items()}
        self._stamp = stamp

    def maybeReload(self) -> None:
        """Reload if the file changed; stat()s at most once per reload interval."""
        now = self._clock()
        if now < self._nextCheck:
            return
        self._nextCheck = now + self._reloadInterval
        if self._statStamp() != self._stamp:
            self.reload()

    # -- queries used by the protocols ----------------------------------------

    def isLocalDomain(self, domain: str) -> bool:
        self.maybeReload()
        try:
            return asciiDomain(domain) in self.domains
        except AddressError:
            return False

    def passwordHash(self, address: str) -> str | None:
        self.maybeReload()
        user = self.users.get(accountKey(address))
        return user["password"] if user else None

    def route(self, address: str, delimiter: str = "+") -> list[str]:
        """Local accounts that mail for C{address} is delivered to.

        Aliases expand recursively (bounded); ``user+tag`` falls back to ``user``
        when no account or alias has the full name.

        @raise NotLocal: the domain is not ours (relaying is a policy decision
            the caller makes).
        @raise UnknownUser: the domain is ours but nobody has this address.
        """
        self.maybeReload()
        try:
            local, domain = splitAddress(address)
        except AccountError:
            try:  # an unusable domain is not ours; an unusable local part in ours is nobody
                ours = asciiDomain(address.rpartition("@")[2]) in self.domains
            except AddressError:
                ours = False
            raise (UnknownUser if ours or "@" not in address else NotLocal)(address) from None
        if domain not in self.domains:
            raise NotLocal(address)
        found = self._expand(f"{local}@{domain}")
        if found is None and delimiter and delimiter in local:
            found = self._expand(f"{local.split(delimiter, 1)[0]}@{domain}")
        if not found:
            raise UnknownUser(address)
        return list(dict.fromkeys(found))

    def _expand(self, address: str) -> list[str] | None:
        """Users C{address} reaches (None if it is neither user nor alias).

        Breadth-first with a visited set: each alias is expanded once, so loops
        and meshes of aliases cost linear time; chains end after MAX_ALIAS_DEPTH hops.
        """
        if address in self.users:
            return [address]
        if address not in self.aliases:
            return None
        found: list[str] = []
        seen = {address}
        frontier = [address]
        for _ in range(MAX_ALIAS_DEPTH):
            following = []
            for alias in frontier:
                for target in self.aliases[alias]:
                    if target in self.users:
                        found.append(target)
                    elif target in self.aliases and target not in seen:
                        seen.add(target)
                        following.append(target)
            frontier = following
        return found

    # -- editing (admin CLI) ---------------------------------------------------

    @contextmanager
    def editing(self) -> Iterator[Accounts]:
        """Lock, re-read, let the caller change, write atomically."""
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        with open(self.path + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.reload()
            yield self
            self.save()

    def save(self) -> None:
        document = {
            "format": FORMAT,
            "version": VERSION,
            "domains": sorted(self.domains),
            "users": dict(sorted(self.users.items())),
            "aliases": dict(sorted(self.aliases.items())),
        }
        atomicWrite(self.path, json.dumps(document, indent=2).encode() + b"\n")
        self._stamp = self._statStamp()

    def addDomain(self, domain: str) -> str:
        domain = validDomain(domain)
        if domain in self.domains:
            raise AccountError(f"domain {domain} already exists")
        self.domains.add(domain)
        return domain

    def removeDomain(self, domain: str) -> str:
        domain = validDomain(domain)
        if domain not in self.domains:
            raise AccountError(f"domain {domain} does not exist (see: twistmail domain list)")
        inUse = [a for a in [*self.users, *self.aliases] if a.endswith("@" + domain)]
        if inUse:
            raise AccountError(
                f"domain {domain} still has {len(inUse)} users/aliases (e.g. {inUse[0]}); "
                "remove them first")
        self.domains.discard(domain)
        return domain

    def checkNewUser(self, address: str) -> str:
        """Canonical address if C{address} can be added; AccountError saying why not."""
        address = validAddress(address)
        domain = address.split("@")[1]
        if domain not in self.domains:
            raise AccountError(f"domain {domain} is not local: run 'twistmail domain add {domain}' first")
        if address in self.users or address in self.aliases:
            raise AccountError(f"{address} already exists")
        return address

    def addUser(self, address: str, passwordHash: str) -> str:
        address = self.checkNewUser(address)
        self.users[address] = {"password": passwordHash}
        return address

    def setPassword(self, address: str, passwordHash: str) -> str:
        address = accountKey(address)
        if address not in self.users:
            raise AccountError(f"no user {address} (see: twistmail user list)")
        self.users[address]["password"] = passwordHash
        return address

    def quota(self, address: str) -> dict | None:
        """The user's own quota (``{"storage": octets, "messages": count}``, a missing
        or zero resource unlimited), or None when the user has none of their own."""
        self.maybeReload()
        user = self.users.get(accountKey(address))
        return None if user is None else user.get("quota")

    def setQuota(self, address: str, quota: dict | None) -> str:
        """Give the user a quota of their own; None: the configured default applies."""
        address = accountKey(address)
        if address not in self.users:
            raise AccountError(f"no user {address} (see: twistmail user list)")
        if quota is None:
            self.users[address].pop("quota", None)
        else:
            self.users[address]["quota"] = quota
        return address

    def removeUser(self, address: str) -> str:
        address = accountKey(address)
        if address not in self.users:
            raise AccountError(f"no user {address} (see: twistmail user list)")
        del self.users[address]
        return address

    def addAlias(self, source: str, targets: list[str]) -> str:
        source = validAddress(source)
        if source.split("@")[1] not in self.domains:
            raise AccountError(f"domain of {source} is not local: run 'twistmail domain add' first")
        if source in self.users:
            raise AccountError(f"{source} is a user; an alias cannot shadow it")
        canonical = []
        for target in targets:
            local, domain = splitAddress(target)
            if domain not in self.domains:
                raise AccountError(
                    f"alias target {target} is not in a local domain; aliases cannot forward "
                    "to other domains yet")
            canonical.append(f"{local}@{domain}")
        if not canonical:
            raise AccountError("an alias needs at least one target")
        self.aliases[source] = sorted(set(self.aliases.get(source, [])) | set(canonical))
        return source

    def removeAlias(self, source: str) -> str:
        source = accountKey(source)
        if source not in self.aliases:
            raise AccountError(f"no alias {source} (see: twistmail alias list)")
        del self.aliases[source]
        return source


_UNITS = {"": 1, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3, "T": 1024 ** 4}


def parseQuota(size: str, messages: int | None = None) -> dict | None:
    """A quota as ``twistmail user quota`` and the web admin take it: SIZE in octets or
    with K, M, G, T (binary units), ``unlimited``, or ``default`` (None: [accounts]
    default_quota applies); C{messages} 0 or None for no count limit.

    @raise AccountError: naming what to write instead.
    """
    size = size.strip().upper()
    if messages is not None and messages < 0:
        raise AccountError("the message limit is a count, 0 for no limit")
    quota: dict | None
    if size == "DEFAULT":
        quota = None
    elif size == "UNLIMITED":
        quota = {}
    elif size[:-1].isdigit() and size[-1] in _UNITS or size.isdigit():
        number, unit = (size, "") if size.isdigit() else (size[:-1], size[-1])
        quota = {"storage": int(number) * _UNITS[unit]}
    else:
        raise AccountError(f"quota size {size!r}: write octets or a number with K, M, G or T "
                           "(10M), 'unlimited' or 'default'")
    if messages and quota is not None:
        quota["messages"] = messages
    return quota


def describeQuota(address: str, quota: dict | None) -> str:
    """What a quota change did, in the CLI's and the web admin's words."""
    if quota is None:
        return f"quota of {address}: the default ([accounts] default_quota)"
    storage = f"{quota['storage']} octets" if quota.get("storage") else "unlimited storage"
    return f"quota of {address}: {storage}, " + (
        f"{quota['messages']} messages" if quota.get("messages") else "any number of messages")
