"""Password hashing: argon2id via argon2-cffi (RFC 9106 low-memory profile)."""

from __future__ import annotations

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

_hasher = PasswordHasher()
# Verified against when the user does not exist, so a failed login costs the same
# time whether or not the account exists.
_DUMMY = _hasher.hash("twistmail-no-such-user")


def hashPassword(password: str) -> str:
    return _hasher.hash(password)


def verifyPassword(hashed: str | None, password: str) -> bool:
    """Constant-work check; blocking (tens of ms): call it from a thread."""
    try:
        return _hasher.verify(hashed or _DUMMY, password) and hashed is not None
    except (VerificationError, InvalidHashError):
        return False
