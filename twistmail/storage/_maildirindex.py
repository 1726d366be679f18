# -*- test-case-name: tests.test_maildirindex -*-
"""``twistmail-index``: a Maildir folder's whole index on disk, so that the first
SELECT after a restart need not list ``cur/`` (100,000 names) nor read the uidlist.

Dovecot's ``dovecot.index`` plays the same part.  The file::

    twistmail-index 1 V<uidvalidity> N<uidnext> K<count> T<taken> <stamps>
    <uid> <internal date> <size> <base name> :<info letters>
    ...

It is a cache, never the truth: the truth is ``cur/`` and ``new/`` (file names,
flags) and ``twistmail-uidlist`` (UIDs).  So it is trusted only if

* it parses completely (``K`` lines of five fields, UIDs ascending, below N);
* the inode and modification time of ``new/`` and ``cur/`` and the size and
  modification time of the uidlist and keyword files are what they were when
  the index was made (``<stamps>``): any delivery, rename, link or unlink in
  those directories, by us or by another program, changes the directory's
  mtime;
* those mtimes were at least L{RACY_NS} older than the moment they were read
  (``T``): a change within the same clock tick right after the read would
  leave the mtime as it was (the "racy" case Git and Dovecot guard against
  the same way).

Anything else (missing, torn, corrupt, stale, racy) means: list the folder as
usual, and write a fresh index.  Written atomically (temp file, fsync,
rename) in a worker thread, only after a full listing during which nothing
in the folder changed, and only for folders of L{MIN_MESSAGES} or more
(listing a small folder costs less than reading the file).
"""

from __future__ import annotations

import os
import time
from operator import itemgetter

from twistmail import _fsutil

INDEX = "twistmail-index"
MAGIC = "twistmail-index 1"
#: A directory mtime this close to the moment it was read may hide a later change.
RACY_NS = 1_000_000_000
#: Smaller folders are listed at every start instead.
MIN_MESSAGES = 1000

_infoOf = itemgetter(slice(1, None))
_firstChar = itemgetter(0)


def stamps(folderPath: str, sidecars: tuple[str, ...]) -> str:
    """What must not have changed for an index to hold, as one header token:
    new/ and cur/ (inode, mtime) and each sidecar file (inode, size, mtime; 0 if absent)."""
    parts = []
    for sub in ("new", "cur"):
        st = os.stat(os.path.join(folderPath, sub))
        parts.append(f"{st.st_ino}.{st.st_mtime_ns}")
    for name in sidecars:
        try:
            st = os.stat(os.path.join(folderPath, name))
            parts.append(f"{st.st_ino}.{st.st_size}.{st.st_mtime_ns}")
        except FileNotFoundError:
            parts.append("0")
    return ",".join(parts)


def _racy(stampToken: str, takenNs: int) -> bool:
    """True if a directory mtime in the stamps is within RACY_NS of when they were read."""
    for part in stampToken.split(",")[:2]:
        mtime = int(part.rpartition(".")[2])
        if mtime > takenNs - RACY_NS:
            return True
    return False


def load(folderPath: str, current: str) -> tuple[int, int, list, list, list, list, list] | None:
    """(uidvalidity, uidnext, uids, bases, infos, sizes, dates) if the index holds for
    the folder as it is now (C{current}: L{stamps}), else None."""
    try:
        with open(os.path.join(folderPath, INDEX), encoding="utf-8") as f:
            text = f.read()
    except (FileNotFoundError, UnicodeDecodeError):
        return None
    head, _, body = text.partition("\n")
    fields = head.split(" ")
    try:
        if len(fields) != 7 or " ".join(fields[:2]) != MAGIC or fields[6] != current:
            return None
        uidValidity, uidNext = int(fields[2][1:]), int(fields[3][1:])
        count, taken = int(fields[4][1:]), int(fields[5][1:])
        if _racy(current, taken):
            return None
        tokens = body.split()
        if len(tokens) != 5 * count or body.count("\n") != count or (count and body[-1] != "\n"):
            return None
        uids = list(map(int, tokens[0::5]))
        dates = list(map(int, tokens[1::5]))
        sizes = list(map(int, tokens[2::5]))
    except ValueError:
        return None
    infoTokens = tokens[4::5]
    if "".join(map(_firstChar, infoTokens)) != ":" * count:
        return None
    if uids != sorted(set(uids)) or (uids and (uids[0] < 1 or uids[-1] >= uidNext)):
        return None
    return uidValidity, uidNext, uids, tokens[3::5], list(map(_infoOf, infoTokens)), sizes, dates


def save(folderPath: str, current: str, takenNs: int, uidValidity: int, uidNext: int,
         rows: list) -> bool:
    """Write the index (worker thread) unless the stamps are racy; C{rows} are
    (uid, entry) with entry [base, info, size, date], ascending uid.  True if written."""
    if _racy(current, takenNs):
        return False
    lines = [f"{MAGIC} V{uidValidity} N{uidNext} K{len(rows)} T{takenNs} {current}\n"]
    lines += [f"{u} {int(e[3])} {e[2]} {e[0]} :{e[1]}\n" for u, e in rows]
    _fsutil.atomicWrite(os.path.join(folderPath, INDEX), "".join(lines).encode("utf-8"))
    return True


def now() -> int:
    """Nanoseconds since the epoch, for the racy check (save's C{takenNs})."""
    return time.time_ns()
