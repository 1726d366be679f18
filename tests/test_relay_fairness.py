"""Per-sender fairness in the relay queue: one sender's flood, or backscatter to one
address, does not hold back everyone else's mail.

Mostly driven like tests/test_relay_runner.py: a fake clock, a fake SMTP sender that
holds each transaction until the test answers it, and synchronous disk work; one test
runs the server makeService builds against a receiving server on loopback.
"""

from __future__ import annotations

import smtplib
import time
import tracemalloc

from relayenv import Internet
from serverproc import waitUntil
from support import addUser, onReactor, startServer
from test_relay_runner import ALICE, World
from twisted.internet import defer

from twistmail._groupcommit import commitBatch
from twistmail.relay.fairness import FairQueue, laneKey
from twistmail.relay.queue import QueueEntry, Recipient, RelayQueue, stageNew
from twistmail.relay.sender import SENT, Result

MALLORY = "mallory@example.test"  # a compromised account


def deliveriesBefore(w: World, recipient: str, limit: int) -> int:
    """Answer the held transactions oldest first until one for C{recipient} starts;
    how many other transactions were started before it."""
    for _ in range(limit + 1):
        for i, call in enumerate(w.sender.calls):
            if recipient in call.recipients:
                return i
        call = next(c for c in w.sender.calls if not c.d.called)
        call.d.callback({r: Result(SENT, "250 ok") for r in call.recipients})
        w.clock.advance(0)
    raise AssertionError(f"{recipient} still waits after {limit} deliveries")


def flood(w: World, n: int, sender: str, to=lambda i: f"u{i}@remote.test", queue=None) -> list[str]:
    out = []
    for i in range(n):
        (queue or w.queue).enqueue(sender, [to(i)], lambda: [b"Subject: spam\r\n\r\nx\r\n"],
                                   origin="smtp").addCallback(lambda e: out.append(e.id))
    return out


def aliceWaits(w: World, flooded: int, to: str = "friend@other.test") -> int:
    """A second after the flood, alice sends one message: how many deliveries go first."""
    w.clock.advance(1)
    w.enqueue([to], sender=ALICE)
    w.clock.advance(0)
    return deliveriesBefore(w, to, flooded)


def test_a_sender_flooding_the_queue_does_not_delay_another_senders_mail(dataDir):
    w = World(dataDir, maxDeliveries=2)
    w.sender.hold = True
    flood(w, 1000, MALLORY)
    assert aliceWaits(w, 1000) <= 5


def test_backscatter_to_one_address_does_not_delay_other_mail_or_other_bounces(dataDir):
    """Bounces (from <>) share a lane per recipient: thousands to one victim are one lane."""
    w = World(dataDir, maxDeliveries=2)
    w.sender.hold = True
    flood(w, 1000, "", to=lambda i: "victim@remote.test")
    w.clock.advance(1)
    w.enqueue(["carol@elsewhere.test"], sender="")  # a bounce to someone else
    assert aliceWaits(w, 1000) <= 5
    assert deliveriesBefore(w, "carol@elsewhere.test", 1000) <= 5


def test_fair_turns_at_a_busy_domain_too(dataDir):
    """Both senders mail the same domain: the flood's transactions already waiting for
    one of its connection slots do not all go first."""
    w = World(dataDir, maxDeliveries=20, maxPerDomain=1)
    w.sender.hold = True
    flood(w, 200, MALLORY, to=lambda i: f"u{i}@busy.test")
    assert aliceWaits(w, 200, to="friend@busy.test") <= 5


def test_tagged_addresses_of_one_account_are_one_sender(dataDir):
    """user+1@, user+2@ ... are the same account (RFC 5233 subaddresses): one lane."""
    w = World(dataDir, maxDeliveries=2)
    w.sender.hold = True
    for i in range(300):
        w.enqueue([f"u{i}@remote.test"], sender=f"Mallory+{i}@example.test")
    assert aliceWaits(w, 300) <= 5


def test_fair_after_a_restart_with_the_senders_read_by_the_startup_scan(dataDir):
    w = World(dataDir, maxDeliveries=2)
    w.runner.stopService()
    flood(w, 300, MALLORY)
    w.clock.advance(1)
    w.enqueue(["friend@other.test"], sender=ALICE)
    w.sender.hold = True
    w.runner = w.newRunner()
    w.clock.advance(0)
    assert deliveriesBefore(w, "friend@other.test", 300) <= 5


def test_fair_for_mail_queued_by_another_process(dataDir):
    """``twistmail sendmail`` commits its messages itself; the server hears only their
    ids (``runner.add``) and reads the sender from the queue file."""
    w = World(dataDir, maxDeliveries=2)
    w.sender.hold = True
    other = RelayQueue(dataDir, run=w.queue._run, clock=w.clock.seconds)  # not listened to
    for id in flood(w, 300, MALLORY, queue=other):
        w.runner.add(id)
    w.clock.advance(1)  # a second later
    [id] = flood(w, 1, ALICE, to=lambda i: "friend@other.test", queue=other)
    w.runner.add(id)
    w.clock.advance(0)
    assert deliveriesBefore(w, "friend@other.test", 300) <= 5


def test_an_unknown_id_from_the_control_channel_leaves_nothing_behind(dataDir):
    w = World(dataDir)
    w.runner.add("NOSUCH")
    w.runner.flush("NOSUCH2")
    w.clock.advance(0)
    assert (w.runner._lane, w.runner._learning, w.runner._forced, w.runner.queued) == \
        ({}, set(), set(), 0)


