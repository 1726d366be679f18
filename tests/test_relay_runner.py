"""QueueRunner with a fake clock, a fake DNS and a fake SMTP sender: when and what it tries.

Everything runs synchronously (disk work included), so time only moves when
the test advances the clock.
"""

from __future__ import annotations

import email
import email.policy
import os
from dataclasses import dataclass, field

import pytest
from support import addUser, maildirFiles
from twisted.internet import defer, task

from twistmail.auth.accounts import Accounts
from twistmail.delivery.local import LocalDelivery
from twistmail.delivery.routing import RelayPolicy, Router
from twistmail.relay.mx import DNSFailure, Hop
from twistmail.relay.queue import FAILED, SENT, RelayQueue, listIds, readEntry
from twistmail.relay.runner import QueueRunner, RunnerSettings, retryDelay
from twistmail.relay.sender import DEFERRED, Result
from twistmail.storage.maildir import MaildirStore

T0 = 1_700_000_000.0
ALICE = "alice@example.test"
MESSAGE = b"From: alice@example.test\r\nSubject: greetings\r\n\r\nhello\r\n"


def sync(f, *args, **kwargs):
    return defer.maybeDeferred(f, *args, **kwargs)


@dataclass
class Call:
    hops: list
    sender: str
    recipients: list
    data: bytes
    at: float
    d: defer.Deferred = field(default_factory=defer.Deferred)


class FakeSender:
    """Answers every transaction with ``reply(call)`` -> {rcpt: Result}; or holds it."""

    def __init__(self, clock):
        self.clock = clock
        self.calls: list[Call] = []
        self.hold = False
        self.reply = lambda call: {r: Result(SENT, "250 2.0.0 Ok", "mx.remote.test")
                                   for r in call.recipients}

    def send(self, hops, sender, recipients, openMessage, context):
        files = []
        openMessage().addCallback(files.append)
        with files[0] as f:
            data = f.read()
        call = Call(hops, sender, list(recipients), data, self.clock.seconds())
        call.handOff = context["handOff"]
        self.calls.append(call)
        if self.hold:
            return call.d
        return defer.succeed(self.reply(call))


def always(kind, reply, host="mx.remote.test"):
    return lambda call: {r: Result(kind, reply, host) for r in call.recipients}


class World:
    def __init__(self, dataDir, dns=None, **settings):
        self.dataDir = dataDir
        self.clock = task.Clock()
        self.clock.advance(T0)
        addUser(dataDir, ALICE)
        self.queue = RelayQueue(dataDir, run=sync, clock=self.clock.seconds)
        self.dns = dns or {}
        self.lookups: list[str] = []
        self.sender = FakeSender(self.clock)
        settings.setdefault("hostname", "mx.example.test")
        self.settings = RunnerSettings(**settings)
        self.runner = self.newRunner()

    def newRunner(self) -> QueueRunner:
        router = Router(Accounts(self.dataDir), RelayPolicy([]))
        runner = QueueRunner(self.queue, router, LocalDelivery(MaildirStore(self.dataDir, sync)),
                             self.destination, self.sender, self.settings, self.clock)
        runner.startService()
        return runner

    def destination(self, domain):
        self.lookups.append(domain)
        answer = self.dns.get(domain, [Hop("mx." + domain, ("192.0.2.1",))])
        return defer.fail(answer) if isinstance(answer, Exception) else defer.succeed(answer)

    def enqueue(self, recipients, sender=ALICE, message=MESSAGE) -> str:
        out = []
        self.queue.enqueue(sender, recipients, lambda: [message], origin="smtp").addBoth(out.append)
        return out[0].id

    def ids(self) -> list[str]:
        return listIds(self.queue.path)

    def advanceTo(self, when):
        """Run everything scheduled up to C{when}, each call at its own time."""
        while True:
            pending = [c.getTime() for c in self.clock.getDelayedCalls()]
            step = min(pending, default=when)
            if step > when:
                break
            self.clock.advance(max(0.0, step - self.clock.seconds()))
            if step == when and not [c for c in self.clock.getDelayedCalls() if c.getTime() <= when]:
                break
        self.clock.advance(max(0.0, when - self.clock.seconds()))

    def mailbox(self, address=ALICE) -> list:
        local, domain = address.split("@")
        new = os.path.join(self.dataDir, "mail", domain, local, "new")
        out = []
        for name in maildirFiles(self.dataDir, address):
            with open(os.path.join(new, name), "rb") as f:
                out.append(email.message_from_bytes(f.read(), policy=email.policy.default))
        return out


def dsnFields(message) -> list[dict]:
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    status = [p for p in message.iter_parts() if p.get_content_type() == "message/delivery-status"][0]
    return [{k: " ".join(v.split()) for k, v in block.items()} for block in status.get_payload()]


