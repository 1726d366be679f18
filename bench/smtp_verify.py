"""What inbound verification costs: SMTP acceptance with SPF + DKIM + DMARC on vs all filters off.

One run, one machine, everything on 127.0.0.1:

* a DNS server (``twistd dns --pyzone``, Twisted's own) serving ``client.test``:
  SPF for 127.0.0.1 (MAIL FROM and the HELO name), an RSA-2048 and an Ed25519
  DKIM key (RFC 8463), and ``_dmarc.client.test`` with ``p=reject``;
* two twistmail servers on fresh data directories, both using that DNS server
  (``[relay] nameservers``): one with ``[filters] inbound = ["spf-dkim-dmarc"]``,
  one with ``[filters] inbound = []``;
* bench/loadgen.py sends ``--messages`` of ``--size`` octets over ``--concurrency``
  connections (20) to each, alternating which goes first, ``--repeat`` times.
  Every message carries two DKIM signatures (RSA and Ed25519) made once with
  dkimpy: they sign From, To, Date and the body, which all messages share, so
  every message verifies (dkim=pass, spf=pass, dmarc=pass).

The figure is verification-on msg/s over filters-off msg/s (the issue's target:
at least 0.67, verification costing at most a third); the server's CPU time per
message, on and off, is printed too: on a shared machine it is the steadier one.  A verification run whose
stored message lacks spf=pass, dkim=pass and dmarc=pass stops the benchmark.

    python bench/smtp_verify.py [--messages 2000] [--size 4096] [--concurrency 20]
                                [--repeat 3] [--workdir DIR]
"""

from __future__ import annotations

import base64
import email.parser
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import dkim
import nacl.signing
import servers
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from message import MessageFactory
from servers import HOST, TWISTD, Server, free_port

DOMAIN = "client.test"  # bench/message.py's sender domain
HELO = "loadgen.client.test"  # bench/loadgen.py's EHLO name


def keys() -> tuple[bytes, str, bytes, str]:
    """(RSA private PEM, its p=, Ed25519 private seed base64, its p=)."""
    private = rsa.generate_private_key(65537, 2048)
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    rsaP = base64.b64encode(private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).decode()
    ed = nacl.signing.SigningKey.generate()
    return pem, rsaP, base64.b64encode(bytes(ed)), base64.b64encode(bytes(ed.verify_key)).decode()


def signatures(size: int, rsaPem: bytes, edSeed: bytes) -> bytes:
    """Two DKIM-Signature fields valid for every bench message of C{size} octets."""
    raw = MessageFactory(size).render(0)
    signed = [b"from", b"to", b"date", b"mime-version", b"content-type"]
    prefix = b""
    for selector, key, algorithm in ((b"rsa", rsaPem, b"rsa-sha256"),
                                     (b"ed", edSeed, b"ed25519-sha256")):
        prefix = dkim.sign(prefix + raw, selector, DOMAIN.encode(), key,
                           signature_algorithm=algorithm, include_headers=signed,
                           canonicalize=(b"relaxed", b"relaxed")) + prefix
    return prefix


def txt(name: str, text: str) -> str:
    strings = [text[i:i + 255].encode() for i in range(0, len(text), 255)]  # RFC 7208 §3.3
    return f"    TXT({name!r}, {', '.join(repr(s) for s in strings)}, ttl=300),\n"


def zoneFile(path: Path, rsaP: str, edP: str) -> None:
    path.write_text(
        "zone = [\n"
        f"    SOA({DOMAIN!r}, mname=b'ns.{DOMAIN}', rname=b'root.{DOMAIN}', serial=1,"
        " refresh=3600, retry=600, expire=86400, minimum=300),\n"
        + txt(DOMAIN, "v=spf1 ip4:127.0.0.1 -all")
        + txt(HELO, "v=spf1 ip4:127.0.0.1 -all")
        + txt(f"rsa._domainkey.{DOMAIN}", f"v=DKIM1; k=rsa; p={rsaP}")
        + txt(f"ed._domainkey.{DOMAIN}", f"v=DKIM1; k=ed25519; p={edP}")
        + txt(f"_dmarc.{DOMAIN}", "v=DMARC1; p=reject")
        + "]\n")


