# -*- test-case-name: tests.test_pgaccounts -*-
"""The postgresql accounts backend: domains, users and aliases in tables every node shares.

``[accounts] backend = "postgresql"``.  The CLI edits the tables in one transaction
(under an advisory lock, so two edits never interleave) and ends it with ``NOTIFY
twistmail_accounts``.  Each server keeps the whole set in memory, as the file
backend does, so an RCPT or an AUTH costs no query: one thread per server
LISTENs on the channel and, on a notification (and on every reconnect), reads the
tables again and hands the new set to the reactor thread.

While that connection is down the copy may be stale (a removed user, a changed
password), so lookups raise L{AccountsUnavailable} (clients get temporary errors)
until the thread has reconnected and re-read the tables, which it keeps trying to
do by itself.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from twisted.application import service
from twisted.logger import Logger

from twistmail.auth.accounts import AccountBook, AccountError
from twistmail.errors import AccountsUnavailable
from twistmail.storage.postgresql import schema

log = Logger()

CHANNEL = "twistmail_accounts"

#: Seconds between reconnection attempts while the database is down, and between
#: liveness checks of the listening connection while it is idle.
RETRY_INTERVAL = 1.0

#: pg_advisory_xact_lock key serializing account edits ('twistmail accounts').
_EDIT_LOCK = 7254

#: libpq settings used unless the DSN has its own: give up connecting after 10 s, and
#: (over TCP) notice a database host gone silent within about 20 s rather than the
#: kernel's 15 minutes, so the listening connection's loss is seen and reported.
_CONNECTION_DEFAULTS = {"connect_timeout": "10", "keepalives_idle": "5",
                        "keepalives_interval": "2", "keepalives_count": "3",
                        "tcp_user_timeout": "20000"}


def _load(conn) -> tuple[set, dict, dict]:
    """The accounts in the tables C{conn} sees."""
    domains = {name for (name,) in conn.execute("SELECT name FROM account_domains")}
    users = {}
    for address, password, quota in conn.execute(
            "SELECT address, password, quota FROM account_users"):
        users[address] = {"password": password} if quota is None else \
            {"password": password, "quota": quota}
    aliases = {address: list(targets) for address, targets in conn.execute(
        "SELECT address, targets FROM account_aliases")}
    return domains, users, aliases


def _checkVersion(conn) -> None:
    version = schema.currentVersion(conn)
    if version < schema.LATEST:
        raise AccountError(f"the database has twistmail schema version {version}, this "
                           f"twistmail needs {schema.LATEST}: run 'twistmail db upgrade'")


class PostgresAccounts(AccountBook, service.Service):
    """Accounts in PostgreSQL.

    For the CLI (C{follow=False}): read once when made, edited with L{editing}.
    For a server (C{follow=True}, a service): empty and unavailable until the
    listening thread has read the tables, then kept current by notifications.
    """

    def __init__(self, dsn: str, follow: bool = False, reactor=None) -> None:
        AccountBook.__init__(self)
        self.dsn = dsn
        self._follow = follow
        self._available = False
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor
        if not follow:
            self.reload()

    def _connect(self, **kwargs):
        import psycopg
        from psycopg.conninfo import conninfo_to_dict

        try:
            own = conninfo_to_dict(self.dsn)
            defaults = {k: v for k, v in _CONNECTION_DEFAULTS.items() if k not in own}
            return psycopg.connect(self.dsn, **defaults, **kwargs)
        except psycopg.Error as e:
            raise AccountError(f"cannot reach the accounts database ([accounts] dsn): "
                               f"{type(e).__name__}: {e}".strip()) from None

    # -- reading -------------------------------------------------------------------

    def reload(self) -> None:
        """Read the tables (blocking: the CLI, or a worker thread)."""
        import psycopg

        with self._connect() as conn:
            try:
                _checkVersion(conn)
                self._replace(*_load(conn))
            except psycopg.Error as e:
                raise AccountError(f"cannot read the accounts: {type(e).__name__}: {e}") from None

    def maybeReload(self) -> None:
        if self._follow and not self._available:
            raise AccountsUnavailable("the accounts database is unreachable")

    # -- editing (admin CLI, web admin) --------------------------------------------

    @contextmanager
    def editing(self) -> Iterator[PostgresAccounts]:
        """One transaction: lock, re-read, let the caller change, write what changed,
        notify every server."""
        import psycopg

        with self._connect() as conn:
            try:
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_EDIT_LOCK,))
                    _checkVersion(conn)
                    before = _load(conn)
                    self._replace(*copy.deepcopy(before))
                    yield self
                    self._save(conn, *before)
                    conn.execute(f"NOTIFY {CHANNEL}")
            except psycopg.Error as e:
                raise AccountError(f"cannot change the accounts: {type(e).__name__}: {e}") \
                    from None

    def _save(self, conn, domains: set, users: dict, aliases: dict) -> None:
        """Write the difference between (C{domains}, C{users}, C{aliases}) and ours."""
        from psycopg.types.json import Jsonb

        for name in self.domains - domains:
            conn.execute("INSERT INTO account_domains (name) VALUES (%s)", (name,))
        for address, user in self.users.items():
            if users.get(address) != user:
                quota = user.get("quota")
                conn.execute(
                    "INSERT INTO account_users (address, password, quota) VALUES (%s, %s, %s) "
                    "ON CONFLICT (address) DO UPDATE SET password = EXCLUDED.password, "
                    "quota = EXCLUDED.quota",
                    (address, user["password"], None if quota is None else Jsonb(quota)))
        for address, targets in self.aliases.items():
            if aliases.get(address) != targets:
                conn.execute(
                    "INSERT INTO account_aliases (address, targets) VALUES (%s, %s) "
                    "ON CONFLICT (address) DO UPDATE SET targets = EXCLUDED.targets",
                    (address, targets))
        for address in aliases.keys() - self.aliases.keys():
            conn.execute("DELETE FROM account_aliases WHERE address = %s", (address,))
        for address in users.keys() - self.users.keys():
            conn.execute("DELETE FROM account_users WHERE address = %s", (address,))
        for name in domains - self.domains:
            conn.execute("DELETE FROM account_domains WHERE name = %s", (name,))

    def editor(self) -> PostgresAccounts:
        return PostgresAccounts(self.dsn)

    def edited(self, editor: AccountBook) -> None:
        """Adopt what C{editor} committed, without waiting for its NOTIFY (which reads
        the tables again anyway, so an edit from elsewhere in between is not lost)."""
        if self._available:
            self._replace(editor.domains, editor.users, editor.aliases)

    # -- following the tables (server) ---------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._stopping.clear()
        self._thread = threading.Thread(target=self._listen, name="twistmail-accounts",
                                        daemon=True)
        self._thread.start()

    def stopService(self):
        super().stopService()
        self._stopping.set()
        # The thread notices within RETRY_INTERVAL; it is a daemon, so a stuck connect
        # cannot hold the process up.

    def _listen(self) -> None:
        """Connect, LISTEN, read, then re-read on every notification; on any error mark
        the accounts unavailable and start over after RETRY_INTERVAL."""
        while not self._stopping.is_set():
            try:
                with self._connect(autocommit=True) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self._publish(conn)
                    while not self._stopping.is_set():
                        if list(conn.notifies(timeout=RETRY_INTERVAL, stop_after=1)):
                            self._publish(conn)
                        else:
                            conn.execute("SELECT 1")  # an idle connection's liveness check
            except Exception as e:  # psycopg.Error, AccountError: the database is away
                self._reactor.callFromThread(self._lost, e)
            self._stopping.wait(RETRY_INTERVAL)

    def _publish(self, conn) -> None:
        _checkVersion(conn)
        self._reactor.callFromThread(self._loaded, _load(conn))

    def _loaded(self, accounts: tuple) -> None:
        self._replace(*accounts)
        if not self._available:
            log.info("accounts loaded from postgresql: {domains} domains, {users} users",
                     domains=len(self.domains), users=len(self.users))
        self._available = True

    def _lost(self, error: Exception) -> None:
        if self._available:
            log.warn("accounts database unreachable, answering logins and recipients with "
                     "temporary errors until it is back: {error}", error=error)
        self._available = False