def test_retry_delay_doubles_up_to_the_maximum():
    assert [retryDelay(n, 300, 4000) for n in range(1, 7)] == [300, 600, 1200, 2400, 4000, 4000]
    assert retryDelay(10_000, 300, 4000) == 4000


def test_delivers_and_removes_the_message(dataDir):
    w = World(dataDir)
    id = w.enqueue(["bob@remote.test"])
    w.clock.advance(0)
    [call] = w.sender.calls
    assert call.sender == ALICE and call.recipients == ["bob@remote.test"]
    assert call.data == MESSAGE and call.hops == [Hop("mx.remote.test", ("192.0.2.1",))]
    assert w.ids() == [] and id not in w.runner._due


def test_one_transaction_per_domain_split_at_the_recipient_limit(dataDir):
    w = World(dataDir, maxRecipients=2)
    w.enqueue(["a@one.test", "b@two.test", "c@one.test", "d@one.test", "e@two.test"])
    w.clock.advance(0)
    got = sorted((c.hops[0].host, tuple(c.recipients)) for c in w.sender.calls)
    assert got == [("mx.one.test", ("a@one.test", "c@one.test")), ("mx.one.test", ("d@one.test",)),
                   ("mx.two.test", ("b@two.test", "e@two.test"))]
    assert sorted(w.lookups) == ["one.test", "one.test", "two.test"]


def test_backoff_then_delivery_after_the_receiver_recovers(dataDir):
    w = World(dataDir, retryMin=300, retryMax=1000)
    w.sender.reply = always(DEFERRED, "451 4.3.0 try later")
    id = w.enqueue(["bob@remote.test"])
    for _ in range(5):
        w.clock.advance(w.runner._due[id] - w.clock.seconds())
    assert [c.at - T0 for c in w.sender.calls] == [0, 300, 900, 1900, 2900]
    r = readEntry(w.queue.path, id).recipients[0]
    assert r.attempts == 5 and r.last_reply == "451 4.3.0 try later"
    assert r.next_attempt == T0 + 3900 and r.remote_host == "mx.remote.test"
    w.sender.reply = always(SENT, "250 2.0.0 Ok")
    w.advanceTo(T0 + 3900)
    assert len(w.sender.calls) == 6 and w.ids() == [] and w.mailbox() == []


def test_permanent_failure_bounces_at_once_with_a_dsn_to_a_local_sender(dataDir):
    w = World(dataDir)
    w.sender.reply = lambda call: {r: Result(FAILED if "gone" in r else SENT,
                                             "550 5.1.1 <gone@remote.test>: no such user"
                                             if "gone" in r else "250 2.0.0 Ok", "mx.remote.test")
                                   for r in call.recipients}
    id = w.enqueue(["gone@remote.test", "bob@remote.test"])
    w.clock.advance(0)
    assert w.ids() == []  # the message is done; the bounce was delivered locally
    [dsn] = w.mailbox()
    assert dsn["From"] == "Mail Delivery System <MAILER-DAEMON@mx.example.test>"
    assert dsn["To"].addresses[0].addr_spec == ALICE and dsn["Auto-Submitted"] == "auto-replied"
    perMessage, perRecipient = dsnFields(dsn)
    assert perMessage["Reporting-MTA"] == "dns; mx.example.test"
    assert perMessage["X-Twistmail-Queue-ID"] == id
    assert perRecipient["Final-Recipient"] == "rfc822; gone@remote.test"
    assert perRecipient["Action"] == "failed" and perRecipient["Status"] == "5.1.1"
    assert perRecipient["Remote-MTA"] == "dns; mx.remote.test"
    assert perRecipient["Diagnostic-Code"] == "smtp; 550 5.1.1 <gone@remote.test>: no such user"
    headers = [p for p in dsn.iter_parts() if p.get_content_type() == "text/rfc822-headers"][0]
    assert "Subject: greetings" in headers.get_content() and "hello" not in headers.get_content()
    assert len(w.sender.calls) == 1  # the bounce itself went to the local mailbox, not out


def test_expiry_bounces_after_the_queue_lifetime(dataDir):
    w = World(dataDir, retryMin=300, retryMax=4000, lifetime=1000)
    w.sender.reply = always(DEFERRED, "421 4.4.2 busy")
    id = w.enqueue(["bob@remote.test"])
    w.advanceTo(T0 + 999)
    assert [c.at - T0 for c in w.sender.calls] == [0, 300, 900] and w.mailbox() == []
    w.advanceTo(T0 + 1000)  # the last attempt is when the lifetime ends
    assert [c.at - T0 for c in w.sender.calls] == [0, 300, 900, 1000]
    assert id not in w.ids() and w.ids() == []
    [dsn] = w.mailbox()
    _, perRecipient = dsnFields(dsn)
    assert perRecipient["Status"] == "4.4.7" and perRecipient["Action"] == "failed"
    assert perRecipient["Diagnostic-Code"] == "smtp; 421 4.4.2 busy"
    assert "maximum time in the queue" in dsn.get_body(("plain",)).get_content()


