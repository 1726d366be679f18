# -*- test-case-name: tests.test_dkimkeys -*-
"""DKIM signing keys: made by ``twistmail dkim generate``, read by the signer.

Layout: ``<data_dir>/dkim/<domain>/<set>/{ed25519,rsa}.pem`` (PKCS#8, mode
0600).  A key *set* is one Ed25519 and one RSA-2048 key, published under two
selectors, ``<set>-ed25519`` and ``<set>-rsa`` (RFC 8463 §3: each key needs
its own selector; a verifier that knows only RSA ignores the Ed25519 one).

A domain holds at most two sets so keys can be rotated; the *oldest* set
signs.  A new set therefore never signs before its records are published:
generate it, publish, wait for the TTL, then remove the old set.

The running server reads keys through L{KeyRing}, which re-checks a domain's
directory (one stat) at most every L{REFRESH} seconds, so a new or removed
set takes effect within seconds without a restart.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from twistmail._dnsname import LABEL, isHostName
from twistmail._fsutil import fsyncDir, tempName

#: Key sets per domain: the signing one and the one being rotated in.
MAX_SETS = 2
#: Seconds a domain's keys are used before its directory is stat()ed again.
REFRESH = 2.0
#: Domains whose keys (or their absence) L{KeyRing} remembers.
MAX_CACHED = 1024
RSA_BITS = 2048
ALGORITHMS = ("ed25519", "rsa")

_SET_MAX = 63 - len("-ed25519")  # the selector is one DNS label (RFC 6376 §3.1)


class DKIMKeyError(Exception):
    """A refused name or a full domain; the text says what to do."""


def checkDomain(domain: str) -> str:
    """The domain in lower case; L{DKIMKeyError} for anything that is not a host name
    (which also rules out path tricks: no "/", "..", or empty labels)."""
    name = domain.strip().rstrip(".").lower()
    if not isHostName(name, minLabels=2):
        raise DKIMKeyError(f"{domain!r} is not a domain name (like example.org)")
    return name


def checkSetName(name: str) -> str:
    """A key-set name: one LDH label, short enough for the ``-ed25519`` suffix."""
    if not re.fullmatch(LABEL, name) or len(name) > _SET_MAX:
        raise DKIMKeyError(f"{name!r} is not a selector: use letters, digits and '-', at most "
                        f"{_SET_MAX} characters (like 202612)")
    return name.lower()


def defaultSetName(now: float) -> str:
    """``tm`` + the UTC date, e.g. ``tm20261204``: sortable and says when it was made."""
    return "tm" + time.strftime("%Y%m%d", time.gmtime(now))


@dataclass(frozen=True)
class KeySet:
    """One Ed25519 and one RSA key of a domain, with the selectors they sign under."""

    domain: str
    name: str
    created: float
    ed25519: ed25519.Ed25519PrivateKey
    rsa: rsa.RSAPrivateKey

    def selector(self, algorithm: str) -> str:
        return f"{self.name}-{algorithm}"

    def publicKey(self, algorithm: str) -> str:
        """The p= value of the key record (RFC 6376 §3.6.1; RFC 8463 §4.2: Ed25519 raw)."""
        if algorithm == "ed25519":
            raw = self.ed25519.public_key().public_bytes(serialization.Encoding.Raw,
                                                         serialization.PublicFormat.Raw)
        else:
            raw = self.rsa.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        return base64.b64encode(raw).decode("ascii")

    def txtValue(self, algorithm: str) -> str:
        """The TXT record's text (RFC 6376 §3.6.1)."""
        return f"v=DKIM1; k={algorithm}; p={self.publicKey(algorithm)}"

    def records(self) -> list[tuple[str, str]]:
        """(owner name, TXT text) for both selectors."""
        return [(f"{self.selector(a)}._domainkey.{self.domain}", self.txtValue(a))
                for a in ALGORITHMS]


def zoneTXT(owner: str, text: str) -> str:
    """A TXT record in zone-file syntax; text over 255 octets split into strings
    (RFC 1035 §3.3.14: a character-string is at most 255 octets)."""
    chunks = [text[i:i + 255] for i in range(0, len(text), 255)] or [""]
    return f"{owner}. IN TXT " + " ".join(f'"{c}"' for c in chunks)


def keyDir(dataDir: str) -> str:
    return os.path.join(dataDir, "dkim")


def _pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _load(domain: str, name: str, path: str) -> KeySet:
    keys = {}
    for algorithm, kind in (("ed25519", ed25519.Ed25519PrivateKey), ("rsa", rsa.RSAPrivateKey)):
        file = os.path.join(path, f"{algorithm}.pem")
        with open(file, "rb") as f:
            try:
                keys[algorithm] = serialization.load_pem_private_key(f.read(), None)
            except (ValueError, TypeError, UnsupportedAlgorithm):
                keys[algorithm] = None
        if not isinstance(keys[algorithm], kind):
            raise DKIMKeyError(f"{file} is not an unencrypted {algorithm} private key in PEM; "
                               f"run twistmail dkim remove {domain} {name}, then generate a "
                               "new set")
    created = os.stat(os.path.join(path, "ed25519.pem")).st_mtime
    return KeySet(domain, name, created, keys["ed25519"], keys["rsa"])


