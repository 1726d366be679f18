"""The web admin's queue page: list, retry (flush) and delete, through the CLI's queue code."""

from __future__ import annotations

import pytest
import test_queue_cli
from relayenv import queueIds
from serverproc import waitUntil
from support import addUser, freePort, startServer
from test_queue_cli import queued
from test_webadmin import ADMIN, Browser

net = test_queue_cli.net  # the fixture: a loopback Internet with DNS and an SMTP sink


@pytest.fixture
def server(net, dataDir):
    """A relay whose retries are an hour apart (only a flush retries soon), with the web admin."""
    addUser(dataDir, "alice@example.test")
    addUser(dataDir, ADMIN, "adminpw")
    port = freePort()
    srv = startServer(dataDir, relay=net.relayConfig(retry_min=3600, retry_max=3600),
                      listen={"http": [f"tcp:{port}:interface=127.0.0.1"]},
                      admin={"enabled": True, "admins": [ADMIN]})
    srv.port = port
    yield srv
    srv.stop()


def admin(server) -> tuple[Browser, str]:
    browser = Browser(server.port)
    browser.login(ADMIN, "adminpw")
    status, _, page = browser.request("GET", "/admin/queue")
    assert status == 200
    return browser, page


def test_queue_lists_then_retry_delivers(server, net):
    queueId = queued(server, net)
    browser, page = admin(server)
    assert queueId in page and "&lt;alice@example.test&gt;" in page and "bob@remote.test" in page
    assert "greylisted" in page  # the last error
    net.sink.script.rcpt = lambda r: None  # recovered; the next retry is an hour away
    status, _, page = browser.request("POST", "/admin/queue/flush",
                                      {"csrf": browser.token(page), "id": queueId})
    assert status == 200 and f"flush requested: the server is retrying {queueId}" in page
    waitUntil(lambda: net.sink.messages, 10, "delivery after the flush")
    waitUntil(lambda: not queueIds(server.dataDir), 10, "the queue to empty")


def test_queue_delete_removes_without_delivering(server, net):
    queueId = queued(server, net)
    browser, page = admin(server)
    status, _, page = browser.request("POST", "/admin/queue/delete",
                                      {"csrf": browser.token(page), "id": queueId})
    assert status == 200 and f"delete of message {queueId} requested" in page
    waitUntil(lambda: not queueIds(server.dataDir), 10, "the message to go")
    assert net.sink.messages == []


def test_queue_unknown_or_hostile_id_is_an_error(server, net):
    browser, page = admin(server)
    for bad in ("0123456789ABCDEF", "../accounts", "<script>"):
        status, _, reply = browser.request("POST", "/admin/queue/delete",
                                           {"csrf": browser.token(page), "id": bad})
        assert status == 400 and "<script>" not in reply, bad