def test_no_bounce_for_the_null_sender(dataDir):
    w = World(dataDir)
    w.sender.reply = always(FAILED, "550 5.1.1 no")
    w.enqueue(["bob@remote.test"], sender="")
    w.clock.advance(0)
    assert w.ids() == [] and len(w.sender.calls) == 1 and w.mailbox() == []


def test_bounce_to_a_remote_sender_uses_the_null_sender_and_never_bounces_itself(dataDir):
    w = World(dataDir)
    w.sender.reply = always(FAILED, "550 5.7.1 rejected")
    w.enqueue(["bob@remote.test"], sender="carol@elsewhere.test")
    w.clock.advance(0)
    original, dsn = w.sender.calls
    assert dsn.sender == "" and dsn.recipients == ["carol@elsewhere.test"]
    assert b"multipart/report" in dsn.data and b"Undelivered Mail" in dsn.data
    assert w.ids() == []  # the failed bounce was dropped, not bounced again


def test_dns_permanent_failure_bounces_and_temporary_failure_defers(dataDir):
    w = World(dataDir, dns={"nomail.test": DNSFailure(False, "5.1.10", "Domain nomail.test does "
                                                      "not accept mail (null MX)"),
                            "broken.test": DNSFailure(True, "4.4.3", "SERVFAIL")})
    w.enqueue(["x@nomail.test"])
    id = w.enqueue(["y@broken.test"])
    w.clock.advance(0)
    assert w.sender.calls == [] and w.ids() == [id]
    [dsn] = w.mailbox()
    _, perRecipient = dsnFields(dsn)
    assert perRecipient["Status"] == "5.1.10" and "null MX" in perRecipient["Diagnostic-Code"]
    assert "Remote-MTA" not in perRecipient
    assert readEntry(w.queue.path, id).recipients[0].last_reply == "451 4.4.3 SERVFAIL"


def test_unreachable_domain_is_suspended_so_other_messages_do_not_connect(dataDir):
    w = World(dataDir, retryMin=300)
    w.sender.reply = lambda call: {r: Result(DEFERRED, "451 4.4.1 connect to mx[192.0.2.1]:25: "
                                             "Connection refused", remote=False)
                                   for r in call.recipients}
    first = w.enqueue(["a@dead.test"])
    w.clock.advance(0)
    second = w.enqueue(["b@dead.test"])
    w.clock.advance(0)
    assert len(w.sender.calls) == 1
    reply = readEntry(w.queue.path, second).recipients[0].last_reply
    assert reply == "451 4.4.1 delivery temporarily suspended: connect to mx[192.0.2.1]:25: " \
                    "Connection refused"
    w.advanceTo(T0 + 300)  # suspension over: the first one finds the domain still dead
    assert len(w.sender.calls) == 2 and {first, second} == set(w.ids())
    w.sender.reply = always(SENT, "250 ok")
    w.advanceTo(T0 + 900)  # it is back: the first clears the suspension, the second follows
    assert len(w.sender.calls) == 4 and w.ids() == []


def test_per_domain_and_global_concurrency_limits(dataDir):
    w = World(dataDir, maxDeliveries=3, maxPerDomain=2)
    w.sender.hold = True
    for i in range(4):
        w.enqueue([f"u{i}@busy.test"])
    w.clock.advance(0)
    assert len(w.sender.calls) == 2  # two per domain
    w.enqueue(["v@other.test"])
    w.enqueue(["w@third.test"])
    w.clock.advance(0)
    assert len(w.sender.calls) == 3  # three in all
    done = 0
    while done < len(w.sender.calls):
        inFlight = [c for c in w.sender.calls if not c.d.called]
        domains = [c.recipients[0].split("@")[1] for c in inFlight]
        assert len(inFlight) <= 3 and domains.count("busy.test") <= 2
        call = w.sender.calls[done]
        call.d.callback({r: Result(SENT, "250 ok") for r in call.recipients})
        done += 1
        w.clock.advance(0)
    assert len(w.sender.calls) == 6 and w.ids() == []


