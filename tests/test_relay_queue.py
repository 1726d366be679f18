"""The relay queue on disk: format, atomic commit, crash leftovers, canonical line endings."""

from __future__ import annotations

import io
import json
import os

import pytest
from twisted.internet import defer

from twistmail.errors import StorageError
from twistmail.relay import queue as queuemod
from twistmail.relay.queue import (
    FAILED,
    QUEUED,
    QueueEntry,
    QueueError,
    Recipient,
    RelayQueue,
    canonicalLines,
    newQueueId,
    readEntry,
    scanSync,
)


def sync(f, *args, **kwargs):
    return defer.maybeDeferred(f, *args, **kwargs)


def result(d):
    out = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


@pytest.fixture
def queue(dataDir):
    return RelayQueue(dataDir, run=sync, clock=lambda: 1700000000.5)


def enqueue(queue, data=b"Subject: x\r\n\r\nbody\r\n", rcpts=("bob@remote.test",), **kw):
    kw.setdefault("origin", "smtp")
    return result(queue.enqueue("alice@example.test", rcpts, lambda: [data], **kw))


def test_enqueue_writes_message_and_versioned_json(queue):
    entry = enqueue(queue, rcpts=["bob@remote.test", "carol@other.test"], id="ABC123",
                    client="192.0.2.1", helo="client.test")
    assert sorted(os.listdir(queue.path)) == [".lock", "ABC123.eml", "ABC123.json"]
    with open(os.path.join(queue.path, "ABC123.eml"), "rb") as f:
        assert f.read() == b"Subject: x\r\n\r\nbody\r\n"
    with open(os.path.join(queue.path, "ABC123.json")) as f:
        document = json.load(f)
    assert document["format"] == "twistmail-queue" and document["version"] == 1
    assert document["sender"] == "alice@example.test" and document["created"] == 1700000000.5
    assert document["client"] == "192.0.2.1" and document["size"] == 20
    assert [r["address"] for r in document["recipients"]] == ["bob@remote.test", "carol@other.test"]
    assert document["recipients"][0] == {
        "address": "bob@remote.test", "state": "queued", "attempts": 0, "next_attempt": 0.0,
        "last_attempt": None, "last_reply": "", "remote_host": ""}
    assert readEntry(queue.path, "ABC123") == entry
    assert oct(os.stat(os.path.join(queue.path, "ABC123.eml")).st_mode & 0o777) == "0o600"


def test_the_json_rename_is_the_commit_point_and_both_are_synced_first(queue, monkeypatch):
    from twistmail import _fsutil

    enqueue(queue, id="X0")  # creates the queue directory
    events = []
    realRename, realDir = os.rename, _fsutil.fsyncDir
    monkeypatch.setattr(os, "rename", lambda a, b: (events.append(("rename", os.path.basename(b))),
                                                    realRename(a, b))[1])
    monkeypatch.setattr(_fsutil, "syncFilesystems", lambda paths: events.append(("sync", sorted(
        os.path.basename(p) for p in paths))))
    monkeypatch.setattr(_fsutil, "fsyncDir", lambda p: (events.append(("dir", p)), realDir(p))[1])
    enqueue(queue, id="X1")
    tmp = [n for n in events[0][1] if n.endswith(".tmp")]
    assert events == [("sync", ["X1.eml"] + tmp), ("rename", "X1.eml"), ("rename", "X1.json"),
                      ("dir", queue.path)]


def test_listeners_hear_of_committed_messages_only(queue, monkeypatch):
    heard = []
    queue.addListener(heard.append)
    entry = enqueue(queue)
    assert heard == [entry]
    monkeypatch.setattr(queuemod, "writeNewFile", lambda *a: (_ for _ in ()).throw(StorageError("disk full")))
    with pytest.raises(StorageError):
        enqueue(queue)
    assert heard == [entry]


