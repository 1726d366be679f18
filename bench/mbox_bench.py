"""mbox beside Maildir: delivery into a big INBOX, and IMAP on it.

* ``delivery``: ``--messages`` SMTP messages of 4 KiB (bench/loadgen.py, at
  each ``--concurrency``) into an INBOX that is empty, then into one that
  already holds ``--prefill`` (20,000) messages, for each backend.  An mbox
  append must cost O(message): the two rates should be about equal.
* ``imap``: on a ``--prefill``-message INBOX, the first SELECT (no index
  yet), SELECT after a restart (index on disk), SELECT again (warm), and
  ``UID FETCH 1:* (FLAGS)``, for each backend (bench/imap_bench.py's client).

Both backends get the same messages (bench/imap_bench.py's ``populate``; the
mbox is made from that Maildir with twistmail's own writer).  Repetitions
alternate the backends; medians are reported, with the ratios.

    python bench/mbox_bench.py [--prefill 20000] [--messages 2000] [--concurrency 1,20]
                               [--repeat 3] [--workdir DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from imap_bench import Twistmail, measureSize, populate
from servers import BENCH_DIR, DOMAIN, PYTHON, USER, free_port

BACKENDS = ("maildir", "mbox")


def toMbox(maildir: Path, mbox: Path) -> None:
    """The Maildir's messages, in delivery order and with their flags, as one mbox file."""
    from twistmail.storage._mboxio import Outgoing, writeMessages

    letters = {"S": "\\Seen", "R": "\\Answered", "F": "\\Flagged", "T": "\\Deleted", "D": "\\Draft"}
    outs = []
    for name in sorted(os.listdir(maildir / "cur"), key=lambda n: int(n.split(".")[0])):
        path = maildir / "cur" / name
        flags = frozenset(letters[c] for c in name.split(":2,")[1] if c in letters)
        outs.append(Outgoing(lambda path=path: [path.read_bytes()], flags,
                             path.stat().st_mtime, name.split(",")[0]))
    mbox.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(mbox, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        writeMessages(fd, outs)
    finally:
        os.close(fd)


class Server(Twistmail):
    """imap_bench's twistmail, on a given backend, with the SMTP port known."""

    def __init__(self, work: Path, backend: str) -> None:
        super().__init__(work)
        self.name = backend
        self.backend = backend
        self.smtpPort = free_port()
        self.config.write_text(self.config.read_text().replace(
            "smtp = []", f'smtp = ["tcp:{self.smtpPort}:interface=127.0.0.1"]'))
        with self.config.open("a") as f:
            f.write(f'[storage]\nbackend = "{backend}"\n')

    def prefill(self, source: Path | None) -> None:
        if source is None:
            return
        if self.backend == "maildir":
            self.maildir.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(["cp", "-al", str(source), str(self.maildir)], check=True)
        else:
            self.mboxPath.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, self.mboxPath)

    @property
    def mboxPath(self) -> Path:
        return self.data / "mbox" / DOMAIN / USER / "INBOX"

    def count(self) -> int:
        if self.backend == "maildir":
            return sum(len(os.listdir(self.maildir / s)) for s in ("new", "cur"))
        from twistmail.storage import _mboxformat

        data = self.mboxPath.read_bytes()
        return len(_mboxformat.messageStarts(data))


def deliveryRun(top: Path, backend: str, source: Path | None, prefill: int, messages: int,
                concurrency: int, run: int) -> dict:
    server = Server(top / f"deliver-{backend}-{prefill}-{concurrency}-{run}", backend)
    server.prefill(source)
    server.start()
    try:
        out = subprocess.run([PYTHON, str(BENCH_DIR / "loadgen.py"), "--port", str(server.smtpPort),
                              "--messages", str(messages), "--concurrency", str(concurrency)],
                             capture_output=True, text=True, timeout=1800)
        if out.returncode != 0:
            raise RuntimeError(f"loadgen failed: {out.stdout[-500:]} {out.stderr[-500:]}")
        result = json.loads(out.stdout)
    finally:
        server.stop()
    stored = server.count()
    if stored != prefill + messages:
        raise RuntimeError(f"{backend}: {stored} messages stored, expected {prefill + messages}")
    return {"backend": backend, "prefill": prefill, "concurrency": concurrency,
            "msgs_per_sec": result["msgs_per_sec"]}


