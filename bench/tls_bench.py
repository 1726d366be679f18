"""What TLS costs twistmail: SMTP acceptance and IMAP FETCH, with and without TLS, in one run.

On one fresh server (self-signed certificate, TLS 1.3):

* SMTP: ``--messages`` of ``--size`` octets at 1 and 20 connections, plain and
  with STARTTLS on every connection (bench/loadgen.py), alternating order;
* IMAP: ``FETCH 1:* (BODY.PEEK[])`` of those messages, and
  ``UID FETCH 1:* (FLAGS)``, over the plain IMAP port and over IMAPS (TLS from
  the first byte), alternating, ``--repeat`` times.

Figures are messages (or fetches) per second and the TLS/plain ratio.

    python bench/tls_bench.py [--messages 2000] [--size 4096] [--repeat 3] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import shutil
import socket
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path

import servers
from servers import PASSWORD, free_port

ADDRESS = f"{servers.USER}@{servers.DOMAIN}"


def imapFetch(port: int, tls: bool, command: str) -> tuple[float, int]:
    """Seconds for one command's whole response, read to its tagged OK; and its size."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=600)
    if tls:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        raw = context.wrap_socket(raw, server_hostname="bench")
    reader = raw.makefile("rb")
    reader.readline()

    def command_(tag: bytes, text: str) -> int:
        raw.sendall(tag + b" " + text.encode() + b"\r\n")
        total = 0
        while True:
            line = reader.readline()
            total += len(line)
            if line.endswith(b"}\r\n"):
                size = int(line[line.rindex(b"{") + 1:-3])
                total += len(reader.read(size))
            elif line.startswith(tag + b" "):
                if not line.startswith(tag + b" OK"):
                    raise RuntimeError(line)
                return total

    command_(b"a", f'LOGIN "{ADDRESS}" "{PASSWORD}"')
    command_(b"b", "EXAMINE INBOX")
    started = time.perf_counter()
    size = command_(b"c", command)
    elapsed = time.perf_counter() - started
    command_(b"d", "LOGOUT")
    raw.close()
    return elapsed, size


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    top = Path(tempfile.mkdtemp(prefix="tls-bench-", dir=args.workdir))
    smtp: dict = {}
    imap: dict = {}
    try:
        server, _, ports = servers.twistmail_server(top, imaps=free_port())
        server.start()
        try:
            for rep in range(args.repeat):
                for conc in (1, 20):
                    for tls in ((False, True) if rep % 2 == 0 else (True, False)):
                        run = servers.smtp_load(ports["smtp"], args.messages, args.size, conc,
                                                *(["--starttls"] if tls else []))
                        smtp.setdefault((conc, tls), []).append(run["msgs_per_sec"])
                        print(f"[rep {rep + 1}] smtp conc {conc:>2} {'starttls' if tls else 'plain':8}"
                              f" {run['msgs_per_sec']:7.0f} msg/s", flush=True)
            for rep in range(args.repeat):
                for what in ("FETCH 1:* (BODY.PEEK[])", "UID FETCH 1:* (FLAGS)"):
                    for tls in ((False, True) if rep % 2 == 0 else (True, False)):
                        port = ports["imaps"] if tls else ports["imap"]
                        seconds, size = imapFetch(port, tls, what)
                        imap.setdefault((what, tls), []).append(seconds)
                        print(f"[rep {rep + 1}] imap {'imaps' if tls else 'plain':5} {what:25}"
                              f" {seconds:.3f}s ({size / 1e6:.1f} MB)", flush=True)
        finally:
            server.stop()
    finally:
        shutil.rmtree(top, ignore_errors=True)

    print(f"\nSMTP acceptance, {args.messages} x {args.size} B, median of {args.repeat}")
    print(f"{'conc':>4} {'plain msg/s':>12} {'STARTTLS msg/s':>15} {'TLS/plain':>10}")
    for conc in (1, 20):
        plain = statistics.median(smtp[(conc, False)])
        tls = statistics.median(smtp[(conc, True)])
        print(f"{conc:>4} {plain:12.0f} {tls:15.0f} {tls / plain:10.2f}")
    print(f"\nIMAP, {args.messages} messages, median seconds of {args.repeat}")
    print(f"{'command':25} {'plain s':>9} {'IMAPS s':>9} {'TLS/plain':>10}")
    for what in ("FETCH 1:* (BODY.PEEK[])", "UID FETCH 1:* (FLAGS)"):
        plain = statistics.median(imap[(what, False)])
        tls = statistics.median(imap[(what, True)])
        print(f"{what:25} {plain:9.3f} {tls:9.3f} {tls / plain:10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
