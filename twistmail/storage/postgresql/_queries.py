# -*- test-case-name: tests.test_store_conformance -*-
"""The postgresql backend's transactions: blocking psycopg code, run in the store's
thread pool, never on the reactor thread.

Every writer to a folder first locks the folder's row (``FOR UPDATE``), and takes
the next UID and MODSEQ from it in the same transaction as the change they
number: writers to one folder are serialized across every node, commit order is
UID order, and a rolled-back transaction hands out nothing (RFC 3501 §2.3.1.1:
strictly ascending, never reused; RFC 7162 §3.1.1: mod-sequences only grow).
Operations on two folders lock both rows in id order, so they cannot deadlock.
"""

from __future__ import annotations

import tempfile
import uuid

from twistmail.errors import FolderExists, NoSuchFolder, NoSuchMessage, TooManyKeywords
from twistmail.storage import folders
from twistmail.storage.postgresql.schema import CHUNK

#: Distinct keywords one folder may hold (Dovecot's default is unlimited, Maildir's 26).
MAX_KEYWORDS = 256
#: A message opened for streaming stays in memory up to this size, then spills to a temp file.
SPOOL_MEMORY = 1024 * 1024
#: The newest expunges a folder loads for QRESYNC's VANISHED (older ones: the client's own list).
MAX_VANISHED = 10_000


def keywordsOf(flags) -> set[str]:
    return {f for f in flags if not f.startswith("\\")}


def newUniqueId() -> str:
    return uuid.uuid4().hex


# -- accounts and folders ----------------------------------------------------------------


def accountId(conn, name: str, create: bool = True) -> int | None:
    row = conn.execute("SELECT id FROM accounts WHERE name = %s", (name,)).fetchone()
    if row is None and create:
        row = conn.execute("INSERT INTO accounts (name) VALUES (%s) ON CONFLICT (name) DO "
                           "UPDATE SET name = EXCLUDED.name RETURNING id", (name,)).fetchone()
    return row[0] if row else None


def folderId(conn, account: int, name: str) -> int | None:
    row = conn.execute("SELECT id FROM folders WHERE account_id = %s AND name = %s",
                       (account, name)).fetchone()
    return row[0] if row else None


def ensureFolder(conn, account: int, name: str) -> int:
    """The folder's id, creating it and its parents (they are folders too)."""
    parts = name.split(folders.SEPARATOR)
    found = None
    for depth in range(1, len(parts) + 1):
        path = folders.SEPARATOR.join(parts[:depth])
        found = folderId(conn, account, path)
        if found is None:
            found = conn.execute(
                "INSERT INTO folders (account_id, name) VALUES (%s, %s) ON CONFLICT "
                "(account_id, name) DO UPDATE SET name = EXCLUDED.name RETURNING id",
                (account, path)).fetchone()[0]
    return found


def openFolder(conn, account: str, name: str) -> int:
    acct = accountId(conn, account)
    if name == "INBOX":
        return ensureFolder(conn, acct, name)
    found = folderId(conn, acct, name)
    if found is None:
        raise NoSuchFolder(name)
    return found


def listFolders(conn, account: str) -> list[str]:
    rows = conn.execute("SELECT f.name FROM folders f JOIN accounts a ON a.id = f.account_id "
                        "WHERE a.name = %s", (account,)).fetchall()
    return [r[0] for r in rows]


def createFolder(conn, account: str, name: str) -> None:
    acct = accountId(conn, account)
    if folderId(conn, acct, name) is not None:
        raise FolderExists(name)
    ensureFolder(conn, acct, name)


def _dropMessages(conn, where: str, args: tuple) -> None:
    """Delete messages, then the bodies no other message shares."""
    bodies = [r[0] for r in conn.execute(
        f"DELETE FROM messages WHERE {where} RETURNING body_id", args).fetchall()]
    if bodies:
        conn.execute("DELETE FROM bodies b WHERE b.id = ANY(%s) AND NOT EXISTS "
                     "(SELECT 1 FROM messages m WHERE m.body_id = b.id)", (bodies,))


def deleteFolder(conn, account: str, name: str) -> int:
    acct = accountId(conn, account)
    found = folderId(conn, acct, name)
    if found is None:
        raise NoSuchFolder(name)
    _lockFolders(conn, [found])
    _dropMessages(conn, "folder_id = %s", (found,))
    conn.execute("DELETE FROM folders WHERE id = %s", (found,))  # children stay, as in Maildir++
    return found