def test_failed_enqueue_leaves_nothing(queue, monkeypatch):
    real = queuemod.writeNewFile
    calls = []

    def failSecond(path, chunks):
        calls.append(path)
        if len(calls) == 2:
            raise StorageError("disk full")
        return real(path, chunks)

    monkeypatch.setattr(queuemod, "writeNewFile", failSecond)
    with pytest.raises(StorageError):
        enqueue(queue, id="F1")
    assert [n for n in os.listdir(queue.path) if not n.startswith(".")] == []


def test_id_collision_is_refused_not_overwritten(queue):
    enqueue(queue, b"first\r\n", id="SAME")
    with pytest.raises(StorageError) as info:
        enqueue(queue, b"second\r\n", id="SAME")
    assert isinstance(info.value.__cause__, FileExistsError)
    with open(os.path.join(queue.path, "SAME.eml"), "rb") as f:
        assert f.read() == b"first\r\n"


def test_save_replaces_state_and_remove_deletes_both_files(queue):
    entry = enqueue(queue, id="S1")
    entry.recipients[0].state = FAILED
    entry.recipients[0].last_reply = "550 5.1.1 no such user"
    result(queue.save(entry))
    assert readEntry(queue.path, "S1").recipients[0].last_reply == "550 5.1.1 no such user"
    assert not [n for n in os.listdir(queue.path) if n.endswith(".tmp")]
    result(queue.remove("S1"))
    assert [n for n in os.listdir(queue.path) if not n.startswith(".")] == []
    with pytest.raises(QueueError):
        result(queue.save(entry))  # a removed entry is not resurrected


def test_removals_unlink_in_the_pool_and_share_one_directory_sync(dataDir, monkeypatch):
    """The unlinks run as pool calls of their own (in parallel, not one by one in the
    commit's thread); each removal is reported only once a directory sync followed it."""
    from twistmail import _fsutil

    calls = []

    def held(f, *args):  # a pool whose calls run when the test says so
        d = defer.Deferred()
        calls.append((f, args, d))
        return d

    def runAll():
        while calls:
            f, args, d = calls.pop(0)
            defer.maybeDeferred(f, *args).chainDeferred(d)

    queue = RelayQueue(dataDir, run=held, clock=lambda: 1700000000.5)
    for id in ("R1", "R2", "R3"):
        d = queue.enqueue("alice@example.test", ["bob@remote.test"], lambda: [b"x\r\n"],
                          origin="smtp", id=id)
        runAll()
        result(d)
    synced = []
    realDir = _fsutil.fsyncDir
    monkeypatch.setattr(_fsutil, "fsyncDir", lambda p: (synced.append(p), realDir(p))[1])
    removals = [queue.remove(id) for id in ("R1", "R2", "R3")]
    # Two thread calls at once (twistmail._batchcalls); R3 waits for the next one.
    assert [args[1] for _, args, _ in calls] == [["R1"], ["R2"]]
    unlinked = []
    while True:  # the unlinks (the group commits they submit wait in calls meanwhile)
        due = [c for c in calls if c[1][1] in (["R1"], ["R2"], ["R3"])]
        if not due:
            break
        for f, args, d in due:
            calls.remove((f, args, d))
            unlinked.append(args[1])
            defer.maybeDeferred(f, *args).chainDeferred(d)
    assert unlinked == [["R1"], ["R2"], ["R3"]]
    assert sorted(os.listdir(queue.path)) == [".lock"]
    done = []
    for d in removals:
        d.addCallback(done.append)
    assert done == [] and synced == []  # unlinked, but not yet durable: not reported
    runAll()  # the group commits: the first removal's, then the other two together
    assert len(done) == 3 and synced == [queue.path, queue.path]


def test_small_messages_are_read_with_their_entry_large_ones_streamed(queue):
    small = b"Subject: s\r\n\r\n" + b"x" * (queuemod.IN_MEMORY - 16) + b"\r\n"
    large = b"Subject: l\r\n\r\n" + b"y" * queuemod.IN_MEMORY + b"\r\n"
    assert len(small) == queuemod.IN_MEMORY
    enqueue(queue, small, id="SMALL")
    enqueue(queue, large, id="LARGE")
    entry, message = result(queue.loadWithMessage("SMALL"))
    assert entry.id == "SMALL" and isinstance(message, io.BytesIO)
    os.unlink(queue.messagePath("SMALL"))  # read already: nothing is left open
    assert message.read() == small
    entry, message = result(queue.loadWithMessage("LARGE"))
    with message:
        assert not isinstance(message, io.BytesIO) and message.read() == large


