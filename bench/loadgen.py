"""SMTP load generator: N messages over C concurrent connections.

The default engine is a lean asyncio client: one EHLO per connection, then
MAIL/RCPT/DATA transactions back to back (MAIL+RCPT+DATA sent in one write
when the server advertises PIPELINING), every reply checked.  Connections
pull sequence numbers from a shared counter, so a fast connection simply
does more of the work.  The clock starts once all connections have finished
EHLO and stops at the last final reply: it measures message acceptance, not
TCP setup.

``--engine smtp-source`` runs Postfix's C generator instead (cheaper on CPU,
no pipelining); it aborts on the first unexpected reply, so its accepted
count is only known from the mailbox on disk.

Prints one JSON object on stdout (see ``LoadResult``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import json
import os
import resource
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

from message import RECIPIENT, SENDER, MessageFactory


@dataclass
class LoadResult:
    """Outcome of one load run; ``accepted`` counts final 250 replies."""

    engine: str
    messages: int
    size: int
    concurrency: int
    accepted: int = 0
    failed: int = 0
    seconds: float = 0.0
    msgs_per_sec: float = 0.0
    pipelining: bool = False
    latency_ms_p50: float | None = None
    latency_ms_p99: float | None = None
    client_cpu_seconds: float = 0.0
    errors: list[str] = field(default_factory=list)


class SMTPError(Exception):
    """A reply that breaks the session (not a per-message rejection)."""


async def _reply(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """Read one (possibly multi-line) reply; return code and full text."""
    lines = []
    while True:
        line = await reader.readline()
        if not line:
            raise SMTPError("connection closed by server")
        lines.append(line)
        if line[3:4] != b"-":
            break
    return int(line[:3]), b"".join(lines)


class _Worker:
    """One SMTP connection sending transactions until the counter runs out."""

    def __init__(
        self,
        host: str,
        port: int,
        factory: MessageFactory,
        counter: itertools.count,
        total: int,
        pipelining: str,
        result: LoadResult,
        latencies: list[float],
        starttls: bool = False,
        recipient: str = RECIPIENT,
        auth: str = "",
    ) -> None:
        self.host, self.port = host, port
        self.starttls = starttls
        self.auth = auth
        self.factory, self.counter, self.total = factory, counter, total
        self.mode = pipelining
        self.result, self.latencies = result, latencies
        self.envelope = (
            f"MAIL FROM:<{SENDER}> SIZE={factory.size}\r\n".encode(),
            f"RCPT TO:<{recipient}>\r\n".encode(),
            b"DATA\r\n",
        )

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        code, text = await _reply(self.reader)
        if code != 220:
            raise SMTPError(f"banner: {text!r}")
        self.writer.write(b"EHLO loadgen.client.test\r\n")
        code, text = await _reply(self.reader)
        if code != 250:
            raise SMTPError(f"EHLO: {text!r}")
        if self.starttls:
            # RFC 3207: STARTTLS, then EHLO again over TLS (no certificate check: a
            # benchmark of the server's cost, against its self-signed certificate).
            self.writer.write(b"STARTTLS\r\n")
            code, text = await _reply(self.reader)
            if code != 220:
                raise SMTPError(f"STARTTLS: {text!r}")
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            await self.writer.start_tls(context)
            self.writer.write(b"EHLO loadgen.client.test\r\n")
            code, text = await _reply(self.reader)
            if code != 250:
                raise SMTPError(f"EHLO after STARTTLS: {text!r}")
        if self.auth:
            # RFC 4954 AUTH PLAIN (RFC 4616) with the initial response.
            user, _, password = self.auth.partition(":")
            token = base64.b64encode(f"\0{user}\0{password}".encode())
            self.writer.write(b"AUTH PLAIN " + token + b"\r\n")
            code, authText = await _reply(self.reader)
            if code != 235:
                raise SMTPError(f"AUTH: {authText!r}")
        advertised = b"\nPIPELINING" in text.upper().replace(b"250-", b"\n").replace(b"250 ", b"\n")
        self.pipelined = self.mode == "on" or (self.mode == "auto" and advertised)
        self.result.pipelining = self.pipelined

    async def run(self, start: asyncio.Event) -> None:
        await start.wait()
        reader, writer = self.reader, self.writer
        mail, rcpt, data = self.envelope
        clock = time.perf_counter
        for seq in self.counter:
            if seq >= self.total:
                break
            t0 = clock()
            replies: list[tuple[int, bytes]] = []
            if self.pipelined:
                writer.write(mail + rcpt + data)
                replies = [await _reply(reader) for _ in range(3)]
            else:
                for command, want in ((mail, 250), (rcpt, 250), (data, 354)):
                    writer.write(command)
                    replies.append(await _reply(reader))
                    if replies[-1][0] != want:
                        break
            codes = [code for code, _ in replies]
            text = b" | ".join(t.strip() for c, t in replies if c >= 400)
            ok = codes[:2] == [250, 250]
            if codes[-1] == 354 and len(codes) == 3:
                if ok:
                    writer.writelines((self.factory.head(seq), self.factory.body, b".\r\n"))
                else:  # DATA accepted despite a rejected envelope: abort it.
                    writer.write(b".\r\n")
                code, text = await _reply(reader)
                ok = ok and code == 250
            else:
                ok = False
            if ok:
                self.result.accepted += 1
                self.latencies.append(clock() - t0)
            else:
                self.result.failed += 1
                if len(self.result.errors) < 10:
                    self.result.errors.append(f"seq {seq}: {codes} {text[:160]!r}")
                writer.write(b"RSET\r\n")
                await _reply(reader)
        writer.write(b"QUIT\r\n")
        try:
            await _reply(reader)
        except (SMTPError, ConnectionError):
            pass
        writer.close()


async def run_asyncio(
    host: str,
    port: int,
    messages: int,
    size: int,
    concurrency: int,
    pipelining: str = "auto",
    starttls: bool = False,
    prefix: bytes = b"",
    recipients: tuple[str, ...] = (RECIPIENT,),
    auth: str = "",
) -> LoadResult:
    """Send ``messages`` over ``concurrency`` connections and time them; connection i
    sends to ``recipients[i % len(recipients)]``."""
    result = LoadResult("asyncio", messages, size, concurrency)
    factory = MessageFactory(size, prefix)
    counter = itertools.count()
    latencies: list[float] = []
    workers = [
        _Worker(host, port, factory, counter, messages, pipelining, result, latencies, starttls,
                recipients[i % len(recipients)], auth)
        for i in range(concurrency)
    ]
    await asyncio.gather(*(w.connect() for w in workers))
    start = asyncio.Event()
    tasks = [asyncio.ensure_future(w.run(start)) for w in workers]
    t0 = time.perf_counter()
    start.set()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    result.seconds = time.perf_counter() - t0
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            result.errors.append(f"connection failed: {outcome!r}")
    # Messages never attempted because their connection died count as failed.
    result.failed = messages - result.accepted
    if latencies:
        latencies.sort()
        result.latency_ms_p50 = statistics.median(latencies) * 1000
        result.latency_ms_p99 = latencies[int(len(latencies) * 0.99) - 1] * 1000
    return result


def run_smtp_source(host: str, port: int, messages: int, size: int, concurrency: int) -> LoadResult:
    """Drive Postfix's ``smtp-source`` with the same message content."""
    binary = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
    if not os.path.exists(binary):
        raise SystemExit("smtp-source not found (apt-get install postfix)")
    result = LoadResult("smtp-source", messages, size, concurrency)
    factory = MessageFactory(size)
    with tempfile.NamedTemporaryFile("wb", suffix=".eml") as tmp:
        # smtp-source appends CRLF to each LF-terminated line of -F file.
        tmp.write(factory.render(0).replace(b"\r\n", b"\n"))
        tmp.flush()
        argv = [
            binary, "-d", "-s", str(concurrency), "-m", str(messages),
            "-F", tmp.name, "-f", SENDER, "-t", RECIPIENT,
            "-M", "loadgen.client.test", f"{host}:{port}",
        ]  # fmt: skip
        t0 = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, text=True)
        result.seconds = time.perf_counter() - t0
    if proc.returncode != 0 or proc.stderr.strip():
        result.errors.append(f"smtp-source rc={proc.returncode}: {proc.stderr[-500:]}")
    else:
        result.accepted = messages  # aborts on any unexpected reply otherwise
    result.failed = messages - result.accepted
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--engine", choices=("asyncio", "smtp-source"), default="asyncio")
    parser.add_argument(
        "--pipelining",
        choices=("auto", "on", "off"),
        default="auto",
        help="auto: pipeline MAIL+RCPT+DATA only if PIPELINING is advertised",
    )
    parser.add_argument("--starttls", action="store_true", help="STARTTLS on every connection")
    parser.add_argument("--prefix-file", type=argparse.FileType("rb"), default=None,
                        help="header lines (CRLF) put first in every message, e.g. a "
                             "DKIM-Signature (asyncio engine)")
    parser.add_argument("--rcpt", action="append", default=None,
                        help="recipient (repeatable: connection i sends to the i-th, "
                             f"round robin; asyncio engine); default {RECIPIENT}")
    parser.add_argument("--auth", default="", metavar="USER:PASSWORD",
                        help="AUTH PLAIN on every connection, e.g. on the submission port "
                             f"(MAIL FROM stays {SENDER}; asyncio engine)")
    args = parser.parse_args(argv)
    prefix = args.prefix_file.read() if args.prefix_file else b""
    before = resource.getrusage(resource.RUSAGE_SELF)
    if args.engine == "asyncio":
        result = asyncio.run(
            run_asyncio(
                args.host, args.port, args.messages, args.size,
                args.concurrency, args.pipelining, args.starttls, prefix,
                tuple(args.rcpt or (RECIPIENT,)), args.auth,
            )
        )  # fmt: skip
        after = resource.getrusage(resource.RUSAGE_SELF)
    else:
        result = run_smtp_source(args.host, args.port, args.messages, args.size, args.concurrency)
        before = resource.struct_rusage((0.0,) * 16)  # no child ran before
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result.client_cpu_seconds = (after.ru_utime + after.ru_stime) - (
        before.ru_utime + before.ru_stime
    )
    result.msgs_per_sec = result.accepted / result.seconds if result.seconds else 0.0
    json.dump(asdict(result), sys.stdout)
    sys.stdout.write("\n")
    return 0 if result.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