def renameFolder(conn, account: str, old: str, new: str) -> None:
    acct = accountId(conn, account)
    source = ensureFolder(conn, acct, old) if old == "INBOX" else folderId(conn, acct, old)
    if source is None:
        raise NoSuchFolder(old)
    if folderId(conn, acct, new) is not None:
        raise FolderExists(new)
    _lockFolders(conn, [source])
    if old != "INBOX":
        clash = conn.execute(
            "SELECT name FROM folders WHERE account_id = %s AND name = ANY(ARRAY(SELECT %s || "
            "substr(name, %s) FROM folders WHERE account_id = %s AND left(name, %s) = %s))",
            (acct, new, len(old) + 1, acct, len(old) + 1, old + folders.SEPARATOR)).fetchone()
        if clash:
            raise FolderExists(clash[0])
        conn.execute("UPDATE folders SET name = %s || substr(name, %s) WHERE account_id = %s "
                     "AND (name = %s OR left(name, %s) = %s)",
                     (new, len(old) + 1, acct, old, len(old) + 1, old + folders.SEPARATOR))
        parent = new.rpartition(folders.SEPARATOR)[0]
        if parent:
            ensureFolder(conn, acct, parent)
        return
    # RFC 3501 §6.3.5: INBOX's messages move to a new folder; INBOX stays, empty, with
    # its UIDVALIDITY and UIDNEXT, and reports the moved messages as expunged.
    target = ensureFolder(conn, acct, new)
    moved = conn.execute(
        "UPDATE messages m SET folder_id = %s, uid = r.n, modseq = 1 FROM (SELECT uid, "
        "row_number() OVER (ORDER BY uid) AS n FROM messages WHERE folder_id = %s) r "
        "WHERE m.folder_id = %s AND m.uid = r.uid RETURNING r.uid", (target, source, source)
    ).fetchall()
    if moved:
        keywords = conn.execute("SELECT keywords FROM folders WHERE id = %s",
                                (source,)).fetchone()[0]
        conn.execute("UPDATE folders SET uidnext = %s, keywords = %s WHERE id = %s",
                     (len(moved) + 1, keywords, target))
        _expunged(conn, source, [r[0] for r in moved])


def subscriptions(conn, account: str) -> list[str]:
    rows = conn.execute("SELECT s.name FROM subscriptions s JOIN accounts a ON "
                        "a.id = s.account_id WHERE a.name = %s", (account,)).fetchall()
    return [r[0] for r in rows]


def setSubscribed(conn, account: str, name: str, subscribed: bool) -> None:
    acct = accountId(conn, account)
    if subscribed:
        conn.execute("INSERT INTO subscriptions VALUES (%s, %s) ON CONFLICT DO NOTHING",
                     (acct, name))
    else:
        conn.execute("DELETE FROM subscriptions WHERE account_id = %s AND name = %s",
                     (acct, name))


def removeAccount(conn, account: str) -> list[int]:
    acct = accountId(conn, account, create=False)
    if acct is None:
        return []
    ids = [r[0] for r in conn.execute("SELECT id FROM folders WHERE account_id = %s ORDER BY id "
                                      "FOR UPDATE", (acct,)).fetchall()]
    _dropMessages(conn, "folder_id = ANY(%s)", (ids,))
    conn.execute("DELETE FROM accounts WHERE id = %s", (acct,))
    return ids


# -- one folder's state -------------------------------------------------------------------


def _lockFolders(conn, ids) -> dict:
    """Lock the folders' rows in id order; {id: (highestmodseq, keywords)}; NoSuchFolder if gone."""
    rows = conn.execute("SELECT id, highestmodseq, keywords FROM folders WHERE id = ANY(%s) "
                        "ORDER BY id FOR UPDATE", (sorted(set(ids)),)).fetchall()
    found = {r[0]: (r[1], set(r[2])) for r in rows}
    if len(found) != len(set(ids)):
        raise NoSuchFolder("the folder was deleted")
    return found


