"""Run a program whose resolver reads /etc/resolv.conf against the test DNS server.

Some independent tools (``opendkim-testmsg``: libopendkim calls res_nquery)
have no option naming a DNS server, and /etc/resolv.conf cannot name a port.
So, run as ``unshare --user --map-root-user --mount --net python3 resolvns.py
ZONE.json -- PROGRAM ARGS...``: in its own network namespace the loopback
interface is ours, tests/dnsserver.py serves the zone on 127.0.0.1 port 53,
and a private mount of a resolv.conf naming it hides the real one.  Nothing
outside the namespaces changes; no root needed (an unprivileged user namespace;
root runs it without one).

ZONE.json maps names to lists of TXT texts.  Exits with the program's status.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile

SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1


def loopbackUp() -> None:
    """``ip link set lo up``, without needing iproute2."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))


def main(argv: list[str]) -> int:
    zoneFile, separator, *command = argv
    assert separator == "--", "usage: resolvns.py ZONE.json -- PROGRAM ARGS..."
    loopbackUp()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from dnsserver import TXT, startDNS

    with open(zoneFile) as f:
        zone = {name: [TXT(*(t[i:i + 255] for i in range(0, len(t), 255))) for t in texts]
                for name, texts in json.load(f).items()}
    startDNS(zone, port=53)
    with tempfile.NamedTemporaryFile("w", suffix=".resolv.conf", delete=False) as conf:
        conf.write("nameserver 127.0.0.1\noptions attempts:1 timeout:2\n")
    subprocess.run(["mount", "--bind", conf.name, "/etc/resolv.conf"], check=True)
    return subprocess.run(command, stdin=sys.stdin).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
