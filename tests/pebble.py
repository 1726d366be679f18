"""Let's Encrypt's test CA, pebble (Debian's ``pebble`` package), on loopback.

Pebble validates HTTP-01 and TLS-ALPN-01 on the ports its config names
(``httpPort``, ``tlsPort``), at the address its ``-dnsserver`` gives for the name: a tests/dnsserver.py zone that
maps the test names to 127.0.0.1.  Its own HTTPS uses a throw-away CA from
tests/certs.py (the Debian package ships none), which ``[tls] acme_ca_file``
trusts.  Its roots are made afresh at each start: ``root()`` fetches the one
in use from the management API.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import urllib.request
from dataclasses import dataclass, field

from certs import makeCerts
from serverproc import waitUntil
from support import freePort

PEBBLE = shutil.which("pebble") or "/usr/bin/pebble"


@dataclass
class Pebble:
    directory: str  # a scratch directory for its config, certificates and log
    nameserver: str  # host:port of the DNS server it resolves with
    httpPort: int  # where it expects our HTTP-01 responder
    tlsPort: int = field(default_factory=freePort)  # and our TLS-ALPN-01 responder
    port: int = field(default_factory=freePort)
    managementPort: int = field(default_factory=freePort)
    proc: subprocess.Popen | None = None

    def __post_init__(self) -> None:
        if not os.path.exists(PEBBLE):
            raise AssertionError("pebble is not installed: apt-get install -y pebble "
                                 "(.ci/run installs it)")
        certs = makeCerts("localhost")
        self.caFile = os.path.join(self.directory, "pebble-https-ca.pem")
        files = {"pebble-https-ca.pem": certs.caPEM, "cert.pem": certs.certPEM,
                 "key.pem": certs.keyPEM}
        for name, data in files.items():
            with open(os.path.join(self.directory, name), "wb") as f:
                f.write(data)
        self.config = os.path.join(self.directory, "pebble-config.json")
        with open(self.config, "w") as f:
            json.dump({"pebble": {
                "listenAddress": f"127.0.0.1:{self.port}",
                "managementListenAddress": f"127.0.0.1:{self.managementPort}",
                "certificate": os.path.join(self.directory, "cert.pem"),
                "privateKey": os.path.join(self.directory, "key.pem"),
                "httpPort": self.httpPort, "tlsPort": self.tlsPort, "ocspResponderURL": "",
                "externalAccountBindingRequired": False}}, f)
        self.logPath = os.path.join(self.directory, "pebble.log")

    @property
    def directoryURL(self) -> str:
        return f"https://127.0.0.1:{self.port}/dir"

    def _context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.caFile)

    def _get(self, url: str) -> bytes | None:
        try:
            with urllib.request.urlopen(url, context=self._context(), timeout=5) as response:
                return response.read()
        except OSError:
            return None

    def start(self) -> Pebble:
        env = dict(os.environ, PEBBLE_VA_NOSLEEP="1", PEBBLE_WFE_NONCEREJECT="0")
        with open(self.logPath, "ab") as log:
            self.proc = subprocess.Popen([PEBBLE, "-config", self.config, "-dnsserver",
                                          self.nameserver], stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT, env=env)
        waitUntil(self._ready, 20, "pebble's ACME directory", describe=self.describe)
        return self

    def _ready(self) -> bytes | None:
        if self.proc.poll() is not None:
            raise AssertionError(f"pebble exited at start\n{self.describe()}")
        return self._get(self.directoryURL)

    def root(self) -> bytes:
        """The PEM root every certificate pebble issues chains to (RFC 8555 has no such call)."""
        pem = self._get(f"https://127.0.0.1:{self.managementPort}/roots/0")
        assert pem and pem.startswith(b"-----BEGIN CERTIFICATE-----"), pem
        return pem

    def describe(self) -> str:
        try:
            with open(self.logPath, encoding="utf-8", errors="replace") as f:
                return f"--- pebble log ---\n{f.read()}--- end ---"
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