def _bump(conn, folder: int, keywords: set, uids: int = 0) -> tuple[int, int]:
    """Take the folder's next modseq (and C{uids} UIDs); return (modseq, first uid)."""
    if len(keywords) > MAX_KEYWORDS:
        raise TooManyKeywords(f"a folder holds at most {MAX_KEYWORDS} keywords")
    row = conn.execute("UPDATE folders SET highestmodseq = highestmodseq + 1, uidnext = uidnext "
                       "+ %s, keywords = %s WHERE id = %s RETURNING highestmodseq, uidnext - %s",
                       (uids, sorted(keywords), folder, uids)).fetchone()
    return row[0], row[1]


def _expunged(conn, folder: int, uids: list[int]) -> None:
    modseq, _ = _bump(conn, folder, _lockFolders(conn, [folder])[folder][1])
    conn.execute("INSERT INTO expunged SELECT %s, u, %s FROM unnest(%s::bigint[]) u "
                 "ON CONFLICT (folder_id, uid) DO UPDATE SET modseq = EXCLUDED.modseq",
                 (folder, modseq, uids))


def snapshot(conn, folder: int, since: int) -> dict | None:
    """What changed in the folder after modseq C{since} (everything for 0); None if it is gone.

    One REPEATABLE READ snapshot: the counters and the rows agree.
    """
    conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
    row = conn.execute("SELECT uidvalidity, uidnext, highestmodseq, keywords FROM folders "
                       "WHERE id = %s", (folder,)).fetchone()
    if row is None:
        return None
    changed = conn.execute(
        "SELECT m.uid, m.unique_id, m.flags, b.size, m.internal_date, m.modseq FROM messages m "
        "JOIN bodies b ON b.id = m.body_id WHERE m.folder_id = %s AND m.modseq > %s "
        "ORDER BY m.uid", (folder, since)).fetchall()
    # A first load takes only the newest expunges; a refresh needs every one since.
    vanished = conn.execute("SELECT modseq, uid FROM expunged WHERE folder_id = %s AND "
                            "modseq > %s ORDER BY modseq DESC, uid LIMIT %s",
                            (folder, since, MAX_VANISHED + 1 if since == 0 else None)).fetchall()
    return {"uidValidity": row[0], "uidNext": row[1], "highestModSeq": row[2],
            "keywords": row[3], "changed": changed, "vanished": vanished[::-1]}


# -- messages -----------------------------------------------------------------------------


def _writeBody(conn, chunks) -> int:
    """Store the bytes of C{chunks} (an iterable) as CHUNK-sized rows; return the body id."""
    body = conn.execute("INSERT INTO bodies (size) VALUES (0) RETURNING id").fetchone()[0]
    size, seq, pending = 0, 0, bytearray()
    with conn.cursor() as cur:
        for chunk in chunks:
            pending += chunk
            size += len(chunk)
            while len(pending) >= CHUNK:
                cur.execute("INSERT INTO body_chunks VALUES (%s, %s, %s)",
                            (body, seq, bytes(pending[:CHUNK])))
                del pending[:CHUNK]
                seq += 1
        if pending or seq == 0:
            cur.execute("INSERT INTO body_chunks VALUES (%s, %s, %s)", (body, seq, bytes(pending)))
    conn.execute("UPDATE bodies SET size = %s WHERE id = %s", (size, body))
    return body


def append(conn, folder: int, chunks, flags, internalDate: int,
           uniqueId: str | None = None) -> tuple[int, str]:
    """Store one message; return (uid, unique id).  The body is written before the folder
    is locked, so a slow upload does not hold up other writers to the folder."""
    body = _writeBody(conn, chunks)
    keywords = _lockFolders(conn, [folder])[folder][1] | keywordsOf(flags)
    modseq, uid = _bump(conn, folder, keywords, uids=1)
    if uniqueId is None:
        uniqueId = newUniqueId()
    elif conn.execute("SELECT 1 FROM messages m JOIN folders f ON f.id = m.folder_id WHERE "
                    "m.unique_id = %s AND f.account_id = (SELECT account_id FROM folders "
                    "WHERE id = %s)", (uniqueId, folder)).fetchone():
        uniqueId = newUniqueId()  # IImportableMailbox: one the account already has
    conn.execute("INSERT INTO messages VALUES (%s, %s, %s, %s, %s, %s, %s)",
                 (folder, uid, uniqueId, body, sorted(flags), internalDate, modseq))
    return uid, uniqueId


