# -*- test-case-name: tests.test_pgstore -*-
"""``twistmail db upgrade``: create or migrate the postgresql backends' tables (mail,
accounts; in one database or two).

Run by the operator (once per database, from any node, before starting nodes of
a new version): the server itself never changes a shared schema, it only
refuses to start on one that is behind.
"""

from __future__ import annotations


def register(sub) -> None:
    db = sub.add_parser("db", help="the postgresql backend's database").add_subparsers(
        dest="action", required=True)
    db.add_parser("upgrade", help="create or migrate the tables ([storage.postgresql] dsn, "
                                  "[accounts] dsn)")


def run(args, config) -> str:
    from twistmail.cli.main import CLIError
    from twistmail.config import ConfigError
    from twistmail.storage.postgresql import PostgresStoreFactory

    dsns = []
    try:
        if config["storage"]["backend"] == "postgresql":
            dsns.append(PostgresStoreFactory().makeStore(config.storageOptions(), config.dataDir).dsn)
    except ConfigError as e:
        raise CLIError(str(e)) from None
    if config["accounts"]["backend"] == "postgresql" and config["accounts"]["dsn"] not in dsns:
        dsns.append(config["accounts"]["dsn"])
    if not dsns:
        raise CLIError(f"[storage] backend is {config['storage']['backend']!r} and [accounts] "
                       f"backend {config['accounts']['backend']!r}: twistmail db works on the "
                       "postgresql backends. Fix: set [storage] backend = \"postgresql\" and "
                       "[storage.postgresql] dsn, or [accounts] backend = \"postgresql\" and dsn")
    return "\n".join(_upgrade(dsn) for dsn in dsns)


def _upgrade(dsn: str) -> str:
    import psycopg

    from twistmail.cli.main import CLIError
    from twistmail.storage.postgresql import schema

    try:
        before, after = schema.upgrade(dsn)
    except psycopg.Error as e:
        raise CLIError(f"cannot upgrade the database: {type(e).__name__}: {e}") from None
    if before == after:
        return f"database schema already at version {after}"
    return f"database schema upgraded: version {before} -> {after}"
