"""A private Postfix instance on loopback, started by a test or a benchmark.

Debian's ``postfix`` package, run as root with its own configuration
directory, queue and log file (``postfix -c DIR start``), so it touches
nothing of the system's mail setup::

    with Postfix(port, domains=["remote.test"]) as pf:   # receives for remote.test
        ...
        pf.delivered()          -> number of messages in its maildir
        pf.connections()        -> "connect from" lines of its smtpd

``relayhost`` makes it a sender instead: everything it is given with
``sendmail`` goes to that host:port.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import textwrap

POSTFIX = shutil.which("postfix") or "/usr/sbin/postfix"

#: The services a private instance needs; smtpd only on its loopback port.
MASTER_CF = """\
{listen} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000    0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def available() -> bool:
    return os.path.exists(POSTFIX) and os.geteuid() == 0


class Postfix:
    def __init__(self, port: int, domains=(), relayhost: str = "", extra: str = "") -> None:
        # Its own directory under /tmp: Postfix's processes run as the postfix user, who
        # cannot reach into pytest's 0700 tmp_path.
        self.dir = directory = tempfile.mkdtemp(prefix="twistmail-postfix-")
        os.chmod(directory, 0o755)
        self.config = os.path.join(directory, "etc")
        self.maildir = os.path.join(directory, "mail")
        self.log = os.path.join(directory, "maillog")
        self.port = port
        os.makedirs(self.config, exist_ok=True)
        os.makedirs(os.path.join(directory, "queue"), exist_ok=True)  # root's; Postfix fills it
        for owned in (self.maildir, os.path.join(directory, "data")):
            os.makedirs(owned, exist_ok=True)
            shutil.chown(owned, "postfix", "postfix")
        domains = " ".join(domains)
        main = f"""\
            compatibility_level = 3.6
            queue_directory = {directory}/queue
            data_directory = {directory}/data
            maillog_file = {self.log}
            maillog_file_prefixes = {directory}
            myhostname = postfix.test
            mydomain = postfix.test
            mydestination =
            inet_interfaces = 127.0.0.1
            inet_protocols = ipv4
            mynetworks = 127.0.0.0/8
            smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
            smtpd_banner = $myhostname ESMTP
            alias_maps =
            alias_database =
            biff = no
            smtputf8_enable = no
            virtual_mailbox_domains = {domains}
            virtual_mailbox_base = {self.maildir}
            virtual_mailbox_maps = static:box/
            virtual_uid_maps = static:{_uid()}
            virtual_gid_maps = static:{_gid()}
            relayhost = {relayhost}
            smtp_dns_support_level = disabled
            smtp_tls_security_level = none
            message_size_limit = 0
            virtual_mailbox_limit = 0
            """
        with open(os.path.join(self.config, "main.cf"), "w") as f:
            f.write(textwrap.dedent(main) + extra)
        with open(os.path.join(self.config, "master.cf"), "w") as f:
            f.write(MASTER_CF.format(listen=f"127.0.0.1:{port}"))

    def run(self, *args: str, input: bytes | None = None) -> str:
        done = subprocess.run(args, input=input, capture_output=True, timeout=60,
                              env={**os.environ, "MAIL_CONFIG": self.config})
        if done.returncode:
            raise RuntimeError(f"{' '.join(args)}: {done.stderr.decode(errors='replace')}")
        return done.stdout.decode(errors="replace")

    def start(self) -> Postfix:
        self.run(POSTFIX, "-c", self.config, "start")
        return self

    def stop(self) -> None:
        subprocess.run([POSTFIX, "-c", self.config, "stop"], capture_output=True, timeout=60)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Postfix:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def delivered(self) -> int:
        new = os.path.join(self.maildir, "box", "new")
        return len(os.listdir(new)) if os.path.isdir(new) else 0

    def messages(self) -> list[bytes]:
        new = os.path.join(self.maildir, "box", "new")
        out = []
        for name in sorted(os.listdir(new)):
            with open(os.path.join(new, name), "rb") as f:
                out.append(f.read())
        return out

    def logLines(self) -> list[str]:
        try:
            with open(self.log, encoding="utf-8", errors="replace") as f:
                return f.read().splitlines()
        except FileNotFoundError:
            return []

    def connections(self) -> int:
        """How many SMTP connections its smtpd accepted."""
        return sum(1 for line in self.logLines() if "/smtpd[" in line and ": connect from " in line)


def _uid() -> int:
    import pwd
    return pwd.getpwnam("postfix").pw_uid


def _gid() -> int:
    import grp
    return grp.getgrnam("postfix").gr_gid
