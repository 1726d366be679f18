# -*- test-case-name: tests.test_maildirindex -*-
"""``twistmail-index``: a Maildir folder's index on disk, so that the first SELECT
after a restart neither lists ``cur/`` (100,000 names) nor parses the uidlist.

Dovecot's ``dovecot.index`` plays the same part.  One text line, then the
columns (UIDs, base names, info letters, sizes, dates) as one C{marshal}
blob, which loads at C speed::

    twistmail-index 2 V<uidvalidity> N<uidnext> K<count> T<taken> C<crc32> <stamps>\n<blob>

It is a cache, never the truth: the truth is ``cur/`` and ``new/`` (file names,
flags) and ``twistmail-uidlist`` (UIDs).  So it is trusted only if

* the blob's CRC-32 is the header's, and it holds K entries, UIDs ascending
  and below N;
* the inode and modification time of ``new/`` and ``cur/``, and the inode,
  size and modification time of the uidlist and keyword files, are what they
  were when the index was made (``<stamps>``): a delivery, rename, link or
  unlink in those directories, by us or by another program, changes the
  directory's mtime, and the uidlist is only ever replaced or appended to;
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

import marshal
import os
import time
import zlib

from twistmail import _fsutil

INDEX = "twistmail-index"
MAGIC = "twistmail-index 2"
#: A directory mtime this close to the moment it was read may hide a later change.
RACY_NS = 1_000_000_000
#: Smaller folders are listed at every start instead.
MIN_MESSAGES = 1000

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
        with open(os.path.join(folderPath, INDEX), "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    head, _, blob = data.partition(b"\n")
    fields = head.decode("ascii", "replace").split(" ")
    try:
        if len(fields) != 8 or " ".join(fields[:2]) != MAGIC or fields[7] != current:
            return None
        uidValidity, uidNext, count, taken, crc = (int(f[1:]) for f in fields[2:7])
        if _racy(current, taken) or zlib.crc32(blob) != crc:
            return None
        columns = marshal.loads(blob)
    except (ValueError, EOFError, TypeError):
        return None
    if (type(columns) is not tuple or len(columns) != 5
            or any(type(c) is not list or len(c) != count for c in columns)):
        return None
    uids, bases, infos, sizes, dates = columns
    if uids != sorted(set(uids)) or (uids and (uids[0] < 1 or uids[-1] >= uidNext)):
        return None
    return uidValidity, uidNext, uids, bases, infos, sizes, dates


def holds(folderPath: str, current: str) -> bool:
    """Whether a good index for these stamps is on disk already: a periodic full scan
    of an unchanged folder need not write 100,000 entries again (a load is cheaper)."""
    return load(folderPath, current) is not None


def encode(current: str, takenNs: int, uidValidity: int, uidNext: int,
           columns: tuple[list, list, list, list, list]) -> bytes | None:
    """The index file for these stamps, or None if they are racy (not worth writing).

    @param columns: (uids ascending, bases, infos, sizes, dates), equally long lists.
    """
    if _racy(current, takenNs):
        return None
    blob = marshal.dumps(columns)
    head = (f"{MAGIC} V{uidValidity} N{uidNext} K{len(columns[0])} T{takenNs} "
            f"C{zlib.crc32(blob)} {current}\n")
    return head.encode("ascii") + blob


def save(folderPath: str, data: bytes) -> None:
    """Write the index L{encode} made, atomically (worker thread)."""
    _fsutil.atomicWrite(os.path.join(folderPath, INDEX), data)


def now() -> int:
    """Nanoseconds since the epoch, for the racy check (save's C{takenNs})."""
    return time.time_ns()