def dnsServer(workdir: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    log = open(workdir / "dns.log", "wb")
    proc = subprocess.Popen([*TWISTD, "-n", "--pidfile=", "dns", "--pyzone",
                             str(workdir / "zone.py"), "--interface", HOST, "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return proc, port


def verifyingServer(workdir: Path, dnsPort: int, filters: list[str]) -> tuple[Server, Path]:
    """(server, its Maildir).  check_local: the load comes from 127.0.0.1, which
    spf-dkim-dmarc otherwise skips."""
    server, maildir, _ = servers.twistmail_server(workdir)
    config = workdir / "twistmail.toml"
    config.write_text(config.read_text()
                      + f'[relay]\nnameservers = ["{HOST}:{dnsPort}"]\n'
                      + f"[filters]\ninbound = {json.dumps(filters)}\n"
                      + "[filters.spf-dkim-dmarc]\ncheck_local = true\n")
    return server, maildir


def authResults(maildir: Path) -> str:
    """The Authentication-Results of one stored message ("" if none)."""
    for path in (maildir / "new").iterdir():
        with open(path, "rb") as f:
            headers = email.parser.BytesHeaderParser().parse(f)
        return " ".join(str(headers.get("Authentication-Results", "")).split())
    return ""


def main() -> int:
    args = servers.on_off_parser(__doc__).parse_args()
    top = Path(tempfile.mkdtemp(prefix="verify-bench-", dir=args.workdir))
    rates: dict[str, list[float]] = {"on": [], "off": []}
    cpu: dict[str, list[float]] = {"on": [], "off": []}  # the server's ms per message
    childCpu: dict[str, list[float]] = {"on": [], "off": []}  # its DKIM processes' ms
    dns = None
    try:
        rsaPem, rsaP, edSeed, edP = keys()
        zoneFile(top / "zone.py", rsaP, edP)
        prefixFile = top / "signatures.txt"
        prefixFile.write_bytes(signatures(args.size, rsaPem, edSeed))
        dns, dnsPort = dnsServer(top)
        for rep, mode in servers.on_off_modes(args.repeat):
            workdir = top / f"{mode}-{rep}"
            workdir.mkdir()
            server, maildir = verifyingServer(workdir, dnsPort,
                                              ["spf-dkim-dmarc"] if mode == "on" else [])
            server.start()
            try:
                servers.smtp_load(server.port, 20, args.size, 2, "--prefix-file",
                                  str(prefixFile))  # starts the DKIM processes
                before = sum(server.cpu())
                childBefore = servers.children_cpu_seconds(server.proc.pid)
                run = servers.smtp_load(server.port, args.messages, args.size,
                                        args.concurrency, "--prefix-file", str(prefixFile))
                cpu[mode].append((sum(server.cpu()) - before) / args.messages * 1000)
                childCpu[mode].append((servers.children_cpu_seconds(server.proc.pid)
                                       - childBefore) / args.messages * 1000)
            finally:
                server.stop()
            results = authResults(maildir)
            if mode == "on" and not all(f"{check}=pass" in results
                                        for check in ("spf", "dkim", "dmarc")):
                raise SystemExit(f"verification did not pass: {results or 'no header'}")
            rates[mode].append(run["msgs_per_sec"])
            print(f"[rep {rep + 1}] verification {mode:3} {run['msgs_per_sec']:7.0f} msg/s "
                  f"{cpu[mode][-1]:5.2f} ms server CPU/msg "
                  f"+ {childCpu[mode][-1]:4.2f} ms in its DKIM processes", flush=True)
    finally:
        if dns is not None:
            dns.terminate()
            dns.wait(10)
        shutil.rmtree(top, ignore_errors=True)
    servers.print_on_off(f"SMTP acceptance, {args.messages} x {args.size} B at "
                         f"{args.concurrency} connections", "filters off", "SPF+DKIM+DMARC on",
                         rates)
    # On a shared machine msg/s follows the neighbours' load; CPU per message does not.
    cpuOn, cpuOff = statistics.median(cpu["on"]), statistics.median(cpu["off"])
    childOn = statistics.median(childCpu["on"])
    print(f"server process CPU per message: off {cpuOff:.2f} ms, on {cpuOn:.2f} ms "
          f"(off/on {cpuOff / cpuOn:.2f}); DKIM processes beside it: {childOn:.2f} ms; "
          f"all of it on one core, off/on would be {cpuOff / (cpuOn + childOn):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
