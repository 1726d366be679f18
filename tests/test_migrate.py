"""``twistmail migrate``: accounts copied between backends, through the real CLI."""

from __future__ import annotations

import os

import pytest
from support import addUser, cli, onReactor

from twistmail.storage.maildir import MaildirStore
from twistmail.storage.mbox import MboxStore
from twistmail.testing.conformance import call, deliver, message, openFolder, tree

ALICE = "alice@example.test"
BOB = "bob@example.test"
STORES = {"maildir": MaildirStore, "mbox": MboxStore}


def configFile(tmp_path, dataDir: str, backend: str) -> str:
    path = tmp_path / f"{backend}.toml"
    path.write_text(f'[server]\ndata_dir = "{dataDir}"\n[storage]\nbackend = "{backend}"\n')
    return str(path)


def migrate(tmp_path, dataDir, source: str, *args: str, check: bool = True):
    return cli("--config", configFile(tmp_path, dataDir, source), "migrate", *args,
               dataDir=dataDir, check=check)


def populate(store) -> None:
    """Folders, flags, keywords, dates, subscriptions: everything a migration must keep."""
    deliver(store, message(1))
    deliver(store, b"Subject: tricky\r\n\r\nFrom a line\r\n>From another\r\nno newline")
    account = store.account(ALICE)
    onReactor(account.createFolder, "Work/Clients")
    onReactor(account.createFolder, "Sent")
    inbox = openFolder(store)
    call(inbox, "setFlags", [1], ["\\Seen", "\\Flagged", "project"], "add")
    sent = openFolder(store, "Sent")
    call(sent, "append", message(3), ["\\Seen", "$Forwarded"], 1600000000.0)
    call(sent, "append", message(4), ["\\Answered"], 1500000000.0)
    call(sent, "remove", [1])  # UIDs with a gap: renumbered by the migration
    deliver(store, message(5), folder="Work/Clients")
    onReactor(account.setSubscribed, "Sent", True)
    onReactor(account.setSubscribed, "Work/Clients", True)


def snapshot(store, address: str = ALICE) -> dict:
    """Everything observable through the storage interface, UIDs left out."""
    account = store.account(address)
    out = {"subscriptions": onReactor(account.subscriptions)}
    for name in onReactor(account.listFolders):
        folder = openFolder(store, name, address)
        datas = call(folder, "readMessages", list(folder.uids()))
        out[name] = [(m.flags, m.internalDate, m.uniqueId, data)
                     for m, data in zip(folder.messages(), datas, strict=True)]
    return out


@pytest.mark.parametrize("source, target", [("maildir", "mbox"), ("mbox", "maildir")])
def test_migrate_keeps_folders_flags_dates_and_uidls(tmp_path, dataDir, source, target):
    addUser(dataDir, ALICE)
    populate(STORES[source](dataDir))
    before = snapshot(STORES[source](dataDir))
    sourceTree = {p for p in tree(dataDir) if p.startswith(("mail", "mbox"))}

    result = migrate(tmp_path, dataDir, source, "--to", target, ALICE)
    assert f"{ALICE}: 4 folders, 4 messages ({source} -> {target})" in result.stdout
    assert result.stdout.rstrip().endswith(f'[storage]\nbackend = "{target}"')

    migrated = STORES[target](dataDir)
    assert snapshot(migrated) == before
    assert [m.uid for m in openFolder(migrated, "Sent").messages()] == [1]  # renumbered
    assert {p for p in tree(dataDir) if p.startswith(source if source == "mbox" else "mail")} \
        == {p for p in sourceTree if p.startswith(source if source == "mbox" else "mail")}
    assert not os.path.exists(os.path.join(dataDir, "migrate.tmp"))

    # And back again: the round trip changes nothing.
    os.rename(os.path.join(dataDir, "mail" if source == "maildir" else "mbox"),
              os.path.join(dataDir, "original"))
    migrate(tmp_path, dataDir, target, "--to", source, ALICE)
    assert snapshot(STORES[source](dataDir)) == before


def test_migrate_all_users(tmp_path, dataDir):
    addUser(dataDir, ALICE)
    addUser(dataDir, BOB)
    deliver(MaildirStore(dataDir), message(1), account=BOB)
    result = migrate(tmp_path, dataDir, "maildir", "--to", "mbox", "--all")
    assert f"{ALICE}: 1 folders, 0 messages" in result.stdout
    assert f"{BOB}: 1 folders, 1 messages" in result.stdout
    assert call(openFolder(MboxStore(dataDir), account=BOB), "readMessages", [1]) == [message(1)]


