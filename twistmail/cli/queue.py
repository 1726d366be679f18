# -*- test-case-name: tests.test_queue_cli -*-
"""``twistmail queue list|show|flush|delete|senders``: look at and steer the relay queue.

Every command goes through L{IRelayQueue} (the disk queue or the one in
PostgreSQL, as ``[relay] queue`` says), built here with Deferreds that fire at
once: the CLI runs no reactor.  Reading needs no server.  ``senders`` (L{twistmail.cli.senders}) shows who sent
most in the last hour.  ``flush`` and ``delete`` go through the running
server when there is one (``twistmail.relay.control``), so they never race
a delivery; otherwise they change the queue directly, holding the server's lock so it
cannot start meanwhile (in PostgreSQL, a message another node is delivering
is left alone).
"""

from __future__ import annotations

import argparse
import time

from twisted.internet import defer
from twisted.python.failure import Failure

from twistmail import config as configmod
from twistmail.cli.output import table
from twistmail.interfaces import IRelayQueue
from twistmail.relay import control
from twistmail.relay.queue import QUEUED, RelayQueue


def diskQueue(dataDir: str) -> RelayQueue:
    """The disk queue, its work done in the calling thread."""
    return RelayQueue(dataDir, run=defer.maybeDeferred)


def openQueue(config: configmod.Config) -> IRelayQueue:
    """The queue ``[relay] queue`` names, its work done in the calling thread.

    @raise configmod.ConfigError: the postgresql queue without a usable [storage.postgresql].
    """
    if config["relay"]["queue"] != "postgresql":
        return diskQueue(config.dataDir)
    from twistmail.relay.pgqueue import Database, PostgresRelayQueue, configuredStore

    store = configuredStore(config)
    return PostgresRelayQueue(Database(store.dsn), config.dataDir)


def now(d: defer.Deferred):
    """The result of a Deferred that has fired (a queue from L{openQueue})."""
    out = []
    d.addBoth(out.append)
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


class QueueCLIError(Exception):
    pass


def register(sub) -> None:
    queue = sub.add_parser("queue", help="the outbound mail queue").add_subparsers(
        dest="action", required=True)
    queue.add_parser("list", help="queued messages: id, sender, recipients, attempts, "
                     "next attempt, last error")
    queue.add_parser("show", help="one message's envelope, recipients and headers").add_argument("id")
    queue.add_parser("flush", help="retry now (all messages, or one)").add_argument(
        "id", nargs="?")
    queue.add_parser("delete", help="remove a message without delivering it").add_argument("id")
    queue.add_parser("senders", help="authenticated users and domains that sent most in the "
                     "last hour, against their limits").add_argument(
        "--top", type=_positive, default=20, metavar="N", help="show N senders (default 20)")


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of senders (1 or more)")
    return int(text)


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    if timestamp <= time.time():
        return "now"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


def listing(queue: IRelayQueue) -> list[tuple]:
    """One row per queued message: id, sender, recipients, attempts, next attempt, last error
    (what ``queue list`` prints and the web admin's queue page shows)."""
    rows = []
    for e in now(queue.entries()):
        pending = e.pending()
        shown = ",".join(r.address for r in pending[:2]) + \
            (f",+{len(pending) - 2}" if len(pending) > 2 else "")
        errors = [r.last_reply for r in pending if r.last_reply]
        rows.append((e.id, f"<{e.sender}>", shown or "-",
                     max((r.attempts for r in pending), default=0),
                     _when(e.nextAttempt()).replace(" ", "T"),
                     _short(" ".join(errors[0].split()) if errors else "-", 70)))
    return rows


def cmdList(queue: IRelayQueue) -> str:
    rows = listing(queue)
    shown = table(["ID", "SENDER", "RECIPIENTS", "ATTEMPTS", "NEXT-ATTEMPT", "LAST-ERROR"], rows)
    return f"{shown}\n{len(rows)} message{'s' if len(rows) != 1 else ''} queued"


def cmdShow(queue: IRelayQueue, id: str) -> str:
    entry = now(queue.load(id))
    lines = [f"id:        {entry.id}", f"sender:    <{entry.sender}>",
             f"received:  {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(entry.created))} "
             f"via {entry.origin}" + (f" from {entry.client}" if entry.client else ""),
             f"size:      {entry.size}", ""]
    rows = [(r.address, r.state, r.attempts,
             _when(r.next_attempt).replace(" ", "T") if r.state == QUEUED else "-",
             _short(" ".join(r.last_reply.split()) or "-", 70)) for r in entry.recipients]
    lines.append(table(["RECIPIENT", "STATE", "ATTEMPTS", "NEXT-ATTEMPT", "LAST-REPLY"], rows))
    headers = now(queue.headers(id)).decode("utf-8", "replace").replace("\r\n", "\n")
    return "\n".join(lines) + "\n\n" + headers.rstrip("\n")


def _ask(queueDir: str, id: str, action: str, timeout: float) -> bool:
    path = control.writeRequest(queueDir, id, action)
    return control.waitHandled(path, timeout)


def askServer(queue: IRelayQueue, id: str | None, action: str) -> str:
    """From inside the running server (the web admin): request a flush or delete of an
    existing message (every message: C{id} None, flush only), without waiting for it."""
    if id is not None:
        now(queue.load(id))  # exists?
    control.writeRequest(queue.path, id or control.ALL, action)
    if action == "flush":
        return f"flush requested: the server is retrying {id or 'every message'} now"
    return f"delete of message {id} requested: the server removes it at its next queue scan"


def cmdFlush(dataDir: str, queue: IRelayQueue, id: str | None, timeout: float) -> str:
    queueDir = queue.path
    if id is not None:
        now(queue.load(id))  # exists?
    with control.serverStopped(dataDir) as stopped:
        if stopped:
            when = time.time()
            for entry in [now(queue.load(id))] if id else now(queue.entries()):
                for r in entry.pending():
                    r.next_attempt = when
                now(queue.save(entry))
            return ("the server is not running: the queue is retried as soon as it starts "
                    "(twistd twistmail)")
    if not _ask(queueDir, id or control.ALL, "flush", timeout):
        raise QueueCLIError(f"the server did not take the request within {timeout:g} s; "
                            "check that twistd twistmail is running on this data directory")
    return f"flush requested: the server is retrying {id or 'every message'} now"


def cmdDelete(dataDir: str, queue: IRelayQueue, id: str, timeout: float) -> str:
    queueDir = queue.path
    now(queue.load(id))  # exists?
    with control.serverStopped(dataDir) as stopped:
        if stopped:
            now(queue.remove(id))
            control.removeRequests(queueDir, [f"{id}.new"])
            return f"message {id} deleted"
    if _ask(queueDir, id, "delete", timeout):
        return f"message {id} deleted"
    return (f"delete requested: message {id} is being delivered right now; the server deletes "
            "it when that attempt ends (see: twistmail queue list)")


def run(args, config: configmod.Config) -> str:
    queue = openQueue(config)
    timeout = 5 + 3 * config["relay"]["pickup_interval"]
    if args.action == "list":
        return cmdList(queue)
    if args.action == "show":
        return cmdShow(queue, args.id)
    if args.action == "flush":
        return cmdFlush(config.dataDir, queue, args.id, timeout)
    return cmdDelete(config.dataDir, queue, args.id, timeout)
