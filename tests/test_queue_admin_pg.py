"""``twistmail queue``, ``twistmail sendmail`` and the web admin's queue page on the relay
queue in PostgreSQL: they read and change the database, never ``<data_dir>/queue`` files."""

from __future__ import annotations

import json
import smtplib

import psycopg
import pytest
import test_queue_cli
from relayenv import queueIds
from serverproc import waitUntil
from support import addUser, cli, freePort, startServer
from test_webadmin import ADMIN, Browser

from twistmail.storage.postgresql import schema

ALICE = "alice@example.test"


net = test_queue_cli.net  # the fixture: a loopback Internet with DNS and an SMTP sink


@pytest.fixture
def configFile(postgres, net, dataDir, tmp_path):
    """[relay] queue = "postgresql" (retries an hour apart) and the database, as a file
    the server and the CLI both read."""
    dsn = postgres.dsn(dataDir)
    schema.upgrade(dsn)
    relay = net.relayConfig(retry_min=3600, retry_max=3600, queue="postgresql")
    path = tmp_path / "twistmail.toml"
    path.write_text("\n".join(["[storage.postgresql]", f"dsn = {json.dumps(dsn)}", "[relay]"]
                              + [f"{k} = {json.dumps(v)}" for k, v in relay.items()]) + "\n")
    return str(path)


@pytest.fixture
def server(configFile, dataDir):
    addUser(dataDir, ALICE)
    addUser(dataDir, ADMIN, "adminpw")
    port = freePort()
    srv = startServer(dataDir, configFile=configFile,
                      listen={"http": [f"tcp:{port}:interface=127.0.0.1"]},
                      admin={"enabled": True, "admins": [ADMIN]})
    srv.port = port
    yield srv
    srv.stop()


def queueRows(configFile: str) -> list[tuple]:
    from twistmail import config as configmod
    from twistmail.relay.pgqueue import configuredStore

    config = configmod.load(configFile, {})
    with psycopg.connect(configuredStore(config).dsn) as conn:
        return conn.execute("SELECT id, (entry->'recipients'->0->>'attempts')::int "
                            "FROM relay_queue ORDER BY id").fetchall()


def queued(server, net, configFile: str) -> str:
    net.sink.script.rcpt = lambda r: "451 4.7.1 greylisted"
    with smtplib.SMTP("127.0.0.1", server.smtpPort) as client:
        client.sendmail(ALICE, ["bob@remote.test"], b"Subject: waiting\r\n\r\nbody\r\n")
    [(queueId, _)] = waitUntil(lambda: [r for r in queueRows(configFile) if r[1] == 1], 15,
                               "the first, deferred attempt")
    return queueId


def test_cli_lists_shows_flushes_and_deletes_the_database_queue(server, net, configFile,
                                                                dataDir):
    queueId = queued(server, net, configFile)
    assert queueIds(dataDir) == []  # nothing on disk
    listed = cli("--config", configFile, "queue", "list", dataDir=dataDir).stdout
    assert queueId in listed and "greylisted" in listed and "1 message queued" in listed
    shown = cli("--config", configFile, "queue", "show", queueId, dataDir=dataDir).stdout
    assert "Subject: waiting" in shown and "bob@remote.test" in shown
    net.sink.script.rcpt = lambda r: None
    cli("--config", configFile, "queue", "flush", queueId, dataDir=dataDir)
    waitUntil(lambda: net.sink.messages, 15, "delivery after the flush")
    waitUntil(lambda: not queueRows(configFile), 15, "the queue to empty")
    net.sink.script.rcpt = lambda r: "451 4.7.1 greylisted"
    other = queued(server, net, configFile)
    cli("--config", configFile, "queue", "delete", other, dataDir=dataDir)
    waitUntil(lambda: not queueRows(configFile), 15, "the deleted message to go")
    missing = cli("--config", configFile, "queue", "show", other, dataDir=dataDir, check=False)
    assert missing.returncode == 1 and "no queue entry" in missing.stderr


def test_web_admin_queue_page_reads_and_steers_the_database_queue(server, net, configFile):
    queueId = queued(server, net, configFile)
    browser = Browser(server.port)
    browser.login(ADMIN, "adminpw")
    status, _, page = browser.request("GET", "/admin/queue")
    assert status == 200 and queueId in page and "greylisted" in page
    status, _, page = browser.request("POST", "/admin/queue/delete",
                                      {"csrf": browser.token(page), "id": queueId})
    assert status == 200 and f"delete of message {queueId} requested" in page
    waitUntil(lambda: not queueRows(configFile), 15, "the message to go")
    status, _, reply = browser.request("POST", "/admin/queue/delete",
                                       {"csrf": browser.token(page), "id": queueId})
    assert status == 400


def test_sendmail_queues_into_the_database_and_a_node_delivers_it(server, net, configFile,
                                                                  dataDir):
    out = cli("--config", configFile, "sendmail", "-v", "-f", ALICE, "bob@remote.test",
              dataDir=dataDir, stdin="Subject: from cron\n\nx\n").stdout
    queueId = out.split()[-1]
    waitUntil(lambda: net.sink.messages, 15, "delivery of the sendmail message")
    assert b"Subject: from cron" in net.sink.messages[0].data and queueIds(dataDir) == []
    waitUntil(lambda: not queueRows(configFile), 15, f"{queueId} to leave the queue")
