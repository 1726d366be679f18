"""IMAP at scale: twistmail beside Dovecot (when installed), in one run.

For folders of 1,000, 10,000 and 100,000 messages (``--sizes``):

* ``select first``: the first SELECT ever (no index yet: the server lists the
  Maildir and writes its UID list / index);
* ``select restart``: the first SELECT after a server restart (index on disk);
* ``select warm``: SELECT again from a new connection;
* ``fetch flags``: ``UID FETCH 1:* (FLAGS)`` (response read in full);
* ``100 bodies``: 100 ``UID FETCH <uid> (BODY.PEEK[])`` one after the other,
  on random messages;

and the memory of ``--idle`` (1,000) connections logged in, with INBOX
selected, in IDLE: RSS of the twistmail process, and for Dovecot the PSS
summed over its processes (it runs one imap process per connection).

    python bench/imap_bench.py [--sizes 1000,10000,100000] [--idle 1000]
                               [--dovecot auto|off] [--workdir DIR] [--json out.json]

The same messages go to both servers (hard-linked copies of one Maildir).
Dovecot is Debian's ``dovecot-imapd``, run in the foreground on a scratch
configuration (passwd-file, Maildir, no TLS); it is skipped when absent.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from servers import DOMAIN, PASSWORD, PYTHON, TWISTD, USER, free_port, listen_section

ADDRESS = f"{USER}@{DOMAIN}"
# Issue 12's targets at 100,000 messages: seconds, and times Dovecot's in the same run.
TARGETS = {"select_first": 0.5, "select_restart": 0.1}
RATIO_TARGETS = {"fetch_flags": 1.5}
IDLE_TARGET_MB = 200


# -- the mailbox ---------------------------------------------------------------------


def populate(maildir: Path, count: int, seed: int = 1) -> None:
    """C{count} realistic messages (1-6 KiB, a third of them read) in cur/."""
    rng = random.Random(seed)
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    words = ("report meeting invoice travel lunch project review draft minutes budget "
             "release schedule holiday photo contract").split()
    start = 1_600_000_000
    for i in range(count):
        lines = [" ".join(rng.choices(words, k=10)) for _ in range(rng.randint(10, 80))]
        body = "\r\n".join(lines) + "\r\n"
        data = (f"From: Sender {i % 97} <s{i % 97}@example.net>\r\nTo: {ADDRESS}\r\n"
                f"Subject: {' '.join(rng.choices(words, k=4))} #{i}\r\n"
                f"Date: Mon, 1 Jan 2024 10:00:00 +0000\r\nMessage-ID: <{i}@bench>\r\n"
                f"\r\n{body}").encode()
        name = f"{start + i}.M{i % 1000000}P1Q{i}.bench,S={len(data)}:2,{'S' if i % 3 == 0 else ''}"
        path = maildir / "cur" / name
        path.write_bytes(data)
        os.utime(path, (start + i, start + i))


def linkCopy(source: Path, target: Path) -> None:
    subprocess.run(["cp", "-al", str(source), str(target)], check=True)


# -- a minimal blocking IMAP client ------------------------------------------------------


class Client:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=600)
        self.n = 0
        greeting = b""
        while not greeting.endswith(b"\r\n"):
            greeting += self.sock.recv(4096)

    def _readUntil(self, tag: bytes) -> bytes:
        """Everything up to and including the tagged line (bench messages never contain it)."""
        data = bytearray()
        while True:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError(bytes(data[-300:]))
            searchFrom = max(0, len(data) - len(tag) - 2)
            data += chunk
            at = data.find(b"\r\n" + tag, searchFrom)
            start = at + 2 if at >= 0 else (0 if data.startswith(tag) else -1)
            if start >= 0 and data.endswith(b"\r\n") and data.find(b"\r\n", start) == len(data) - 2:
                return bytes(data)

    def command(self, text: str) -> tuple[float, bytes]:
        self.n += 1
        tag = b"Z%05d " % self.n
        started = time.perf_counter()
        self.sock.sendall(tag + text.encode() + b"\r\n")
        data = self._readUntil(tag)
        elapsed = time.perf_counter() - started
        status = data[data.rfind(tag):]
        if not status[len(tag):].startswith(b"OK"):
            raise RuntimeError(f"{text}: {status[:300]!r}")
        return elapsed, data

    def login(self) -> None:
        self.command(f'LOGIN "{ADDRESS}" "{PASSWORD}"')

    def close(self) -> None:
        try:
            self.command("LOGOUT")
        except (OSError, RuntimeError):
            pass
        self.sock.close()


# -- servers --------------------------------------------------------------------------


def raiseFileLimit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def waitForPort(port: int, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                if s.recv(100).startswith(b"* OK"):
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} not ready:\n{log.read_text(errors='replace')[-3000:]}")


class Twistmail:
    name = "twistmail"

    def __init__(self, work: Path) -> None:
        self.work = work
        self.data = work / "data"
        self.port = free_port()
        self.proc = None
        cli = [PYTHON, "-m", "twistmail", "--data-dir", str(self.data)]
        subprocess.run([*cli, "domain", "add", DOMAIN], check=True, capture_output=True)
        subprocess.run([*cli, "user", "add", ADDRESS], input=f"{PASSWORD}\n".encode(), check=True,
                       capture_output=True)
        self.config = work / "twistmail.toml"
        self.config.write_text(
            f'[server]\ndata_dir = "{self.data}"\nhostname = "bench.example"\n'
            f"max_connections = 5000\nmax_connections_per_ip = 5000\n"
            + listen_section(imap=self.port))

    @property
    def maildir(self) -> Path:
        return self.data / "mail" / DOMAIN / USER

    def start(self) -> None:
        log = self.work / "server.log"
        self.proc = subprocess.Popen([*TWISTD, "-n", "--pidfile=", "twistmail", "--config",
                                      str(self.config)], stdout=log.open("ab"),
                                     stderr=subprocess.STDOUT, preexec_fn=raiseFileLimit)
        waitForPort(self.port, self.proc, log)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)

    def memoryMB(self) -> float:
        return _rssKB(self.proc.pid) / 1024


class Dovecot:
    name = "dovecot"

    def __init__(self, work: Path, passwordHash: str | None = None) -> None:
        """@param passwordHash: a stored password in Dovecot's C{{SCHEME}value} form
        (PLAIN by default)."""
        self.work = work
        self.port = free_port()
        self.home = work / "home" / USER
        self.proc = None
        (work / "run").mkdir(parents=True)
        (work / "state").mkdir()
        self.home.mkdir(parents=True)
        passwd = work / "passwd"
        passwd.write_text(f"{ADDRESS}:{passwordHash or '{PLAIN}' + PASSWORD}::::::\n")
        self.config = work / "dovecot.conf"
        self.config.write_text(f"""
