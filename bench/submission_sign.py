"""What DKIM signing costs submission: authenticated SMTP with dkim-sign on vs off.

One run, one machine, everything on 127.0.0.1: two twistmail servers on fresh
data directories with ``bench@client.test`` (bench/message.py's sender) as an
account, one with ``[filters] submission = ["dkim-sign"]`` and keys made by
``twistmail dkim generate client.test`` (an Ed25519 and an RSA-2048
signature on every message, RFC 8463), one with ``submission = []``.
bench/loadgen.py logs in on the submission port (AUTH PLAIN; loopback, so
no TLS is needed) and sends ``--messages`` of ``--size`` octets over
``--concurrency`` connections to alice@example.test, alternating which
server goes first, ``--repeat`` times.  A signing run whose stored message
lacks the two signatures stops the benchmark.

    python bench/submission_sign.py [--messages 2000] [--size 4096] [--concurrency 20]
                                    [--repeat 3] [--workdir DIR]
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import servers
from message import SENDER

PASSWORD = "secret"


def signingServer(workdir: Path, sign: bool) -> tuple[servers.Server, Path]:
    port = servers.free_port()
    server, maildir, _ = servers.twistmail_server(workdir, submission=port)
    data = workdir / "data"
    domain = SENDER.split("@")[1]
    servers._twistmail_cli(data, "domain", "add", domain)
    servers._twistmail_cli(data, "user", "add", SENDER, stdin=f"{PASSWORD}\n".encode())
    if sign:
        servers._twistmail_cli(data, "dkim", "generate", domain)
    config = workdir / "twistmail.toml"
    filters = json.dumps(["dkim-sign"] if sign else [])
    config.write_text(config.read_text() + f"[filters]\nsubmission = {filters}\n"
                      # The per-user hourly limits (100 messages, 500 recipients) off.
                      "[submission]\nmax_messages_per_hour = 0\nmax_recipients_per_hour = 0\n"
                      "domain_max_messages_per_hour = 0\n")
    server.port = port  # loadgen and the readiness check use the submission port
    return server, maildir


def signatures(maildir: Path) -> int:
    for path in (maildir / "new").iterdir():
        head = path.read_bytes().split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
        return head.lower().count(b"\ndkim-signature:") + head.lower().startswith(b"dkim-signature:")
    return 0


def main() -> int:
    args = servers.on_off_parser(__doc__).parse_args()
    top = Path(tempfile.mkdtemp(prefix="sign-bench-", dir=args.workdir))
    rates: dict[str, list[float]] = {"on": [], "off": []}
    cpu: dict[str, list[float]] = {"on": [], "off": []}
    try:
        for rep, mode in servers.on_off_modes(args.repeat):
            workdir = top / f"{mode}-{rep}"
            workdir.mkdir()
            server, maildir = signingServer(workdir, mode == "on")
            server.start()
            try:
                servers.smtp_load(server.port, 20, args.size, 2, "--auth",
                                  f"{SENDER}:{PASSWORD}")  # starts the signing process
                before = sum(server.cpu())
                run = servers.smtp_load(server.port, args.messages, args.size,
                                        args.concurrency, "--auth", f"{SENDER}:{PASSWORD}")
                cpu[mode].append((sum(server.cpu()) - before) / args.messages * 1000)
            finally:
                server.stop()
            found = signatures(maildir)
            if found != (2 if mode == "on" else 0):
                raise SystemExit(f"signing {mode}: a stored message has {found} signatures")
            rates[mode].append(run["msgs_per_sec"])
            print(f"[rep {rep + 1}] signing {mode:3} {run['msgs_per_sec']:7.0f} msg/s "
                  f"{cpu[mode][-1]:5.2f} ms server CPU/msg", flush=True)
    finally:
        shutil.rmtree(top, ignore_errors=True)
    servers.print_on_off(f"Submission, {args.messages} x {args.size} B at {args.concurrency} "
                         "connections", "signing off", "dkim-sign on", rates)
    cpuOn, cpuOff = statistics.median(cpu["on"]), statistics.median(cpu["off"])
    print(f"server CPU per message: off {cpuOff:.2f} ms, on {cpuOn:.2f} ms (off/on "
          f"{cpuOff / cpuOn:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
