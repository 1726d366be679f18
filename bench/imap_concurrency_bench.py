"""Many IMAP clients on one folder: twistmail beside Dovecot (when installed), in one run.

``--clients`` (10) connections loop for ``--seconds`` (30) on one INBOX of
``--messages`` (200), each loop being::

    LOGIN, SELECT INBOX, UID FETCH 1:* (FLAGS), UID FETCH <random> (BODY.PEEK[]),
    UID STORE <own> +FLAGS (\\Deleted), UID EXPUNGE <own>, APPEND, LOGOUT

where ``<own>`` is the message this client appended in its previous loop
(its APPENDUID), so the folder stays at its size and no two clients expunge
the same message.  Reported: tagged commands completed per second, and the
commands that did not end in ``OK`` (target: none).  Issue 12 §4's target is
twistmail at 60% or more of Dovecot's commands per second.

    python bench/imap_concurrency_bench.py [--clients 10] [--seconds 30]
                                           [--messages 200] [--repeat 1]
                                           [--dovecot auto|off] [--workdir DIR]

The servers are the ones of ``imap_bench.py``.  Every loop logs in, so the
password check is a large part of the work: by default (``--dovecot-password
argon2id``) Dovecot gets the same argon2id hash, with the same parameters,
that twistmail stores (made by twistmail's own hasher), so both do the same
work; ``--dovecot-password plain`` gives it the plain password instead, as
``imap_bench.py`` does.  With ``--repeat`` the two alternate, and the ratio
is given per back-to-back pair.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

from imap_bench import ADDRESS, PASSWORD, Dovecot, Twistmail, linkCopy, populate, prepare

TARGET_RATIO = 0.6
_APPENDUID = re.compile(rb"\[APPENDUID \d+ (\d+)\]")
MESSAGE = (f"From: Bench <b@example.net>\r\nTo: {ADDRESS}\r\nSubject: concurrency\r\n"
           "Date: Mon, 1 Jan 2024 10:00:00 +0000\r\n\r\n" + "text line of the body\r\n" * 40).encode()


class Session:
    """A minimal asyncio IMAP client: one command at a time, tagged reply awaited."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.n = 0

    async def command(self, text: bytes, literal: bytes | None = None) -> tuple[bool, bytes]:
        self.n += 1
        tag = b"c%d " % self.n
        if literal is None:
            self.writer.write(tag + text + b"\r\n")
        else:
            self.writer.write(tag + text + b" {%d}\r\n" % len(literal))
            while not (await self._line()).startswith(b"+"):
                pass
            self.writer.write(literal + b"\r\n")
        while True:
            line = await self._line()
            if line.startswith(tag):
                return line[len(tag):].startswith(b"OK"), line
            literalSize = re.search(rb"\{(\d+)\}\r\n$", line)
            if literalSize:
                await self.reader.readexactly(int(literalSize.group(1)))

    async def _line(self) -> bytes:
        line = await self.reader.readline()
        if not line:
            raise ConnectionError("connection closed")
        return line


async def client(port: int, size: int, deadline: float, counts: dict, rng: random.Random) -> None:
    own: int | None = None
    while time.monotonic() < deadline:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await reader.readline()
        session = Session(reader, writer)
        commands = [b'LOGIN "%s" "%s"' % (ADDRESS.encode(), PASSWORD.encode()), b"SELECT INBOX",
                    b"UID FETCH 1:* (FLAGS)", b"UID FETCH %d (BODY.PEEK[])" % rng.randint(1, size)]
        if own is not None:
            commands += [b"UID STORE %d +FLAGS (\\Deleted)" % own, b"UID EXPUNGE %d" % own]
        for text in commands:
            ok, line = await session.command(text)
            counts["ok" if ok else "failed"] += 1
            if not ok:
                counts["errors"].append(line[:200])
        ok, line = await session.command(b"APPEND INBOX ()", MESSAGE)
        counts["ok" if ok else "failed"] += 1
        match = _APPENDUID.search(line)
        own = int(match.group(1)) if ok and match else None
        ok, _ = await session.command(b"LOGOUT")
        counts["ok" if ok else "failed"] += 1
        writer.close()
        await writer.wait_closed()


async def load(port: int, clients: int, seconds: float, size: int) -> dict:
    counts: dict = {"ok": 0, "failed": 0, "errors": []}
    started = time.monotonic()
    deadline = started + seconds
    await asyncio.gather(*(client(port, size, deadline, counts, random.Random(i))
                           for i in range(clients)))
    elapsed = time.monotonic() - started
    return {"commands": counts["ok"], "failed": counts["failed"], "seconds": elapsed,
            "per_second": counts["ok"] / elapsed, "errors": counts["errors"][:5]}


def measure(kind, work: Path, source: Path, args) -> dict:
    if kind is Dovecot and args.dovecot_password == "argon2id":
        from twistmail.auth.passwords import hashPassword

        server = Dovecot(work, "{ARGON2ID}" + hashPassword(PASSWORD))
    else:
        server = kind(work)
    server.maildir.parent.mkdir(parents=True, exist_ok=True)
    linkCopy(source, server.maildir)
    server.start()
    try:
        result = asyncio.run(load(server.port, args.clients, args.seconds, args.messages))
    finally:
        server.stop()
    result["server"] = server.name
    print(f"  {server.name:9} {result['per_second']:8.1f} commands/s  {result['commands']} ok, "
          f"{result['failed']} failed {result['errors'] or ''}", flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--dovecot", choices=("auto", "off"), default="auto")
    parser.add_argument("--dovecot-password", choices=("argon2id", "plain"), default="argon2id")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    useDovecot, top = prepare(args.dovecot, "imap-concurrency-", args.workdir)
    source = top / "source"
    populate(source, args.messages)
    failed = 0
    ratios = []
    try:
        for run in range(args.repeat):
            kinds = [Twistmail] + ([Dovecot] if useDovecot else [])
            if run % 2:
                kinds.reverse()
            rows = {kind.name: measure(kind, top / f"{kind.name}-{run}", source, args)
                    for kind in kinds}
            failed += sum(r["failed"] for r in rows.values())
            if "dovecot" in rows:
                ratios.append(rows["twistmail"]["per_second"] / rows["dovecot"]["per_second"])
                print(f"  ratio twistmail/dovecot {ratios[-1]:.2f}", flush=True)
    finally:
        shutil.rmtree(top, ignore_errors=True)
    if ratios:
        verdict = "met" if statistics.median(ratios) >= TARGET_RATIO else "NOT met"
        print(f"median ratio {statistics.median(ratios):.2f} (range {min(ratios):.2f}-"
              f"{max(ratios):.2f}); target >= {TARGET_RATIO}: {verdict}")
    print(f"failed commands: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
