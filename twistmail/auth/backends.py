# -*- test-case-name: tests.test_pgaccounts -*-
"""``[accounts] backend``: the account store the server, the CLI and the web admin use."""

from __future__ import annotations

from twistmail.auth.accounts import Accounts
from twistmail.interfaces import IAccountStore


def openAccounts(config, follow: bool = False) -> IAccountStore:
    """The configured account store.

    @param follow: for a server: a postgresql store then reads nothing now and is a
        service that follows the tables (set it under the application); the CLI reads
        them at once.
    @raise twistmail.auth.accounts.AccountError: the file or database cannot be read.
    """
    table = config["accounts"]
    if table["backend"] == "postgresql":
        from twistmail.auth.pgaccounts import PostgresAccounts

        return PostgresAccounts(table["dsn"], follow=follow)
    return Accounts(config.dataDir, reloadInterval=table["reload_interval"])


def redactDsn(dsn: str) -> str:
    """C{dsn} with its password replaced, for check-config (key=value or URI form)."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    try:
        params = conninfo_to_dict(dsn)
    except Exception:  # psycopg.ProgrammingError: not parseable, so show none of it
        return "(set, not a valid connection string)"
    if "password" in params:
        params["password"] = "xxxxx"
    return make_conninfo(**params)