def median(rows: list[dict], key: str, **where) -> float:
    return statistics.median(r[key] for r in rows
                             if all(r[k] == v for k, v in where.items()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefill", type=int, default=20000)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--concurrency", default="1,20")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    top = Path(tempfile.mkdtemp(prefix="mbox-bench-", dir=args.workdir))
    results: dict = {"delivery": [], "imap": []}
    try:
        started = time.perf_counter()
        maildirSource = top / "source-maildir"
        populate(maildirSource, args.prefill)
        mboxSource = top / "source.mbox"
        toMbox(maildirSource, mboxSource)
        print(f"[{args.prefill} messages written in {time.perf_counter() - started:.1f}s]",
              flush=True)
        sources = {"maildir": maildirSource, "mbox": mboxSource}

        for run in range(args.repeat):
            order = BACKENDS if run % 2 == 0 else BACKENDS[::-1]
            for concurrency in concurrencies:
                for backend in order:
                    for prefill in (0, args.prefill):
                        row = deliveryRun(top, backend, sources[backend] if prefill else None,
                                          prefill, args.messages, concurrency, run)
                        results["delivery"].append(row)
                        print(f"  deliver {backend:7} into {prefill:>6} at {concurrency:>2} "
                              f"connections: {row['msgs_per_sec']:7.1f} msg/s", flush=True)
            for backend in order:
                server = Server(top / f"imap-{backend}-{run}", backend)
                server.prefill(sources[backend])
                row = measureSize(server, args.prefill, random.Random(run))
                row["backend"] = backend
                results["imap"].append(row)
                print(f"  imap {backend:7} select first {row['select_first']:.3f}s  restart "
                      f"{row['select_restart']:.3f}s  warm {row['select_warm']:.3f}s  fetch flags "
                      f"{row['fetch_flags']:.3f}s (warm {row['fetch_flags_warm']:.3f}s)",
                      flush=True)
    finally:
        shutil.rmtree(top, ignore_errors=True)
    report(results, args, concurrencies)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def report(results: dict, args, concurrencies: list[int]) -> None:
    rows = results["delivery"]
    print(f"\ndelivery, msg/s (median of {args.repeat}); ratio = into {args.prefill} / into empty")
    for concurrency in concurrencies:
        for backend in BACKENDS:
            empty = median(rows, "msgs_per_sec", backend=backend, prefill=0,
                           concurrency=concurrency)
            full = median(rows, "msgs_per_sec", backend=backend, prefill=args.prefill,
                          concurrency=concurrency)
            print(f"  {backend:7} {concurrency:>2} conn: empty {empty:7.1f}  "
                  f"{args.prefill} {full:7.1f}  ratio {full / empty:.2f}")
        ratio = (median(rows, "msgs_per_sec", backend="mbox", prefill=args.prefill,
                        concurrency=concurrency)
                 / median(rows, "msgs_per_sec", backend="maildir", prefill=args.prefill,
                          concurrency=concurrency))
        print(f"  mbox / maildir into {args.prefill} at {concurrency} conn: {ratio:.2f}")
    imap = results["imap"]
    print(f"\nIMAP on {args.prefill} messages, seconds (median of {args.repeat}); "
          "ratio = mbox / maildir")
    for metric in ("select_first", "select_restart", "select_warm", "fetch_flags",
                   "fetch_flags_warm"):
        values = {b: median(imap, metric, backend=b) for b in BACKENDS}
        print(f"  {metric:16} maildir {values['maildir']:.3f}  mbox {values['mbox']:.3f}  "
              f"ratio {values['mbox'] / values['maildir']:.2f}")


if __name__ == "__main__":
    sys.exit(main())