def test_an_entry_larger_than_one_read_is_read_whole(queue):
    """Entries are read with os.read in 64 KiB steps: 2,000 recipients take several."""
    rcpts = [f"recipient-with-a-long-name-{i:04d}@remote.test" for i in range(2000)]
    enqueue(queue, rcpts=rcpts, id="MANY")
    assert os.path.getsize(os.path.join(queue.path, "MANY.json")) > 2 * 64 * 1024
    entry, message = result(queue.loadWithMessage("MANY"))
    assert [r.address for r in entry.recipients] == rcpts
    assert message.read() == b"Subject: x\r\n\r\nbody\r\n"


def test_scan_cleans_up_after_a_crash_and_lists_due_times(queue):
    entry = enqueue(queue, id="OK1")
    entry.recipients[0].next_attempt = 1700000300.0
    result(queue.save(entry))
    # What a crash between the two renames, or mid-write, leaves behind:
    for name, data in (("HALF.eml", b"orphan\r\n"), ("OK1.json.123.0.tmp", b"{"),
                       ("NEW.json.9.9.tmp", b"{")):
        with open(os.path.join(queue.path, name), "wb") as f:
            f.write(data)
    assert result(queue.scan()) == [("OK1", 1700000300.0, "alice@example.test")]
    assert sorted(n for n in os.listdir(queue.path) if not n.startswith(".")) == ["OK1.eml", "OK1.json"]


def test_scan_quarantines_what_it_cannot_read(queue):
    enqueue(queue, id="GOOD")
    enqueue(queue, id="BAD")
    enqueue(queue, id="LOST")
    with open(os.path.join(queue.path, "BAD.json"), "w") as f:
        json.dump({"format": "twistmail-queue", "version": 99}, f)
    os.unlink(os.path.join(queue.path, "LOST.eml"))
    assert [id for id, _, _ in scanSync(queue.path)] == ["GOOD"]
    assert sorted(os.listdir(os.path.join(queue.path, "corrupt"))) == ["BAD.eml", "BAD.json", "LOST.json"]


def test_next_attempt_is_the_earliest_pending_recipient():
    entry = QueueEntry("I", "a@b.test", [Recipient("x@y.test", QUEUED, next_attempt=50),
                                         Recipient("z@y.test", QUEUED, next_attempt=20),
                                         Recipient("w@y.test", FAILED, next_attempt=10)], 0, "smtp")
    assert entry.nextAttempt() == 20
    assert [r.address for r in entry.pending()] == ["x@y.test", "z@y.test"]
    for r in entry.recipients:
        r.state = FAILED
    assert entry.nextAttempt() is None


@pytest.mark.parametrize("chunks, expected", [
    ([b"a\nb\n"], b"a\r\nb\r\n"),
    ([b"a\r\nb\r\n"], b"a\r\nb\r\n"),
    ([b"a\r", b"\nb"], b"a\r\nb\r\n"),
    ([b"a\r", b"\r\nb\r"], b"a\r\r\nb\r\n"),  # a lone CR inside a line stays
    ([b"no newline at end"], b"no newline at end\r\n"),
    ([b"x\n.\n", b"y"], b"x\r\n.\r\ny\r\n"),
    ([], b""),
])
def test_canonical_lines(chunks, expected):
    assert b"".join(canonicalLines(chunks)) == expected


def test_ids_are_unique_hex_and_validated():
    ids = {newQueueId() for _ in range(2000)}
    assert len(ids) == 2000 and all(len(i) == 16 for i in ids)
    for bad in ("../x", "", "a/b", "x" * 65):
        with pytest.raises(QueueError):
            queuemod.validId(bad)
