"""QRESYNC resync of a big folder after 1,000 flag changes (issue 12 §4), twistmail alone.

A client selected the folder (``--size`` messages, 100,000 by default) and
remembered UIDVALIDITY and HIGHESTMODSEQ; another client then changes the
flags of ``--changes`` (1,000) random messages and expunges ``--expunges``
(10) of them.  Measured, from a new connection with QRESYNC enabled:

* ``qresync select``: ``SELECT INBOX (QRESYNC (uidvalidity modseq))``, answers read
  in full (VANISHED (EARLIER) and a FETCH per changed message);
* ``changedsince fetch``: ``UID FETCH 1:* (FLAGS) (CHANGEDSINCE modseq VANISHED)``;
* ``plain select``: ``SELECT INBOX`` on the same folder, for comparison.

Each is the best of ``--repeat`` (5) runs against the real ``twistd -n twistmail``.

    python bench/qresync_bench.py [--size 100000] [--changes 1000] [--expunges 10]
                                  [--repeat 5] [--workdir DIR] [--json out.json]

The ratio to Dovecot (issue 12 §4) is bench/imap_bench.py's business.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import sys
import tempfile
from pathlib import Path

from imap_bench import Client, Twistmail, linkCopy, populate

TARGET = 0.1  # seconds: issue 12 §4, "a QRESYNC resync after 1,000 flag changes"


def run(work: Path, size: int, changes: int, expunges: int, repeat: int,
        sources: Path | None = None) -> dict:
    server = Twistmail(work)
    if sources is None:
        populate(server.maildir, size)
    else:  # generated once, as imap_bench.py --sources does, and hard-linked
        source = sources / f"source-{size}"
        if not (source / "cur").is_dir():
            populate(source, size)
        server.maildir.parent.mkdir(parents=True, exist_ok=True)
        linkCopy(source, server.maildir)
    server.start()
    try:
        first = Client(server.port)
        first.login()
        _, data = first.command("SELECT INBOX (CONDSTORE)")  # indexes the folder
        validity = int(re.search(rb"UIDVALIDITY (\d+)", data).group(1))
        mark = int(re.search(rb"HIGHESTMODSEQ (\d+)", data).group(1))
        first.close()
        rng = random.Random(7)
        uids = rng.sample(range(1, size + 1), changes)
        writer = Client(server.port)
        writer.login()
        writer.command("SELECT INBOX")
        for uid in uids:
            writer.command(f"UID STORE {uid} +FLAGS.SILENT (\\Flagged)")
        gone = uids[:expunges]
        writer.command(f"UID STORE {','.join(map(str, gone))} +FLAGS.SILENT (\\Deleted)")
        writer.command(f"UID EXPUNGE {','.join(map(str, gone))}")
        writer.close()
        timings: dict[str, list[float]] = {"qresync_select": [], "changedsince_fetch": [],
                                           "plain_select": []}
        answer = b""
        for _ in range(repeat):
            client = Client(server.port)
            client.login()
            client.command("ENABLE QRESYNC")
            elapsed, answer = client.command(f"SELECT INBOX (QRESYNC ({validity} {mark}))")
            timings["qresync_select"].append(elapsed)
            elapsed, _ = client.command(f"UID FETCH 1:* (FLAGS) (CHANGEDSINCE {mark} VANISHED)")
            timings["changedsince_fetch"].append(elapsed)
            elapsed, _ = client.command("SELECT INBOX")
            timings["plain_select"].append(elapsed)
            client.close()
        fetches = answer.count(b" FETCH (")
        if fetches != changes - expunges or b"VANISHED (EARLIER)" not in answer:
            raise RuntimeError(f"unexpected resync: {fetches} FETCH responses")
        return {"size": size, "changes": changes, "expunges": expunges,
                **{name: min(values) for name, values in timings.items()}}
    finally:
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=100_000)
    parser.add_argument("--changes", type=int, default=1000)
    parser.add_argument("--expunges", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--workdir")
    parser.add_argument("--json")
    parser.add_argument("--sources", type=Path, default=None,
                        help="keep the generated Maildir here and reuse it in later runs")
    options = parser.parse_args()
    work = Path(options.workdir or tempfile.mkdtemp(prefix="qresync-bench-"))
    try:
        result = run(work, options.size, options.changes, options.expunges, options.repeat,
                     options.sources)
    finally:
        if not options.workdir:
            shutil.rmtree(work, ignore_errors=True)
    for name in ("qresync_select", "changedsince_fetch", "plain_select"):
        print(f"{name:20} {result[name] * 1000:8.1f} ms")
    verdict = "ok" if result["qresync_select"] <= TARGET else "over"
    print(f"target: QRESYNC resync <= {TARGET * 1000:.0f} ms at {result['size']} messages: {verdict}")
    if options.json:
        Path(options.json).write_text(json.dumps(result, indent=2))
    return 0 if verdict == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
