"""Retrieve a whole mailbox over POP3 and check every message.

Two clients, timed separately and both from connect to QUIT (login time,
which includes the server's password hash check, is also reported alone):

* ``poplib``: the stdlib client, one RETR at a time waiting for each reply.
  This is what the "2,000 messages in under a second" target refers to.
* ``pipelined``: an asyncio client that sends all RETR commands up front
  and then reads the replies, showing the server's throughput without
  client round trips.

Retrieved bytes are checked outside the timed section: each message must
end with exactly the message that was sent (regenerated from its
Message-ID), so a server may prepend trace headers (Return-Path, Received)
but must not alter or truncate the rest.  Nothing is deleted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import poplib
import sys
import time
from dataclasses import asdict, dataclass, field

from message import MessageFactory, sequence_of


@dataclass
class Pop3Result:
    """Outcome of one mailbox retrieval."""

    client: str
    expected: int
    listed: int = 0
    retrieved: int = 0
    verified: int = 0
    seconds: float = 0.0
    login_seconds: float = 0.0
    msgs_per_sec: float = 0.0
    added_header_bytes: int | None = None
    errors: list[str] = field(default_factory=list)


def _verify(result: Pop3Result, messages: list[bytes], size: int, smtp_source: bool) -> None:
    """Check each retrieved message ends with the message that was sent.

    smtp-source sends the same file every time (sequence 0) and appends an
    empty line, so for it duplicates are expected and the tail differs.
    """
    factory = MessageFactory(size)
    seen: set[int] = set()
    for i, msg in enumerate(messages, 1):
        seq = sequence_of(msg)
        if seq is None or (seq in seen and not smtp_source):
            result.errors.append(f"msg {i}: missing or duplicate Message-ID ({seq})")
            continue
        seen.add(seq)
        sent = factory.render(seq) + (b"\r\n" if smtp_source else b"")
        if len(msg) < len(sent) or not msg.endswith(sent):
            result.errors.append(f"msg {i}: {len(msg)} bytes, does not end with sent {len(sent)}")
            continue
        result.verified += 1
        result.added_header_bytes = len(msg) - len(sent)
    del result.errors[10:]


def retrieve_poplib(
    host: str, port: int, user: str, password: str
) -> tuple[Pop3Result, list[bytes]]:
    """Sequential RETR with the stdlib client; returns result and messages."""
    result = Pop3Result("poplib", 0)
    messages: list[bytes] = []
    t0 = time.perf_counter()
    pop = poplib.POP3(host, port, timeout=60)
    pop.user(user)
    pop.pass_(password)
    result.login_seconds = time.perf_counter() - t0
    count, _ = pop.stat()
    result.listed = len(pop.list()[1])
    for i in range(1, count + 1):
        _, lines, _ = pop.retr(i)
        lines.append(b"")
        messages.append(b"\r\n".join(lines))
    pop.quit()
    result.seconds = time.perf_counter() - t0
    result.retrieved = len(messages)
    return result, messages


async def _retrieve_pipelined(
    host: str, port: int, user: str, password: str
) -> tuple[Pop3Result, list[bytes]]:
    result = Pop3Result("pipelined", 0)
    messages: list[bytes] = []
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)

    async def ok_line() -> bytes:
        line = await reader.readline()
        if not line.startswith(b"+OK"):
            raise RuntimeError(f"POP3 error: {line!r}")
        return line

    async def multiline() -> bytes:
        first = await reader.readline()
        if first == b".\r\n":
            return b""
        if first.startswith(b".."):
            first = first[1:]
        data = first + await reader.readuntil(b"\r\n.\r\n")
        return data[:-3].replace(b"\r\n..", b"\r\n.")

    await ok_line()
    # Authentication may complete asynchronously: only pipeline after it.
    writer.write(f"USER {user}\r\n".encode())
    await ok_line()
    writer.write(f"PASS {password}\r\n".encode())
    await ok_line()
    result.login_seconds = time.perf_counter() - t0
    writer.write(b"STAT\r\nLIST\r\n")
    count = int((await ok_line()).split()[1])
    await ok_line()
    result.listed = (await multiline()).count(b"\r\n")
    writer.write(b"".join(b"RETR %d\r\n" % i for i in range(1, count + 1)) + b"QUIT\r\n")
    for _ in range(count):
        await ok_line()
        messages.append(await multiline())
    await ok_line()
    writer.close()
    result.seconds = time.perf_counter() - t0
    result.retrieved = len(messages)
    return result, messages


def retrieve(
    client: str,
    host: str,
    port: int,
    user: str,
    password: str,
    expected: int,
    size: int,
    smtp_source: bool = False,
) -> Pop3Result:
    """Retrieve with ``client`` ("poplib" or "pipelined"), then verify."""
    try:
        if client == "poplib":
            result, messages = retrieve_poplib(host, port, user, password)
        else:
            result, messages = asyncio.run(
                asyncio.wait_for(_retrieve_pipelined(host, port, user, password), 120)
            )
    except Exception as exc:  # noqa: BLE001 - report, do not crash the run
        result = Pop3Result(client, expected, errors=[repr(exc)])
        return result
    result.expected = expected
    _verify(result, messages, size, smtp_source)
    if result.listed != expected or result.retrieved != expected:
        result.errors.insert(
            0, f"listed {result.listed}, retrieved {result.retrieved}, expected {expected}"
        )
    result.msgs_per_sec = result.retrieved / result.seconds if result.seconds else 0.0
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--user", default="alice@example.test")
    parser.add_argument("--password", default="secret")
    parser.add_argument("--expected", type=int, default=2000)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--client", choices=("poplib", "pipelined", "both"), default="both")
    parser.add_argument(
        "--smtp-source", action="store_true", help="the mail was sent by loadgen smtp-source"
    )
    args = parser.parse_args()
    clients = ("poplib", "pipelined") if args.client == "both" else (args.client,)
    results = [
        asdict(
            retrieve(
                c,
                args.host,
                args.port,
                args.user,
                args.password,
                args.expected,
                args.size,
                args.smtp_source,
            )
        )
        for c in clients
    ]
    json.dump(results, sys.stdout)
    sys.stdout.write("\n")
    return 0 if all(not r["errors"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
