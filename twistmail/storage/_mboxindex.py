# -*- test-case-name: tests.test_mbox -*-
"""The sidecar index of one mbox folder: ``.<folder>.index`` next to the mbox file.

Like Dovecot's index, it lets a 20,000-message folder open without reading
the mbox: UIDs, byte offsets, sizes and flags of every message, and the
(inode, size, mtime) stamp of the mbox file they describe.  The file is a
journal of tab-separated lines, appended to as things change and rewritten
(atomically) when it has grown long::

    twistmail-mboxindex 1 <TAB> V<uidvalidity>
    k <TAB> <keyword> <keyword> ...                       keywords defined in the folder
    m <TAB> <uid> <TAB> <offset> ... <TAB> <flags>         a message (see L{Entry})
    f <TAB> <uid> <TAB> <flags>                            its flags changed in place
    s <TAB> <inode> <TAB> <size> <TAB> <mtime ns> <TAB> <uidnext>   the mbox as we left it

Flags are system letters (S A F D T) then keywords, space separated.
The index is trusted only if its last stamp matches the mbox file; else the
file is reconciled (a new tail parsed, or the whole file reread), and the
index's UIDs are kept for the messages found again.  Lines that hand out
UIDs are fsynced before the UIDs are used: a UID told to a client must not
change.  A torn last line after a crash is ignored.
"""

from __future__ import annotations

import os
from typing import NamedTuple

from twistmail import _fsutil
from twistmail.storage._mboxformat import LETTER_FLAGS, SYSTEM_LETTERS

MAGIC = "twistmail-mboxindex 1"
_newTuple = tuple.__new__


class Entry(NamedTuple):
    """One message: where it is in the mbox file and what IMAP needs to know about it."""

    offset: int
    contentAt: int
    flagsAt: int
    flagsLen: int
    skipFrom: int
    skipTo: int
    joint: int
    end: int
    size: int
    quoted: int
    internalDate: int
    uniqueId: str
    hasUidl: bool  # X-UIDL is in the file (checked before reading)
    flags: frozenset


class Stamp(NamedTuple):
    inode: int
    size: int
    mtime: int


def stampOf(st: os.stat_result) -> Stamp:
    return Stamp(st.st_ino, st.st_size, st.st_mtime_ns)


class Index(NamedTuple):
    uidValidity: int
    uidNext: int
    entries: dict  # uid -> Entry, ascending
    keywords: list
    stamp: Stamp | None
    journal: int  # lines, to know when to compact


def encodeFlags(flags) -> str:
    letters = "".join(SYSTEM_LETTERS[f] for f in sorted(flags) if f in SYSTEM_LETTERS)
    return " ".join([letters, *sorted(f for f in flags if not f.startswith("\\"))])


def decodeFlags(text: str) -> frozenset:
    letters, *keywords = text.split(" ")
    return frozenset([LETTER_FLAGS[c] for c in letters if c in LETTER_FLAGS] + keywords)


def entryLine(uid: int, e: Entry) -> str:
    return (f"m\t{uid}\t{e.offset}\t{e.contentAt}\t{e.flagsAt}\t{e.flagsLen}\t{e.skipFrom}\t"
            f"{e.skipTo}\t{e.joint}\t{e.end}\t{e.size}\t{e.quoted}\t{e.internalDate}\t{int(e.hasUidl)}\t"
            f"{e.uniqueId}\t{encodeFlags(e.flags)}\n")


def stampLine(stamp: Stamp, uidNext: int) -> str:
    return f"s\t{stamp.inode}\t{stamp.size}\t{stamp.mtime}\t{uidNext}\n"


def keywordsLine(keywords) -> str:
    return "k\t" + " ".join(keywords) + "\n"


def read(path: str) -> Index | None:
    """The index at C{path}, or None if there is none or it is unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (FileNotFoundError, UnicodeDecodeError):
        return None
    lines = text.split("\n")
    head = lines[0].split("\t")
    if len(head) != 2 or head[0] != MAGIC or not head[1][1:].isdigit():
        return None
    if not text.endswith("\n"):
        lines = lines[:-1]  # torn by a crash
    entries: dict[int, Entry] = {}
    keywords: list[str] = []
    stamp, uidNext = None, 1
    flagSets: dict[str, frozenset] = {}  # a folder has few distinct ones: decode each once
    for line in lines[1:]:
        fields = line.split("\t")
        try:
            kind = fields[0]
            if kind == "m" and len(fields) == 16:
                flags = flagSets.get(fields[15])
                if flags is None:
                    flags = flagSets[fields[15]] = decodeFlags(fields[15])
                # tuple.__new__: NamedTuple's own __new__ is a Python function (20,000 calls)
                entries[int(fields[1])] = _newTuple(Entry, (
                    int(fields[2]), int(fields[3]), int(fields[4]), int(fields[5]),
                    int(fields[6]), int(fields[7]), int(fields[8]), int(fields[9]),
                    int(fields[10]), int(fields[11]), int(fields[12]), fields[14],
                    fields[13] == "1", flags))
            elif kind == "f" and len(fields) == 3:
                uid = int(fields[1])
                if uid in entries:
                    entries[uid] = entries[uid]._replace(flags=decodeFlags(fields[2]))
            elif kind == "s" and len(fields) == 5:
                stamp = Stamp(int(fields[1]), int(fields[2]), int(fields[3]))
                uidNext = max(uidNext, int(fields[4]))
            elif kind == "k" and len(fields) == 2:
                keywords = [k for k in fields[1].split(" ") if k]
        except (ValueError, KeyError):
            continue
    if entries:
        uidNext = max(uidNext, max(entries) + 1)
    return Index(int(head[1][1:]), uidNext, dict(sorted(entries.items())), keywords, stamp,
                 len(lines))


def write(path: str, uidValidity: int, uidNext: int, entries: dict, keywords, stamp: Stamp) -> None:
    """Rewrite the whole index atomically (temp file, fsync, rename)."""
    parts = [f"{MAGIC}\tV{uidValidity}\n", keywordsLine(keywords)]
    parts += [entryLine(uid, e) for uid, e in entries.items()]
    parts.append(stampLine(stamp, uidNext))
    _fsutil.atomicWrite(path, "".join(parts).encode("utf-8"))


def append(path: str, lines: list[str], durable: bool) -> None:
    """Add journal lines; C{durable} when they hand out UIDs."""
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(lines))
        if durable:
            f.flush()
            os.fsync(f.fileno())