protocols = imap
listen = 127.0.0.1
base_dir = {work}/run
state_dir = {work}/state
log_path = {work}/dovecot.log
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
mail_location = maildir:~/Maildir
first_valid_uid = 1
default_client_limit = 5000
default_process_limit = 5000
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {passwd}
}}
userdb {{
  driver = static
  args = uid=mail gid=mail home={work}/home/%n
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {self.port}
  }}
  inet_listener imaps {{
    port = 0
  }}
  service_count = 0
  client_limit = 5000
}}
service imap {{
  process_limit = 5000
}}
protocol imap {{
  mail_max_userip_connections = 5000
}}
""")

    @property
    def maildir(self) -> Path:
        return self.home / "Maildir"

    def start(self) -> None:
        subprocess.run(["chown", "-R", "mail:mail", str(self.work / "home")], check=True)
        log = self.work / "dovecot.log"
        log.touch()
        self.proc = subprocess.Popen(["dovecot", "-F", "-c", str(self.config)],
                                     stdout=(self.work / "stdout.log").open("ab"),
                                     stderr=subprocess.STDOUT, preexec_fn=raiseFileLimit)
        waitForPort(self.port, self.proc, log)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)

    def memoryMB(self) -> float:
        """PSS of the master and every child: shared pages counted once."""
        pids = [self.proc.pid]
        children = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True,
                                  text=True).stdout.split()
        pids += [int(p) for p in children]
        for p in list(pids[1:]):
            grand = subprocess.run(["pgrep", "-P", str(p)], capture_output=True, text=True)
            pids += [int(x) for x in grand.stdout.split()]
        return sum(_pssKB(p) for p in pids) / 1024


def _rssKB(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _pssKB(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


# -- measurements -----------------------------------------------------------------------


def measureSize(server, count: int, rng: random.Random) -> dict:
    result: dict = {"server": server.name, "messages": count}
    server.start()
    try:
        client = Client(server.port)
        client.login()
        result["select_first"], data = client.command("SELECT INBOX")
        if f"* {count} EXISTS".encode() not in data:
            raise RuntimeError(f"{server.name}: SELECT does not show {count} messages")
        result["fetch_flags"], data = client.command("UID FETCH 1:* (FLAGS)")
        if data.count(b" FETCH (") != count:
            raise RuntimeError(f"{server.name}: FETCH returned {data.count(b' FETCH (')} lines")
        uids = rng.sample(range(1, count + 1), min(100, count))
        started = time.perf_counter()
        for uid in uids:
            client.command(f"UID FETCH {uid} (BODY.PEEK[])")
        result["bodies_100"] = time.perf_counter() - started
        client.close()
    finally:
        server.stop()
    server.start()
    try:
        client = Client(server.port)
        client.login()
        result["select_restart"], _ = client.command("SELECT INBOX")
        client.close()
        client = Client(server.port)
        client.login()
        result["select_warm"], _ = client.command("SELECT INBOX")
        result["fetch_flags_warm"], _ = client.command("UID FETCH 1:* (FLAGS)")
        client.close()
    finally:
        server.stop()
    return result


async def _idleOne(port: int, ready: asyncio.Event, hold: asyncio.Event, sem: asyncio.Semaphore,
                   counter: list) -> None:
    async with sem:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await reader.readline()
        for line in (f'a LOGIN "{ADDRESS}" "{PASSWORD}"', "b SELECT INBOX", "c IDLE"):
            writer.write(line.encode() + b"\r\n")
            while True:
                reply = await reader.readline()
                if not reply:
                    raise ConnectionError("closed during setup")
                if reply.startswith(line[:2].encode()) or reply.startswith(b"+ "):
                    break
    counter[0] += 1
    if counter[0] == counter[1]:
        ready.set()
    await hold.wait()
    writer.write(b"DONE\r\nd LOGOUT\r\n")
    await writer.drain()
    writer.close()


async def _idleAll(port: int, count: int, measure) -> float:
    ready, hold = asyncio.Event(), asyncio.Event()
    counter = [0, count]
    sem = asyncio.Semaphore(20)
    tasks = [asyncio.create_task(_idleOne(port, ready, hold, sem, counter)) for _ in range(count)]
    waiter = asyncio.create_task(ready.wait())
    done, _ = await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
    for task in done:
        if task is not waiter and task.exception():
            raise task.exception()
    await asyncio.sleep(1)  # let the server settle after the last login
    mb = measure()
    hold.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    return mb


def measureIdle(server, connections: int) -> dict:
    server.start()
    try:
        before = server.memoryMB()
        after = asyncio.run(_idleAll(server.port, connections, server.memoryMB))
    finally:
        server.stop()
    return {"server": server.name, "connections": connections, "mb_before": before,
            "mb_idle": after}


def prepare(dovecot: str, prefix: str, workdir: Path | None) -> tuple[bool, Path]:
    """Raise the file limit; whether Dovecot runs (C{dovecot}: auto or off, and
    installed); a scratch directory other users (Dovecot's processes) can enter."""
    raiseFileLimit()
    useDovecot = dovecot == "auto" and shutil.which("dovecot") is not None
    if dovecot == "auto" and not useDovecot:
        print("dovecot not installed (apt-get install dovecot-imapd): twistmail only",
              file=sys.stderr)
    top = Path(tempfile.mkdtemp(prefix=prefix, dir=workdir))
    top.chmod(0o755)
    return useDovecot, top


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--idle", type=int, default=1000)
    parser.add_argument("--dovecot", choices=("auto", "off"), default="auto")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--sources", type=Path, default=None,
                        help="keep the generated Maildirs here and reuse them in later runs")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    useDovecot, top = prepare(args.dovecot, "imap-bench-", args.workdir)
    rng = random.Random(7)
    results: dict = {"sizes": [], "idle": []}
    try:
        for count in sizes:
            source = (args.sources or top) / f"source-{count}"
            if not (source / "cur").is_dir():
                started = time.perf_counter()
                populate(source, count)
                print(f"[{count} messages written in {time.perf_counter() - started:.1f}s]",
                      flush=True)
            kinds = [Twistmail] + ([Dovecot] if useDovecot else [])
            for kind in kinds:
                server = kind(top / f"{kind.name}-{count}")
                server.maildir.parent.mkdir(parents=True, exist_ok=True)
                linkCopy(source, server.maildir)
                row = measureSize(server, count, rng)
                results["sizes"].append(row)
                print(f"  {row['server']:9} {count:>7}  select first {row['select_first']:.3f}s"
                      f"  restart {row['select_restart']:.3f}s  warm {row['select_warm']:.3f}s"
                      f"  fetch flags {row['fetch_flags']:.3f}s (warm {row['fetch_flags_warm']:.3f}s)"
                      f"  100 bodies {row['bodies_100']:.3f}s", flush=True)
        if args.idle:
            for kind in [Twistmail] + ([Dovecot] if useDovecot else []):
                server = kind(top / f"{kind.name}-idle")
                server.maildir.parent.mkdir(parents=True, exist_ok=True)
                populate(server.maildir, 20)
                row = measureIdle(server, args.idle)
                results["idle"].append(row)
                print(f"  {row['server']:9} {args.idle} IDLE connections: {row['mb_idle']:.1f} MB"
                      f" (idle server {row['mb_before']:.1f} MB)", flush=True)
    finally:
        shutil.rmtree(top, ignore_errors=True)
    report(results, sizes)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def report(results: dict, sizes: list[int]) -> None:
    rows = results["sizes"]
    servers = sorted({r["server"] for r in rows}, key=lambda s: s != "twistmail")
    print("\nseconds (lower is better)")
    metrics = ("select_first", "select_restart", "select_warm", "fetch_flags", "fetch_flags_warm",
               "bodies_100")
    print(f"{'metric':18} {'server':9} " + " ".join(f"{n:>9}" for n in sizes) + "   growth 1st->last")
    for metric in metrics:
        for server in servers:
            values = [next((r[metric] for r in rows if r["server"] == server and r["messages"] == n),
                           None) for n in sizes]
            cells = " ".join(f"{v:9.3f}" if v is not None else f"{'-':>9}" for v in values)
            growth = (f"x{values[-1] / values[0]:.1f}" if values[0] and values[-1] else "-")
            print(f"{metric:18} {server:9} {cells}   {growth}")
    largest = max(sizes)
    def at100k(metric: str, server: str) -> float | None:
        return next((r[metric] for r in rows if r["server"] == server
                     and r["messages"] == largest == 100_000), None)

    for metric, limit in TARGETS.items():
        value = at100k(metric, "twistmail")
        if value is not None:
            verdict = "met" if value <= limit else "NOT met"
            print(f"target {metric} at 100,000 <= {limit} s: {value:.3f} s ({verdict})")
    for metric, limit in RATIO_TARGETS.items():
        value, baseline = at100k(metric, "twistmail"), at100k(metric, "dovecot")
        if value is not None and baseline:
            ratio = value / baseline
            verdict = "met" if ratio <= limit else "NOT met"
            print(f"target {metric} at 100,000 <= {limit} x Dovecot: {ratio:.2f} x ({verdict})")
    for row in results["idle"]:
        line = f"{row['server']}: {row['connections']} IDLE connections use {row['mb_idle']:.1f} MB"
        if row["server"] == "twistmail":
            line += f" (target <= {IDLE_TARGET_MB} MB: " + \
                    ("met)" if row["mb_idle"] <= IDLE_TARGET_MB else "NOT met)")
        print(line)


if __name__ == "__main__":
    sys.exit(main())
