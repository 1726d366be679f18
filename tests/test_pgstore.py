"""The postgresql backend beyond the conformance suite: ``twistmail db upgrade``, the
schema check at start, its options, and the server built on it (tests/pgproc.py)."""

from __future__ import annotations

import pytest
from support import cli

from twistmail.config import ConfigError
from twistmail.errors import StorageError
from twistmail.storage.postgresql import PostgresStoreFactory, schema
from twistmail.testing import onReactor
from twistmail.testing.conformance import ALICE, deliver, message, openFolder, readMessage


def test_db_upgrade_creates_then_finds_nothing_to_do(postgres, tmp_path, dataDir):
    dsn = postgres.dsn(str(tmp_path))
    config = tmp_path / "twistmail.toml"
    config.write_text('[storage]\nbackend = "postgresql"\n[storage.postgresql]\n'
                      f'dsn = "{dsn}"\n')
    first = cli("--config", str(config), "db", "upgrade", dataDir=dataDir)
    assert f"version 0 -> {schema.LATEST}" in first.stdout
    again = cli("--config", str(config), "db", "upgrade", dataDir=dataDir)
    assert f"already at version {schema.LATEST}" in again.stdout
    store = PostgresStoreFactory().makeStore({"dsn": dsn}, dataDir)
    try:
        deliver(store, message(1))
        assert readMessage(openFolder(store), 1) == message(1)
    finally:
        store.close()


def test_db_upgrade_needs_the_postgresql_backend(tmp_path, dataDir):
    proc = cli("db", "upgrade", dataDir=dataDir, check=False)
    assert proc.returncode != 0
    assert "[storage] backend" in proc.stderr and "postgresql" in proc.stderr


def test_store_on_a_database_not_upgraded_says_how_to_fix_it(postgres, tmp_path, dataDir):
    store = PostgresStoreFactory().makeStore({"dsn": postgres.dsn(str(tmp_path))}, dataDir)
    try:
        error = onReactor(lambda: store.deliver(ALICE, "INBOX", _source()).addErrback(
            lambda f: f.value))
    finally:
        store.close()
    assert isinstance(error, StorageError)
    assert "twistmail db upgrade" in str(error)


def _source():
    from twistmail.delivery.spool import MessageSource

    return MessageSource.fromBytes(message(1))


@pytest.mark.parametrize("options, key", [
    ({}, "dsn"), ({"dsn": ""}, "dsn"), ({"dsn": 5}, "dsn"),
    ({"dsn": "x", "pool_max": 0}, "pool_max"), ({"dsn": "x", "pool_min": -1}, "pool_min"),
    ({"dsn": "x", "pool_min": True}, "pool_min"), ({"dsn": "x", "connect_timeout": 0}, "connect_timeout"),
    ({"dsn": "x", "pool_min": 5, "pool_max": 2}, "pool_min"),
    ({"dsn": "x", "password": "secret"}, "password")])
def test_bad_options_name_the_key_and_the_fix(options, key, dataDir):
    with pytest.raises(ConfigError) as e:
        PostgresStoreFactory().makeStore(options, dataDir)
    assert f"[storage.postgresql] {key}" in str(e.value) and "Fix:" in str(e.value)
    assert "secret" not in str(e.value)


def test_makeStore_has_no_side_effects(dataDir):
    """check-config builds the store: no connection, no thread until first use."""
    store = PostgresStoreFactory().makeStore(
        {"dsn": "host=/nonexistent dbname=x", "pool_min": 0, "pool_max": 3}, dataDir)
    assert store._pool is None and not store._started


def test_database_down_answers_451_and_the_server_keeps_going(dataDir):
    """SMTP DATA while PostgreSQL cannot be reached: a temporary 451 4.3.0 after
    connect_timeout (the sender retries), not a hang or a 250 for mail not committed."""
    import smtplib

    from support import addUser, startServer

    addUser(dataDir, ALICE)
    srv = startServer(dataDir, storage={"backend": "postgresql"}, backendOptions={
        "postgresql": {"dsn": f"host={dataDir}/nowhere dbname=twistmail", "pool_min": 0,
                       "connect_timeout": 1}})
    try:
        with smtplib.SMTP("127.0.0.1", srv.smtpPort, timeout=30) as s:
            with pytest.raises(smtplib.SMTPDataError) as e:
                s.sendmail("x@remote.test", [ALICE], message(1))
            assert e.value.smtp_code == 451
            assert e.value.smtp_error.startswith(b"4.3.0")
            assert s.noop()[0] == 250
    finally:
        srv.stop()


def test_store_recovers_by_itself_after_postgresql_restarts(dataDir):
    """PostgreSQL restarted under a running store: meanwhile every operation fails with
    StorageError (a temporary error for the client); afterwards the store works again
    without being restarted, each pooled connection that broke failing at most once."""
    from pgproc import PostgresProcess

    from twistmail.storage.postgresql import PostgresStore

    cluster = PostgresProcess()
    store = None
    try:
        cluster.start()
        dsn = cluster.dsn("restart")
        schema.upgrade(dsn)
        store = PostgresStore(dsn, maxConnections=2, connectTimeout=1)
        deliver(store, message(1))
        cluster.pause()
        down = onReactor(lambda: store.deliver(ALICE, "INBOX", _source()).addErrback(
            lambda f: f.value))
        assert isinstance(down, StorageError)
        cluster.resume()
        outcomes = [onReactor(lambda: store.deliver(ALICE, "INBOX", _source()).addErrback(
            lambda f: f.value)) for _ in range(3)]  # two pooled connections may have broken
        assert isinstance(outcomes[-1], str), outcomes
        assert len(openFolder(store).messages()) == 1 + sum(isinstance(o, str) for o in outcomes)
    finally:
        if store is not None:
            store.close()
        cluster.stop()


def test_vanished_is_bounded_and_never_leaves_ghosts(postgres, tmp_path, monkeypatch):
    """QRESYNC memory per folder is bounded (the oldest expunges are forgotten: None, the
    client's own list is used), yet a refresh after more expunges than that still
    removes every one of them from the snapshot."""
    from twistmail.storage.postgresql import PostgresStore, _queries

    monkeypatch.setattr(_queries, "MAX_VANISHED", 3)
    dsn = postgres.dsn(str(tmp_path))
    schema.upgrade(dsn)
    stores = [PostgresStore(dsn), PostgresStore(dsn)]
    try:
        for n in range(12):
            deliver(stores[0], message(n))
        mine, other = openFolder(stores[0]), openFolder(stores[1])
        start = other.highestModSeq
        for uid in range(1, 6):  # five expunges, each its own modseq, by another node
            onReactor(mine.remove, [uid])
        changes = onReactor(other.refresh)
        assert changes.removed == (1, 2, 3, 4, 5) and other.uids() == tuple(range(6, 13))
        assert other.vanishedSince(other.highestModSeq - 2) == [4, 5]
        assert other.vanishedSince(start) is None  # forgotten: at most 3 kept
        fresh = openFolder(PostgresStore(dsn))  # a first load keeps only the newest 3 too
        assert fresh.vanishedSince(fresh.highestModSeq - 3) == [3, 4, 5]
        assert fresh.vanishedSince(start) is None
        fresh._store.close()
    finally:
        for store in stores:
            store.close()
