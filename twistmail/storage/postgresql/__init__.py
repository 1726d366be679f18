"""The postgresql storage backend: see L{twistmail.storage.postgresql.store}."""

from twistmail.storage.postgresql.store import PostgresStore, PostgresStoreFactory

__all__ = ["PostgresStore", "PostgresStoreFactory"]
