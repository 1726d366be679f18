"""IRelayQueue: the disk queue and the PostgreSQL queue through the same tests, and
what only the shared queue does (claims, leases, polls; tests/pgproc.py's PostgreSQL)."""

from __future__ import annotations

import pytest
from support import onReactor
from twisted.internet import reactor
from zope.interface.verify import verifyObject

from twistmail.errors import StorageError
from twistmail.interfaces import IRelayQueue
from twistmail.relay.queue import FAILED, SENT, QueueError, RelayQueue
from twistmail.storage.postgresql import schema

MESSAGE = b"Subject: x\r\nMessage-ID: <1@test>\r\n\r\nbody\r\n"


def _postgresQueue(dsn: str, dataDir: str, **kw):
    from twistmail.relay.pgqueue import PostgresRelayQueue
    from twistmail.storage.postgresql import PostgresStore

    return PostgresRelayQueue(PostgresStore(dsn, connectTimeout=2), dataDir, **kw)


@pytest.fixture(params=["disk", "postgresql"])
def queue(request, dataDir, tmp_path):
    if request.param == "disk":
        yield RelayQueue(dataDir)
        return
    postgres = request.getfixturevalue("postgres")
    dsn = postgres.dsn(str(tmp_path))
    schema.upgrade(dsn)
    made = _postgresQueue(dsn, dataDir)
    try:
        yield made
    finally:
        made._db.close()


def enqueue(queue, data=MESSAGE, rcpts=("bob@remote.test",), **kw):
    kw.setdefault("origin", "smtp")
    return onReactor(lambda: queue.enqueue("alice@example.test", list(rcpts),
                                           lambda: [data], **kw))


def test_both_provide_the_interface(queue):
    assert verifyObject(IRelayQueue, queue)


def test_enqueue_load_and_read_the_message(queue):
    entry = enqueue(queue, b"Subject: x\n\nbare LF\n", ("a@r.test", "b@r.test"),
                    extra={"dsn_ret": "HDRS"}, client="192.0.2.1")
    loaded = onReactor(queue.load, entry.id)
    assert loaded == entry and loaded.size == len(b"Subject: x\r\n\r\nbare LF\r\n")
    assert [r.address for r in loaded.recipients] == ["a@r.test", "b@r.test"]
    assert loaded.extra == {"dsn_ret": "HDRS"} and loaded.client == "192.0.2.1"
    assert onReactor(queue.headers, entry.id) == b"Subject: x\r\n"
    assert onReactor(queue.message, entry.id) == b"Subject: x\r\n\r\nbare LF\r\n"
    loaded, f = onReactor(queue.loadWithMessage, entry.id)
    with f:
        assert f.read() == b"Subject: x\r\n\r\nbare LF\r\n"
    assert b"".join(queue.source(entry.id).chunks()) == b"Subject: x\r\n\r\nbare LF\r\n"
    with onReactor(queue.openMessage, entry.id) as again:
        assert again.read() == b"Subject: x\r\n\r\nbare LF\r\n"
    onReactor(queue.release, entry.id)


def test_a_large_message_round_trips_in_chunks(queue):
    body = b"".join(b"line %07d of a large message\r\n" % n for n in range(40000))  # ~1.3 MB
    data = b"Subject: big\r\n\r\n" + body
    pieces = [data[i:i + 10000] for i in range(0, len(data), 10000)]
    entry = onReactor(lambda: queue.enqueue("a@x.test", ["b@r.test"], lambda: iter(pieces),
                                            origin="smtp"))
    assert entry.size == len(data)
    _, f = onReactor(queue.loadWithMessage, entry.id)
    with f:
        assert f.read() == data
    onReactor(queue.release, entry.id)


def test_listeners_hear_of_committed_messages(queue):
    heard = []
    queue.addListener(heard.append)
    entry = enqueue(queue)
    assert [e.id for e in heard] == [entry.id]


def test_save_records_per_recipient_state_and_scan_lists_what_is_left(queue):
    entry = enqueue(queue, rcpts=("a@r.test", "b@r.test", "c@r.test"))
    entry, f = onReactor(queue.loadWithMessage, entry.id)
    f.close()
    entry.recipients[0].state = SENT
    entry.recipients[1].state = FAILED
    entry.recipients[2].attempts, entry.recipients[2].next_attempt = 1, 4e9
    entry.recipients[2].last_reply = "451 4.3.0 later"
    onReactor(queue.save, entry)
    assert onReactor(queue.load, entry.id) == entry
    found = onReactor(queue.scan)
    assert [(id, when) for id, when, _ in found] == [(entry.id, 4e9)]
    assert found[0][2] == entry.lane()
    assert [e.id for e in onReactor(queue.entries)] == [entry.id]


