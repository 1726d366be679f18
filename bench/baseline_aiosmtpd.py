"""Durable baseline: aiosmtpd delivering each message to a Maildir.

This is what a careful aiosmtpd user writes: the ``handle_DATA`` hook
writes the message to ``tmp/``, fsyncs it, renames it into ``new/`` and
fsyncs ``new/`` before returning ``250`` -- so, as with twistmail, a 250
means the message survives a power cut.  The disk work happens inline in
the handler (blocking the event loop), which is the straightforward way;
``--fsync-in-thread`` moves it to the default executor instead, for
comparison.

Run: ``python bench/baseline_aiosmtpd.py --port 2525 --maildir /tmp/md``;
SIGTERM or SIGINT stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session


class DurableMaildirHandler:
    """aiosmtpd handler: fsynced Maildir delivery before replying 250."""

    def __init__(self, root: Path, in_thread: bool = False) -> None:
        self.root = root
        self.in_thread = in_thread
        for sub in ("tmp", "new", "cur"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        self._seq = itertools.count()
        self._host = socket.gethostname().replace("/", "\\057").replace(":", "\\072")

    def _deliver(self, data: bytes) -> str:
        now = time.time()
        name = f"{int(now)}.M{int(now % 1 * 1e6)}P{os.getpid()}Q{next(self._seq)}.{self._host}"
        tmp = self.root / "tmp" / name
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, self.root / "new" / name)
        dirfd = os.open(self.root / "new", os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)
        return name

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        # Maildir files use LF line endings, with the envelope sender recorded.
        data = b"Return-Path: <%s>\n" % (envelope.mail_from or "").encode()
        data += content.replace(b"\r\n", b"\n")
        if self.in_thread:
            name = await asyncio.get_running_loop().run_in_executor(None, self._deliver, data)
        else:
            name = self._deliver(data)
        return f"250 2.0.0 Ok: delivered as {name}"


async def serve(host: str, port: int, maildir: Path, in_thread: bool) -> None:
    """Serve until SIGTERM/SIGINT."""
    handler = DurableMaildirHandler(maildir, in_thread)
    loop = asyncio.get_running_loop()

    def factory() -> Any:
        return SMTP(handler, hostname="baseline.test")

    server = await loop.create_server(factory, host, port)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()
    await server.wait_closed()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--maildir", type=Path, required=True)
    parser.add_argument("--fsync-in-thread", action="store_true")
    args = parser.parse_args()
    asyncio.run(serve(args.host, args.port, args.maildir, args.fsync_in_thread))


if __name__ == "__main__":
    main()
