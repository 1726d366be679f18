# -*- test-case-name: tests.test_accounts -*-
"""Password hashing: argon2id via argon2-cffi, with OWASP's recommended parameters.

A mail server verifies a password on every POP3, IMAP and submission
connection, and phones and IMAP clients open many of those, so the cost per
verification is paid over and over, and an attacker guessing passwords makes
the server pay it too.  argon2-cffi's default (RFC 9106's 64 MiB, 3 passes,
4 lanes) takes about 160 ms and four threads per login on a small machine;
OWASP's password-storage recommendation for argon2id (19 MiB, 2 passes,
1 lane) takes about 40 ms on one thread and is still memory-hard.  Each hash
records its own parameters, so hashes made with other parameters keep working.
"""

from __future__ import annotations

import ctypes
import functools

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

_hasher = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1)

#: glibc's M_MMAP_THRESHOLD parameter for mallopt(3).
_M_MMAP_THRESHOLD = -3


def releaseHashMemory() -> bool:
    """Make the 19 MiB each verification allocates go back to the system when freed.

    glibc raises its mmap threshold the first time such a block is freed, so
    later ones come from the heap of whichever thread verified and stay there:
    a server that had ten threads verify at once holds on to ~200 MB for good
    (measured: 14 MB -> 209 MB RSS after 50 verifications in 10 threads).  A
    fixed threshold keeps big blocks mmapped.  Process-wide, so makeService
    calls it, not import; a no-op without glibc.
    """
    try:
        return ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, 1024 * 1024) == 1
    except (OSError, AttributeError):
        return False


@functools.cache
def _dummy() -> str:
    """Verified against when the user does not exist, so a failed login costs the
    same time whether or not the account exists."""
    return _hasher.hash("twistmail-no-such-user")


def hashPassword(password: str) -> str:
    return _hasher.hash(password)


def verifyPassword(hashed: str | None, password: str) -> bool:
    """Constant-work check; blocking (tens of ms): call it from a thread."""
    try:
        return _hasher.verify(hashed or _dummy(), password) and hashed is not None
    except (VerificationError, InvalidHashError):
        return False