def test_remove_and_missing_entries(queue):
    entry = enqueue(queue)
    onReactor(queue.remove, entry.id)
    assert onReactor(queue.scan) == [] and onReactor(queue.entries) == []
    with pytest.raises(QueueError):
        onReactor(queue.load, entry.id)
    with pytest.raises(QueueError):
        onReactor(queue.loadWithMessage, entry.id)
    with pytest.raises(QueueError):
        onReactor(queue.load, "../etc")


def test_a_taken_id_is_refused_not_overwritten(queue):
    entry = enqueue(queue, id="ABCDEF0123456789")
    with pytest.raises(StorageError):
        enqueue(queue, b"Subject: other\r\n\r\n", id=entry.id)
    assert onReactor(queue.headers, entry.id).startswith(b"Subject: x")


def test_entries_are_listed_oldest_first(queue):
    ids = [enqueue(queue).id for _ in range(3)]
    assert [e.id for e in onReactor(queue.entries)] == ids


# -- only the shared queue -------------------------------------------------------


@pytest.fixture
def twoNodes(postgres, tmp_path):
    dsn = postgres.dsn(str(tmp_path))
    schema.upgrade(dsn)
    nodes = []
    for name in ("a", "b"):
        data = tmp_path / name
        data.mkdir()
        nodes.append(_postgresQueue(dsn, str(data), lease=5, node=name))
    try:
        yield nodes
    finally:
        for node in nodes:
            node._db.close()


def test_one_node_at_a_time_holds_a_message(twoNodes):
    from twistmail.relay.pgqueue import QueueClaimed

    a, b = twoNodes
    entry = enqueue(a)
    held, f = onReactor(a.loadWithMessage, entry.id)
    f.close()
    with pytest.raises(QueueClaimed):
        onReactor(b.loadWithMessage, entry.id)
    held.recipients[0].attempts, held.recipients[0].next_attempt = 1, 0.0
    onReactor(a.save, held)  # the claim ends with the save
    entry, f = onReactor(b.loadWithMessage, entry.id)
    f.close()
    assert entry.recipients[0].attempts == 1
    onReactor(b.release, entry.id)


def test_an_expired_lease_lets_another_node_take_the_message(twoNodes):
    """Node a claims and never renews (as if it died): after the lease, b takes it, and
    a's late save is refused rather than overwriting b's state."""
    import psycopg

    a, b = twoNodes
    entry = enqueue(a)
    held, f = onReactor(a.loadWithMessage, entry.id)
    f.close()
    with psycopg.connect(a._db.dsn, autocommit=True) as conn:  # the lease runs out
        conn.execute("UPDATE relay_queue SET lease_until = lease_until - 10")
    polled = onReactor(lambda: b._db.transaction(_due, 4e9))
    assert [row[0] for row in polled] == [entry.id]
    taken, f = onReactor(b.loadWithMessage, entry.id)
    f.close()
    with pytest.raises(QueueError):
        onReactor(a.save, held)
    onReactor(b.save, taken)


def test_the_poll_hands_due_unheld_messages_to_watchers(twoNodes):
    from twisted.internet import task

    a, b = twoNodes
    clock = task.Clock()
    clock.advance(4e9)
    b._clock = clock
    heard = []
    b.watch(heard.append)
    entry = enqueue(a)

    def poll():
        b._poll()
        return b._db.transaction(lambda conn: None)  # after the poll's own transaction

    onReactor(poll)
    deadline = reactor.seconds() + 10
    while not heard and reactor.seconds() < deadline:
        onReactor(lambda: b._db.transaction(lambda conn: None))
    assert [[row[0] for row in rows] for rows in heard][:1] == [[entry.id]]


def _due(conn, until):
    from twistmail.relay.pgqueue import due

    return due(conn, until)


def test_a_recipient_recorded_as_sent_is_never_sent_again_by_the_node_taking_over(twoNodes):
    """Node a reached one of two recipients, wrote it at once (recordSent), and died
    before the other's outcome: node b, after the lease, has only the other left."""
    import psycopg

    a, b = twoNodes
    entry = enqueue(a, rcpts=("x@one.test", "y@two.test"))
    _, f = onReactor(a.loadWithMessage, entry.id)
    f.close()
    onReactor(a.recordSent, entry.id, [("x@one.test", "250 2.0.0 ok", "mx.one.test")])
    with psycopg.connect(a._db.dsn, autocommit=True) as conn:  # a died: its lease runs out
        conn.execute("UPDATE relay_queue SET lease_until = lease_until - 10")
    taken, f = onReactor(b.loadWithMessage, entry.id)
    f.close()
    assert [r.address for r in taken.pending()] == ["y@two.test"]
    [done] = [r for r in taken.recipients if r.state == SENT]
    assert (done.address, done.attempts, done.last_reply, done.remote_host) == \
        ("x@one.test", 1, "250 2.0.0 ok", "mx.one.test")
    with pytest.raises(QueueError):  # a's late records are refused
        onReactor(a.recordSent, entry.id, [("y@two.test", "250 ok", "mx.two.test")])