def listSets(dataDir: str, domain: str) -> list[KeySet]:
    """The key sets of C{domain}, oldest (the signing one) first."""
    directory = os.path.join(keyDir(dataDir), domain)
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        path = os.path.join(directory, name)
        if ".tmp." in name or not os.path.isdir(path):
            continue  # a generate in progress (or killed half-way)
        found.append(_load(domain, name, path))
    return sorted(found, key=lambda s: (s.created, s.name))


def listDomains(dataDir: str) -> list[str]:
    try:
        return sorted(d for d in os.listdir(keyDir(dataDir)) if isHostName(d, minLabels=2))
    except FileNotFoundError:
        return []


def generate(dataDir: str, domain: str, name: str) -> KeySet:
    """Make and store a new key set; refuse a third set or a name in use.

    Atomic: the two keys are written into a temporary directory that is
    renamed into place, so the signer never sees half a set.
    """
    domain, name = checkDomain(domain), checkSetName(name)
    existing = listSets(dataDir, domain)
    if any(s.name == name for s in existing):
        raise DKIMKeyError(f"{domain} already has the selector {name}; choose another with "
                        "--selector")
    if len(existing) >= MAX_SETS:
        raise DKIMKeyError(f"{domain} has {MAX_SETS} key sets already ("
                        f"{', '.join(s.name for s in existing)}); remove the older one first: "
                        f"twistmail dkim remove {domain} {existing[0].name}")
    parent = os.path.join(keyDir(dataDir), domain)
    os.makedirs(parent, mode=0o700, exist_ok=True)
    final = os.path.join(parent, name)
    tmp = tempName(final)
    os.mkdir(tmp, 0o700)
    try:
        for algorithm, key in (("rsa", rsa.generate_private_key(65537, RSA_BITS)),
                               ("ed25519", ed25519.Ed25519PrivateKey.generate())):
            fd = os.open(os.path.join(tmp, f"{algorithm}.pem"),
                         os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(_pem(key))
                f.flush()
                os.fsync(f.fileno())
        fsyncDir(tmp)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsyncDir(parent)
    return _load(domain, name, final)


def remove(dataDir: str, domain: str, name: str) -> None:
    domain, name = checkDomain(domain), checkSetName(name)
    parent = os.path.join(keyDir(dataDir), domain)
    path = os.path.join(parent, name)
    if not os.path.isdir(path):
        raise DKIMKeyError(f"{domain} has no selector {name} (see: twistmail dkim list)")
    shutil.rmtree(path)
    fsyncDir(parent)
    if not os.listdir(parent):
        os.rmdir(parent)


class KeyRing:
    """The signing key set per domain, for the server: cached, refreshed by stat().

    Blocking (stat, and reading keys when they changed): call it from a worker
    thread, as the signer does.  Thread-safe; remembers at most C{maxCached}
    domains (least recently used dropped).
    """

    def __init__(self, dataDir: str, refresh: float = REFRESH,
                 clock: Callable[[], float] = time.monotonic, maxCached: int = MAX_CACHED) -> None:
        self._dir = keyDir(dataDir)
        self._dataDir = dataDir
        self._refresh = refresh
        self._clock = clock
        self._max = maxCached
        self._lock = threading.Lock()
        # domain -> (checked at, directory stamp, signing set or None)
        self._cache: OrderedDict[str, tuple[float, tuple | None, KeySet | None]] = OrderedDict()

    def _stamp(self, domain: str) -> tuple | None:
        try:
            st = os.stat(os.path.join(self._dir, domain))
        except (FileNotFoundError, NotADirectoryError):
            return None
        return (st.st_ino, st.st_mtime_ns)

    def signing(self, domain: str) -> KeySet | None:
        """The set that signs for exactly C{domain} (the oldest), or None."""
        now = self._clock()
        with self._lock:
            cached = self._cache.get(domain)
            if cached is not None:
                self._cache.move_to_end(domain)
                if now - cached[0] < self._refresh:
                    return cached[2]
        stamp = self._stamp(domain)
        if cached is not None and stamp == cached[1]:
            keys = cached[2]
        else:
            keys = None
            if stamp is not None:
                sets = listSets(self._dataDir, domain)
                keys = sets[0] if sets else None
        with self._lock:
            self._cache[domain] = (now, stamp, keys)
            self._cache.move_to_end(domain)
            while len(self._cache) > self._max:
                self._cache.popitem(last=False)
        return keys

    def forAddressDomain(self, domain: str) -> KeySet | None:
        """The keys for C{domain}, else for the nearest parent domain that has keys.

        A parent's signature (d=example.org for From: a@mail.example.org) still
        aligns under DMARC's relaxed mode (RFC 7489 §3.1.1), the default.
        """
        try:
            domain = checkDomain(domain)
        except DKIMKeyError:
            return None
        labels = domain.split(".")
        for i in range(len(labels) - 1):
            keys = self.signing(".".join(labels[i:]))
            if keys is not None:
                return keys
        return None