def test_a_sender_alone_still_uses_every_delivery_slot(dataDir):
    """Fairness shares the slots; it does not cap one sender when no one else waits."""
    w = World(dataDir, maxDeliveries=5, maxPerDomain=20)
    w.sender.hold = True
    flood(w, 50, MALLORY)
    w.clock.advance(0)
    assert len(w.sender.calls) == 5


def test_repeated_flushes_while_every_slot_is_busy_keep_the_schedule_bounded(dataDir):
    """Each flush reschedules every message: flushes within one clock tick do not pile
    up one schedule entry per message per flush."""
    w = World(dataDir, maxDeliveries=1)
    w.sender.hold = True
    flood(w, 100, MALLORY)
    w.clock.advance(0)
    for _ in range(50):
        w.runner.flush()
        w.clock.advance(0)
    assert len(w.runner._heap) + len(w.runner._turns) <= 2 * 100 + 1000
    assert deliveriesBefore(w, "u99@remote.test", 200) <= 100  # and all still get their turn


class NeverLoads:
    """A queue whose files never finish loading: the runner's bookkeeping alone."""

    path = "/nonexistent"

    def addListener(self, listener):
        pass

    def watch(self, found):
        pass

    def scan(self):
        return defer.Deferred()

    def load(self, id):
        return defer.Deferred()

    loadWithMessage = load


def test_memory_per_queued_message_is_a_few_hundred_octets(dataDir):
    """100,000 queued messages must cost a few tens of MB: what is kept per message
    (id, due time, lane, its place in the turns) stays under 450 octets, all of them due
    (the worst case: each is also in the fair queue)."""
    w = World(dataDir, maxDeliveries=2)
    w.runner.stopService()
    runner = type(w.runner)(NeverLoads(), None, None, None, None, w.settings, w.clock)
    runner.startService()
    n = 20_000
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    found = [(f"{i:016X}", w.clock.seconds(), f"sender{i % 500}@example.test") for i in range(n)]
    runner._scanned(found)
    del found
    w.clock.advance(0)
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert runner.queued == n and len(runner._turns) == n - 4
    assert used / n < 450, f"{used / n:.0f} octets per queued message"


def test_lane_keys():
    assert laneKey("Mallory+x@Example.TEST", ["a@b.test"]) == "mallory@example.test"
    assert laneKey("", ["Victim@Remote.test", "other@remote.test"]) == "victim@remote.test"
    assert laneKey("ROOT", []) == "root" and laneKey("", []) == ""
    assert laneKey("a" * 1000 + "@x.test", []) == "a" * 320  # bounded
    assert laneKey("x@y.test", []) is laneKey("X@y.test", [])  # one string per lane


def test_fair_queue_takes_one_per_lane_per_round_and_an_idle_lane_first():
    q = FairQueue()
    for i in range(3):
        q.push("a", f"a{i}")
    q.push("b", "b0")
    assert [q.pop(), q.pop()] == ["a0", "b0"]
    q.push("c", "c0")  # nothing of c or b is waiting: they go before a's next turn
    q.push("b", "b1")
    q.push("b", "b2")  # ... but b2 waits for the next round
    assert [q.pop() for _ in range(len(q))] == ["c0", "b1", "a1", "b2", "a2"]
    q.push("a", "a3")
    assert q.pop() == "a3" and len(q) == 0 and q._last == {}


def test_a_flood_queued_before_a_restart_does_not_delay_a_message_submitted_after(dataDir):
    """The composed server (startup scan, enqueue listener, real sender) against a
    receiving server that answers one message at a time, when the test says so."""
    net = Internet()
    server = None
    try:
        def stage(i: int):  # queued while the server was down
            entry = QueueEntry(f"FLOOD{i:04d}", MALLORY, [Recipient(f"u{i}@remote.test")],
                               time.time(), "smtp")
            return lambda: stageNew(f"{dataDir}/queue", entry,
                                    lambda: [b"Subject: spam\r\n\r\nx\r\n"])

        assert all(isinstance(r, list) for r in commitBatch([stage(i) for i in range(300)]))
        net.sink.script.hold = defer.Deferred()
        addUser(dataDir, ALICE)
        server = startServer(dataDir, relay=net.relayConfig(max_deliveries=1))
        waitUntil(lambda: net.sink.dataSeen, 15, "the first delivery")
        with smtplib.SMTP("127.0.0.1", server.smtpPort, timeout=30) as client:
            client.sendmail(ALICE, ["friend@remote.test"], b"Subject: hi\r\n\r\nhello\r\n")

        def answerOne():
            held, net.sink.script.hold = net.sink.script.hold, defer.Deferred()
            held.callback(None)

        for seen in range(1, 10):
            if any("friend@remote.test" in r.recipients for r in net.sink.dataSeen):
                break
            onReactor(answerOne)
            waitUntil(lambda seen=seen: len(net.sink.dataSeen) > seen, 15, "the next delivery")
        order = [r.recipients for r in net.sink.dataSeen]
        assert ["friend@remote.test"] in order[:5], order
    finally:
        if server is not None:
            onReactor(lambda: net.sink.script.hold.callback(None))
            server.stop()
        net.stop()