def deliver(conn, account: str, name: str, chunks, flags, internalDate: int) -> tuple[int, str]:
    """Returns (folder id, unique id)."""
    folder = ensureFolder(conn, accountId(conn, account), name)
    return folder, append(conn, folder, chunks, flags, internalDate)[1]


def setFlags(conn, folder: int, uids, flags, mode: str,
             unchangedSince: int | None = None) -> list[int]:
    """Change flags; return the uids left alone because their modseq is above
    C{unchangedSince} (RFC 7162 §3.1.3).  Flags that end up as they were are no change
    and take no modseq."""
    keywords = _lockFolders(conn, [folder])[folder][1]
    flags = frozenset(flags)
    rows = conn.execute("SELECT uid, flags, modseq FROM messages WHERE folder_id = %s AND "
                        "uid = ANY(%s) ORDER BY uid", (folder, sorted(set(uids)))).fetchall()
    modified, changes = [], []
    for uid, old, modseq in rows:
        if unchangedSince is not None and modseq > unchangedSince:
            modified.append(uid)
            continue
        old = frozenset(old)
        wanted = flags if mode == "set" else (old | flags if mode == "add" else old - flags)
        if wanted != old:
            changes.append((uid, wanted))
            keywords |= keywordsOf(wanted)
    if changes:
        modseq, _ = _bump(conn, folder, keywords)
        with conn.cursor() as cur:
            cur.executemany("UPDATE messages SET flags = %s, modseq = %s WHERE folder_id = %s "
                            "AND uid = %s",
                            [(sorted(wanted), modseq, folder, uid) for uid, wanted in changes])
    return modified


def copyMessages(conn, source: int, uids, target: int) -> list[tuple[int, int]]:
    """All or nothing (RFC 3501 §6.4.7): the copies share the originals' bodies."""
    keywords = _lockFolders(conn, [source, target])[target][1]
    rows = {r[0]: r[1:] for r in conn.execute(
        "SELECT uid, body_id, flags, internal_date FROM messages WHERE folder_id = %s AND "
        "uid = ANY(%s)", (source, list(uids))).fetchall()}
    for uid in uids:
        if uid not in rows:
            raise NoSuchMessage(uid)
    for uid in uids:
        keywords |= keywordsOf(rows[uid][1])
    modseq, first = _bump(conn, target, keywords, uids=len(uids))
    pairs = [(uid, first + n) for n, uid in enumerate(uids)]
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO messages VALUES (%s, %s, %s, %s, %s, %s, %s)",
                        [(target, new, newUniqueId(), rows[old][0], rows[old][1], rows[old][2],
                          modseq) for old, new in pairs])
    return pairs


def remove(conn, folder: int, uids) -> list[int]:
    _lockFolders(conn, [folder])
    gone = [r[0] for r in conn.execute("SELECT uid FROM messages WHERE folder_id = %s AND "
                                       "uid = ANY(%s)", (folder, sorted(set(uids)))).fetchall()]
    if gone:
        _dropMessages(conn, "folder_id = %s AND uid = ANY(%s)", (folder, gone))
        _expunged(conn, folder, gone)
    return sorted(gone)


def _bodyIds(conn, folder: int, uids) -> list[int]:
    conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
    found = dict(conn.execute("SELECT uid, body_id FROM messages WHERE folder_id = %s AND "
                              "uid = ANY(%s)", (folder, list(uids))).fetchall())
    for uid in uids:
        if uid not in found:
            raise NoSuchMessage(uid)
    return [found[uid] for uid in uids]


def _chunks(conn, body: int):
    """The body's chunks, one row at a time (a server-side cursor)."""
    with conn.cursor(name=f"body{body}") as cur:
        cur.itersize = 2
        cur.execute("SELECT data FROM body_chunks WHERE body_id = %s ORDER BY seq", (body,))
        for (data,) in cur:
            yield data


def readMessages(conn, folder: int, uids) -> list[bytes]:
    return [b"".join(_chunks(conn, body)) for body in _bodyIds(conn, folder, uids)]


def openMessage(conn, folder: int, uid: int):
    """A file of the message's bytes, filled chunk by chunk: memory up to SPOOL_MEMORY,
    a temporary file beyond (the reactor then reads it without touching the database)."""
    [body] = _bodyIds(conn, folder, [uid])
    out = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY)
    for data in _chunks(conn, body):
        out.write(data)
    out.seek(0)
    return out
