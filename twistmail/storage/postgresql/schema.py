# -*- test-case-name: tests.test_pgstore -*-
"""The postgresql backend's tables, created and migrated by ``twistmail db upgrade``.

Versioned: ``schema_version`` has a row per step applied; the steps of
L{MIGRATIONS} not applied yet run in order, all in one transaction (PostgreSQL's
DDL is transactional: an upgrade that fails changes nothing).  The store
refuses to start on a database that is behind (it names the command that fixes
it) rather than creating tables itself: the operator decides when a shared
database changes, not the first node that happens to start.

Layout (every name unqualified: the DSN's ``search_path`` chooses the schema):

* ``accounts``: one row per mail account (canonical address).
* ``folders``: per account and folder name; ``uidnext`` and ``highestmodseq`` are
  the UID and MODSEQ counters, updated in the same transaction as the change they
  number, so the row lock serializes writers to one folder across every node.
* ``messages``: flags as a text array, the message's size, internal date, modseq
  and its body.  ``expunged``: (uid, modseq) of removed messages, for QRESYNC.
* ``bodies`` / ``body_chunks``: a message's bytes in bytea chunks of L{CHUNK}
  octets, written and read one chunk at a time (never the whole message in
  memory); a COPY shares the body, the last message to go deletes it.
* ``subscriptions``: per account, the subscribed folder names.
* ``relay_queue`` / ``relay_chunks``: the relay queue when ``[relay] queue =
  "postgresql"`` (L{twistmail.relay.pgqueue}): the envelope and per-recipient state
  as the disk queue's versioned JSON, when it is next due, its fairness lane, which
  node holds it (``claimed_by``) until when (``lease_until``, the database's clock),
  and the message in chunks of L{CHUNK} octets.
"""

from __future__ import annotations

import time

#: Octets of one body chunk: large enough that a 30 MB message is ~120 rows,
#: small enough that one row is never a memory problem.
CHUNK = 256 * 1024

MIGRATIONS: list[str] = [
    # 1: the first schema.
    """
    CREATE SEQUENCE uidvalidity_seq START WITH {now} MAXVALUE 4294967295;
    CREATE TABLE accounts (
        id bigserial PRIMARY KEY,
        name text NOT NULL UNIQUE
    );
    CREATE TABLE folders (
        id bigserial PRIMARY KEY,
        account_id bigint NOT NULL REFERENCES accounts ON DELETE CASCADE,
        name text NOT NULL,
        uidvalidity bigint NOT NULL DEFAULT nextval('uidvalidity_seq'),
        uidnext bigint NOT NULL DEFAULT 1,
        highestmodseq bigint NOT NULL DEFAULT 1,
        keywords text[] NOT NULL DEFAULT '{{}}',
        UNIQUE (account_id, name)
    );
    CREATE TABLE bodies (
        id bigserial PRIMARY KEY,
        size bigint NOT NULL
    );
    CREATE TABLE body_chunks (
        body_id bigint NOT NULL REFERENCES bodies ON DELETE CASCADE,
        seq integer NOT NULL,
        data bytea NOT NULL,
        PRIMARY KEY (body_id, seq)
    );
    CREATE TABLE messages (
        folder_id bigint NOT NULL REFERENCES folders ON DELETE CASCADE,
        uid bigint NOT NULL,
        unique_id text NOT NULL,
        body_id bigint NOT NULL REFERENCES bodies,
        flags text[] NOT NULL DEFAULT '{{}}',
        internal_date bigint NOT NULL,
        modseq bigint NOT NULL,
        PRIMARY KEY (folder_id, uid)
    );
    CREATE INDEX messages_body ON messages (body_id);
    CREATE INDEX messages_unique_id ON messages (unique_id);
    CREATE INDEX messages_modseq ON messages (folder_id, modseq);
    CREATE TABLE expunged (
        folder_id bigint NOT NULL REFERENCES folders ON DELETE CASCADE,
        uid bigint NOT NULL,
        modseq bigint NOT NULL,
        PRIMARY KEY (folder_id, uid)
    );
    CREATE INDEX expunged_modseq ON expunged (folder_id, modseq);
    CREATE TABLE subscriptions (
        account_id bigint NOT NULL REFERENCES accounts ON DELETE CASCADE,
        name text NOT NULL,
        PRIMARY KEY (account_id, name)
    );
    """,
    # The relay queue, shared by every node (twistmail.relay.pgqueue).
    """
    CREATE TABLE relay_queue (
        id text PRIMARY KEY,
        entry jsonb NOT NULL,
        created double precision NOT NULL,
        lane text NOT NULL,
        next_due double precision,
        claimed_by text,
        lease_until double precision
    );
    CREATE INDEX relay_queue_due ON relay_queue (next_due) WHERE next_due IS NOT NULL;
    CREATE TABLE relay_chunks (
        queue_id text NOT NULL REFERENCES relay_queue ON DELETE CASCADE,
        seq integer NOT NULL,
        data bytea NOT NULL,
        PRIMARY KEY (queue_id, seq)
    );
    """,
]

LATEST = len(MIGRATIONS)


def currentVersion(conn) -> int:
    """The schema version of the database C{conn} is connected to (0: none yet)."""
    exists = conn.execute("SELECT to_regclass('schema_version') IS NOT NULL").fetchone()[0]
    if not exists:
        return 0
    row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
    return row[0] or 0


def upgrade(dsn: str) -> tuple[int, int]:
    """Bring the database at C{dsn} to L{LATEST}; return (version before, version after).

    Blocking (psycopg): for the CLI and tests, not the reactor thread.  Two
    upgrades at once are safe: the first takes an advisory lock, the second
    waits for it and then finds nothing to do.
    """
    import psycopg

    with psycopg.connect(dsn) as conn:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(7253)")  # 'twistmail schema' lock
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version ("
                         "version integer PRIMARY KEY, applied bigint NOT NULL)")
            before = currentVersion(conn)
            for version in range(before + 1, LATEST + 1):
                conn.execute(MIGRATIONS[version - 1].format(now=int(time.time())))
                conn.execute("INSERT INTO schema_version VALUES (%s, %s)",
                             (version, int(time.time())))
    return before, LATEST
