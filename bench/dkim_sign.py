"""DKIM signing cost: messages signed per second (Ed25519 + RSA-2048 together), one core.

Not part of the test suite.  ``python bench/dkim_sign.py [--count N]`` prints, for
4 KiB and 1 MiB messages, what one worker thread signs per second; compare with bench/run.py's acceptance rate
to see what signing costs submission.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from twistmail import dkimkeys
from twistmail.dkimkeys import KeyRing
from twistmail.dkimsigner import Signer


def message(size: int) -> bytes:
    head = (b"From: Alice <alice@example.test>\r\nTo: bob@remote.test\r\nSubject: bench\r\n"
            b"Date: Fri, 04 Dec 2026 08:00:00 +0000\r\nMessage-ID: <b@example.test>\r\n\r\n")
    line = b"x" * 76 + b"\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=200)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as data:
        dkimkeys.generate(data, "example.test", "bench")
        signer = Signer(KeyRing(data))
        for size in (4096, 1 << 20):
            data_ = message(size)
            count = args.count if size < 100000 else max(10, args.count // 20)
            start, cpu = time.perf_counter(), time.process_time()
            for _ in range(count):
                assert signer.sign(data_) != data_
            elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
            # CPU time too: on a shared machine it is the steadier figure.
            print(f"{size:>8} B: {count / elapsed:8.1f} messages/s signed "
                  f"({1000 * elapsed / count:.2f} ms each, {1000 * cpu / count:.2f} ms CPU, "
                  "both signatures)")


if __name__ == "__main__":
    main()