def test_migrate_refuses_while_the_server_runs(tmp_path, server):
    """A running server holds the data directory lock; migrate takes it or refuses."""
    deliver(server.store, message(1))
    result = migrate(tmp_path, server.dataDir, "maildir", "--to", "mbox", ALICE, check=False)
    assert result.returncode == 1
    assert "twistmail.lock is locked: a twistmail server is running" in result.stderr
    assert "Fix: stop it" in result.stderr
    assert not os.path.exists(os.path.join(server.dataDir, "mbox"))


def test_migrate_refuses_an_account_that_already_has_mail_there(tmp_path, dataDir):
    addUser(dataDir, ALICE)
    addUser(dataDir, BOB)
    deliver(MaildirStore(dataDir), message(1))
    deliver(MboxStore(dataDir), message(2), account=BOB)
    before = tree(dataDir)
    result = migrate(tmp_path, dataDir, "maildir", "--to", "mbox", "--all", check=False)
    assert result.returncode == 1
    assert f"{BOB}: " in result.stderr and "already exists. Fix: remove it" in result.stderr
    assert tree(dataDir) - {"twistmail.lock"} == before  # not even alice's was written


@pytest.mark.parametrize("args, error", [
    (("--to", "maildir", ALICE), "[storage] backend is already 'maildir'"),
    (("--to", "s3", ALICE), "--to: unknown backend 's3'. Fix: use one of maildir, mbox"),
    (("--to", "mbox", "nobody@example.test"), "no user nobody@example.test"),
])
def test_migrate_errors(tmp_path, dataDir, args, error):
    addUser(dataDir, ALICE)
    result = migrate(tmp_path, dataDir, "maildir", *args, check=False)
    assert result.returncode == 1 and error in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_a_failed_account_leaves_nothing_half_done(tmp_path, dataDir):
    """27 keywords in one mbox folder do not fit Maildir (26): that account is not migrated."""
    addUser(dataDir, ALICE)
    store = MboxStore(dataDir)
    deliver(store, message(1))
    call(openFolder(store), "setFlags", [1], [f"k{n}" for n in range(27)], "add")
    # ... and a staging directory left by an interrupted run is no obstacle.
    os.makedirs(os.path.join(dataDir, "migrate.tmp", "mail", "example.test", "alice", "cur"))
    result = migrate(tmp_path, dataDir, "mbox", "--to", "maildir", ALICE, check=False)
    assert result.returncode == 1
    assert f"{ALICE}: folder INBOX: at most 26 keywords" in result.stderr
    assert not os.path.exists(os.path.join(dataDir, "mail", "example.test", "alice"))
    assert not os.path.exists(os.path.join(dataDir, "migrate.tmp"))


def test_migrate_to_postgresql_and_back(tmp_path, dataDir, postgres):
    """Maildir -> PostgreSQL -> mbox: folders, flags, keywords, dates, subscriptions and
    POP3 unique ids survive (the postgresql backend's IImportableMailbox)."""
    from twistmail.storage.postgresql import PostgresStore, schema

    dsn = postgres.dsn(dataDir)
    schema.upgrade(dsn)
    addUser(dataDir, ALICE)
    populate(MaildirStore(dataDir))
    before = snapshot(MaildirStore(dataDir))
    table = f'[storage.postgresql]\ndsn = "{dsn}"\n'
    for backend in ("maildir", "postgresql"):
        path = tmp_path / f"{backend}.toml"
        path.write_text(f'[server]\ndata_dir = "{dataDir}"\n[storage]\nbackend = "{backend}"\n'
                        + table)
    result = cli("--config", str(tmp_path / "maildir.toml"), "migrate", "--to", "postgresql",
                 ALICE, dataDir=dataDir)
    assert f"{ALICE}: 4 folders, 4 messages (maildir -> postgresql)" in result.stdout
    store = PostgresStore(dsn)
    try:
        assert snapshot(store) == before
        assert [m.uid for m in openFolder(store, "Sent").messages()] == [1]  # renumbered
    finally:
        store.close()
    cli("--config", str(tmp_path / "postgresql.toml"), "migrate", "--to", "mbox", ALICE,
        dataDir=dataDir)
    assert snapshot(MboxStore(dataDir)) == before