def test_a_message_whose_data_is_sent_hands_its_slot_on_before_its_reply(dataDir):
    """The sender calls handOff once the data is out on a connection the next message can
    pipeline on: the next message starts then, not after the reply; the slot is released
    once however the first attempt then ends."""
    w = World(dataDir, maxDeliveries=10, maxPerDomain=1)
    w.sender.hold = True
    for i in range(3):
        w.enqueue([f"u{i}@busy.test"])
    sent = always(SENT, "250 ok")
    w.clock.advance(0)
    assert len(w.sender.calls) == 1
    w.sender.calls[0].handOff()
    w.sender.calls[0].handOff()  # twice: still one slot
    w.clock.advance(0)
    assert len(w.sender.calls) == 2  # the second message has the slot
    w.sender.calls[0].d.callback(sent(w.sender.calls[0]))
    w.clock.advance(0)
    assert len(w.sender.calls) == 2  # the first's end released nothing more
    w.sender.calls[1].d.callback(sent(w.sender.calls[1]))
    w.clock.advance(0)
    assert len(w.sender.calls) == 3
    w.sender.calls[2].d.callback(sent(w.sender.calls[2]))
    w.clock.advance(0)
    assert w.ids() == []


def test_local_and_unknown_recipients_from_the_queue(dataDir):
    w = World(dataDir)
    w.enqueue([ALICE, "nobody@example.test", "bob@remote.test"], sender="root@mx.example.test")
    w.clock.advance(0)
    assert [c.recipients for c in w.sender.calls] == [["bob@remote.test"],
                                                      ["root@mx.example.test"]]  # + the bounce
    [delivered] = w.mailbox()
    assert delivered["Subject"] == "greetings"
    assert b"Status: 5.1.1" in w.sender.calls[1].data


def test_flush_tries_now_and_delete_removes(dataDir):
    w = World(dataDir, retryMin=3600)
    w.sender.reply = always(DEFERRED, "451 4.3.0 later")
    a = w.enqueue(["a@remote.test"])
    b = w.enqueue(["b@remote.test"])
    w.clock.advance(0)
    assert len(w.sender.calls) == 2
    w.runner.flush(a)
    w.clock.advance(0)
    assert [c.recipients for c in w.sender.calls[2:]] == [["a@remote.test"]]
    w.runner.flush()
    w.clock.advance(0)
    assert len(w.sender.calls) == 5
    w.runner.delete(b)
    assert w.ids() == [a]
    w.sender.hold = True
    w.runner.flush(a)
    w.clock.advance(0)
    w.runner.delete(a)  # while its attempt is under way: removed when it ends
    assert w.ids() == [a]
    w.sender.calls[-1].d.callback({"a@remote.test": Result(DEFERRED, "451 4.3.0 later")})
    assert w.ids() == []


def test_a_restarted_runner_resumes_the_schedule_from_disk(dataDir):
    w = World(dataDir, retryMin=600)
    w.sender.reply = always(DEFERRED, "451 4.3.0 later")
    id = w.enqueue(["bob@remote.test"])
    w.clock.advance(0)
    w.runner.stopService()
    w.runner = w.newRunner()
    assert w.runner._due == {id: T0 + 600}
    w.sender.reply = always(SENT, "250 ok")
    w.advanceTo(T0 + 600)
    assert len(w.sender.calls) == 2 and w.ids() == []


@pytest.mark.parametrize("kind", [SENT, DEFERRED])
def test_only_ids_and_due_times_are_kept_in_memory(dataDir, kind):
    w = World(dataDir)
    w.sender.reply = always(kind, "250 ok" if kind == SENT else "451 4.3.0 later")
    ids = [w.enqueue([f"u{i}@remote.test"]) for i in range(5)]
    w.clock.advance(0)
    assert w.runner._busy == {}
    assert set(w.runner._due) == (set(ids) if kind == DEFERRED else set())
    assert all(isinstance(v, float) for v in w.runner._due.values())


def test_hundreds_of_messages_for_a_dead_domain_are_deferred_without_connecting(dataDir):
    """When the first attempts find the domain dead, the messages waiting for it finish at
    once; that must not nest one call per waiting message (it overflowed the stack)."""
    w = World(dataDir, maxDeliveries=100, maxPerDomain=20, retryMin=600)
    w.sender.hold = True
    ids = [w.enqueue([f"u{i}@dead.test"]) for i in range(600)]
    w.clock.advance(0)
    assert len(w.sender.calls) == 20  # 180 more wait for the domain
    refused = Result(DEFERRED, "451 4.4.1 connect to mx[192.0.2.1]:25: Connection refused",
                     remote=False)
    for call in w.sender.calls:
        call.d.callback({r: refused for r in call.recipients})
    w.advanceTo(T0 + 1)
    assert len(w.sender.calls) == 20
    assert all(readEntry(w.queue.path, id).recipients[0].attempts == 1 for id in ids)
    assert set(w.runner._due) == set(ids) and w.runner._busy == {}
